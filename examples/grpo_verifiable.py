"""GRPO with a verifiable reward on lmtune's shipped tiny GPT, next to PPO on the same reward.

The task: the shipped colour questions followed by the start of their answer ("what color is
his red box ? his box is"; the bare question makes the base model stop at once, as its
pre-training lines end after "?"). Two checks a function does exactly, no reward model involved:
``correct`` (1 if the completion names the asked colour and no other) and ``form`` (1 if it is
one colour word and a full stop, the answer's form), weighted 1 and 0.5. GRPO (``objective=grpo``)
gets them as two reward functions (``grpo.reward_fns``, ``grpo.reward_weights``) with the answer
from the prompts file's ``answer`` column; PPO (``objective=ppo``) gets their weighted sum as one
``f(prompt, response)``, reading the colour from the prompt. Both sample the same number of
completions (8 per prompt for GRPO; the same prompts 8 times each for PPO), ≤ 4 tokens at
temperature 1, and take the same optimizer steps.

Written: mean training reward per step (plot), and on 20 held-out questions the reward of
greedy and of sampled completions (8 per question, temperature 1) before and after. Rerun
(a few minutes on two busy CPU cores)::

    PYTHONPATH=src python examples/grpo_verifiable.py [--out runs/grpo_verifiable]

It writes ``examples/GRPO.md`` (table) and ``examples/grpo_verifiable.png`` (plot).
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the reward functions below are imported by module name

from sentiment_rlhf import fresh_out  # noqa: E402  (after the path line above)

from lmtune.assets.vocab import COLOURS  # noqa: E402

STEPS, GENERATIONS, PROMPTS_PER_BATCH, NEW_TOKENS, SAMPLES = 100, 8, 8, 4, 8


def names_colour(completion: str, answer: str) -> float:
    """1.0 if ``completion`` names ``answer`` and no other colour, else 0.0."""
    said = {w for w in completion.replace(".", " ").replace("?", " ").split() if w in COLOURS}
    return float(said == {answer})


def asked_colour(prompt: str) -> str:
    """The colour a question asks about ('what color is his red box ?' -> 'red')."""
    return next(w for w in prompt.split()[2:] if w in COLOURS)


def has_form(completion: str) -> float:
    """1.0 if ``completion`` is one colour word and a full stop ('red .'), else 0.0."""
    words = completion.split()
    return float(len(words) == 2 and words[0] in COLOURS and words[1] == ".")


def correct(prompts: list[str], completions: list[str], answer: list[str], **columns) -> list[float]:
    """GRPO reward function: one float per completion, the answer from the data's column."""
    return [names_colour(c, a) for c, a in zip(completions, answer, strict=True)]


def form(prompts: list[str], completions: list[str]) -> list[float]:
    """GRPO reward function without the extra columns: it gets only what it names."""
    return [has_form(c) for c in completions]


WEIGHTS = (1.0, 0.5)


def ppo_reward(prompt: str, response: str) -> float:
    """The same weighted checks for PPO, which passes one (prompt, response) at a time."""
    return WEIGHTS[0] * names_colour(response, asked_colour(prompt)) + WEIGHTS[1] * has_form(response)


def train(out: Path, **keys: object) -> dict:
    from lmtune.config import load_config
    from lmtune.run import run_training
    from lmtune.runlog import RunLog

    cfg = load_config(overrides={"output_dir": str(out), **keys})
    return run_training(cfg, log=RunLog(out, quiet=True, tensorboard=False)).summary


@torch.no_grad()
def sampled_reward(model_dir: Path | None, questions: list[dict]) -> tuple[float, float]:
    """(correct rate, form rate) of SAMPLES sampled completions (temperature 1) per held-out question."""
    from lmtune.data.examples import encode, special_ids
    from lmtune.generate import generate
    from lmtune.models.loading import load_model_and_tokenizer

    model, tok, _ = load_model_and_tokenizer(model_dir)
    model.eval()
    bos, eos = special_ids(tok)
    right = formed = 0.0
    for i, q in enumerate(questions):
        ids = torch.tensor([[bos] + encode(tok, q["prompt"])] * SAMPLES)
        for r in generate(model, ids, max_new_tokens=NEW_TOKENS, temperature=1.0, seed=1000 + i, stop_ids={eos}):
            text = tok.decode(r, skip_special_tokens=True)
            right, formed = right + names_colour(text, q["answer"]), formed + has_form(text)
    n = len(questions) * SAMPLES
    return right / n, formed / n


def colour_questions(name: str) -> list[dict]:
    from lmtune.assets.corpora import data_path

    rows = [json.loads(line) for line in data_path(name).read_text(encoding="utf-8").splitlines()]
    # "his box is red ." -> the prompt ends with "his box is": the answer is the next word
    return [{"prompt": f"{r['prompt']} {r['completion'].rsplit(' ', 2)[0]}", "answer": asked_colour(r["prompt"])}
            for r in rows if r["prompt"].startswith("what color")]


def reward_curve(out: Path, key: str) -> list[float]:
    return [json.loads(line)[key] for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    out = fresh_out(__doc__.split("\n")[0], "runs/grpo_verifiable")
    start = time.perf_counter()
    train_q, eval_q = colour_questions("instructions.jsonl"), colour_questions("instructions_eval.jsonl")
    for name, rows in (("train.jsonl", train_q), ("eval.jsonl", eval_q)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    # PPO sees each prompt as often as GRPO does: GENERATIONS copies, one after another.
    (out / "ppo_train.txt").write_text("".join((r["prompt"] + "\n") * GENERATIONS for r in train_q))
    (out / "ppo_eval.txt").write_text("".join(r["prompt"] + "\n" for r in eval_q))
    common = {"train.steps": STEPS, "train.batch_size": 32, "train.lr": 3e-3, "train.seed": 0}
    batch = PROMPTS_PER_BATCH * GENERATIONS  # 64 completions per generation batch / rollout

    runs = {}
    runs["GRPO"] = train(out / "grpo", objective="grpo", **common, **{
        "data.train": str(out / "train.jsonl"), "data.eval": str(out / "eval.jsonl"),
        "grpo.reward_fns": ["grpo_verifiable:correct", "grpo_verifiable:form"],
        "grpo.reward_weights": list(WEIGHTS), "grpo.num_generations": GENERATIONS,
        "grpo.generation_batch_size": PROMPTS_PER_BATCH, "grpo.max_completion_length": NEW_TOKENS,
        "grpo.num_iterations": 2, "grpo.loss_type": "dapo"})
    print("GRPO", runs["GRPO"]["eval_reward_before"], "->", runs["GRPO"]["eval_reward_after"], flush=True)
    runs["PPO"] = train(out / "ppo", objective="ppo", **common, **{
        "data.train": str(out / "ppo_train.txt"), "data.eval": str(out / "ppo_eval.txt"),
        "ppo.reward_fn": "grpo_verifiable:ppo_reward", "ppo.rollout_batch_size": batch, "ppo.epochs": 2,
        "ppo.max_new_tokens": NEW_TOKENS, "ppo.missing_eos_penalty": 0.0, "ppo.kl_coef": 0.05})
    print("PPO", runs["PPO"]["eval_score_before"], "->", runs["PPO"]["eval_score_after"], flush=True)

    base_sampled = sampled_reward(None, eval_q)
    rows = []
    for name, key, curve_key in (("GRPO", "eval_reward", "reward"), ("PPO", "eval_score", "score")):
        s = runs[name]
        curve = reward_curve(out / name.lower(), curve_key)
        after = sampled_reward(out / name.lower(), eval_q)
        rows.append({"method": name, "greedy_before": s[f"{key}_before"], "greedy_after": s[f"{key}_after"],
                     "correct_before": base_sampled[0], "correct_after": after[0],
                     "form_before": base_sampled[1], "form_after": after[1],
                     "train_first": sum(curve[:4]) / 4, "train_last": sum(curve[-4:]) / 4,
                     "seconds": s["wall_seconds"], "curve": curve})
    write_report(rows, time.perf_counter() - start, len(train_q), len(eval_q))


def write_report(rows: list[dict], elapsed: float, n_train: int, n_eval: int) -> None:
    lines = [
        "# GRPO with a verifiable reward (shipped tiny GPT), next to PPO", "",
        "Written by `PYTHONPATH=src python examples/grpo_verifiable.py` "
        f"({elapsed / 60:.1f} min on {platform.processor() or platform.machine()}, shared by other work, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, Python {sys.version.split()[0]}).", "",
        f"Task: {n_train} shipped colour questions with the start of their answer (`what color is his red box ? "
        f"his box is`); reward = 1 × correct (names the asked colour and no other) + 0.5 × form (one colour "
        f"word and '.'). Both runs: {STEPS} optimizer steps of 32 completions, "
        f"lr 3e-3, generation batches of {PROMPTS_PER_BATCH} prompts × {GENERATIONS} completions (GRPO; PPO: the "
        f"same {PROMPTS_PER_BATCH * GENERATIONS} completions per rollout), 2 passes over each, ≤ {NEW_TOKENS} "
        "new tokens at temperature 1. GRPO: loss dapo, scale_rewards group, beta 0. PPO: kl_coef 0.05, value "
        "head, GAE.", "",
        f"Held out: {n_eval} colour questions; total reward of the greedy completion, and the shares of "
        f"{SAMPLES} samples each (temperature 1) that are correct and that have the answer's form.", "",
        "| method | train reward, first 4 steps | last 4 steps | held-out greedy reward before | after | "
        "sampled correct before | after | sampled form before | after | training (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['method']} | {r['train_first']:.3f} | {r['train_last']:.3f} | {r['greedy_before']:.3f} | "
              f"{r['greedy_after']:.3f} | {r['correct_before']:.3f} | {r['correct_after']:.3f} | "
              f"{r['form_before']:.3f} | {r['form_after']:.3f} | {r['seconds']:.0f} |" for r in rows]
    lines += ["", "Training time is the loop's own (`wall_seconds` of summary.json: sampling, scoring, updates; "
              "model loading, imports and the held-out evaluations excluded), on a shared machine."]
    (HERE / "GRPO.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (HERE / "grpo_verifiable.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.plot(range(1, len(r["curve"]) + 1), r["curve"], label=r["method"])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean reward of the batch's completions")
    ax.set_title("Colour questions: reward while training (shipped tiny GPT)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "grpo_verifiable.png", dpi=120)


if __name__ == "__main__":
    main()
