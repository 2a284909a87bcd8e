"""Controlled sentiment, after the DPO paper's first experiment, on lmtune's shipped tiny GPT.

Ground truth is a programmatic score, ``lmtune.assets.corpora.sentiment_score`` (share of
positive minus negative words). The shipped preference pairs are labelled by it. Then:

1. a reward model (``objective=reward``) learns the preference from 360 pairs and is checked
   on 40 held-out pairs;
2. PPO (``objective=ppo``) optimises the *learned* reward for several ``ppo.kl_coef``;
3. DPO (``objective=dpo``) learns from the pairs directly for several ``dpo.beta``.

Each policy continues 20 held-out prompts (8 samples each, temperature 1). The table reports
the true sentiment of the continuations against KL(π‖π_ref), estimated per sequence as the
sum over sampled tokens of log π − log π_ref. Rerun (about 10 minutes on two busy CPU cores)::

    PYTHONPATH=src python examples/sentiment_rlhf.py [--out runs/sentiment]

It writes ``examples/sentiment_rlhf.md`` (table) and ``examples/sentiment_rlhf.png`` (plot).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from lmtune.assets.corpora import data_path, sentiment_score
from lmtune.config import load_config
from lmtune.data.examples import encode, special_ids
from lmtune.generate import generate
from lmtune.models.loading import load_model_and_tokenizer
from lmtune.objectives.ppo_task import layout, response_logprobs
from lmtune.run import run_training
from lmtune.runlog import RunLog

HERE = Path(__file__).resolve().parent
KL_COEFS = (0.02, 0.1, 0.5)
BETAS = (0.05, 0.2, 1.0)
SAMPLES, NEW_TOKENS = 8, 8


def train(out: Path, **keys: object) -> dict:
    cfg = load_config(overrides={"output_dir": str(out), **keys})
    return run_training(cfg, log=RunLog(out, quiet=True)).summary


@torch.no_grad()
def evaluate(model_dir: Path | None, ref, tok, prompts: list[str], seed: int = 0) -> tuple[float, float]:
    """(mean true sentiment, mean KL to the reference) of sampled continuations."""
    model = ref if model_dir is None else load_model_and_tokenizer(model_dir)[0].eval()
    bos, eos = special_ids(tok)
    scores, kls = [], []
    for i, text in enumerate(prompts):
        ids = [bos] + encode(tok, text)
        batch_prompts = [ids] * SAMPLES
        responses = generate(model, torch.tensor(batch_prompts), max_new_tokens=NEW_TOKENS, temperature=1.0,
                             seed=seed + i, stop_ids={eos})
        scores += [sentiment_score(tok.decode(r, skip_special_tokens=True)) for r in responses]
        batch = layout(batch_prompts, responses, tok.pad_token_id)
        mask = batch["response_mask"]
        logp = response_logprobs(model, batch, 1.0)[0] * mask  # (S, R)
        ref_logp = response_logprobs(ref, batch, 1.0)[0] * mask  # (S, R)
        kls += (logp - ref_logp).sum(1).tolist()
    return sum(scores) / len(scores), sum(kls) / len(kls)


def fresh_out(description: str, default: str) -> Path:
    """The ``--out`` folder, emptied, with torch seeded: how each example here starts."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default=default, help="where the runs go (replaced)")
    out = Path(parser.parse_args().out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    torch.manual_seed(0)
    return out


def write_data(out: Path) -> list[str]:
    """The 360/40 split of the shipped pairs and the 80 training prompts into ``out``; returns
    the 20 held-out prompts every policy is evaluated on."""
    pairs = data_path("preferences.jsonl").read_text(encoding="utf-8").splitlines()
    (out / "pairs_train.jsonl").write_text("\n".join(pairs[:360]) + "\n", encoding="utf-8")
    (out / "pairs_eval.jsonl").write_text("\n".join(pairs[360:]) + "\n", encoding="utf-8")
    prompts = data_path("ppo_prompts.txt").read_text(encoding="utf-8").splitlines()
    (out / "prompts_train.txt").write_text("\n".join(prompts[:80]) + "\n", encoding="utf-8")
    return prompts[80:]


def main() -> None:
    out = fresh_out(__doc__.split("\n")[0], "runs/sentiment_rlhf")
    start = time.perf_counter()
    held_out = write_data(out)

    rm = train(out / "reward", objective="reward", **{
        "data.train": str(out / "pairs_train.jsonl"), "data.eval": str(out / "pairs_eval.jsonl"),
        "train.steps": 40, "train.batch_size": 16, "train.lr": 3e-3})
    print(f"reward model: held-out pairwise accuracy {rm['pairwise_accuracy_before']:.3f} -> "
          f"{rm['pairwise_accuracy_after']:.3f}", flush=True)

    ref, tok, _ = load_model_and_tokenizer(None)
    ref.eval()
    rows = [("base (reference)", "-", *evaluate(None, ref, tok, held_out))]
    for kl_coef in KL_COEFS:
        run = out / f"ppo_kl{kl_coef}"
        train(run, objective="ppo", **{
            "data.train": str(out / "prompts_train.txt"), "ppo.reward_model": str(out / "reward"),
            "ppo.kl_coef": kl_coef, "ppo.rollout_batch_size": 16, "ppo.epochs": 2, "ppo.max_new_tokens": NEW_TOKENS,
            "train.batch_size": 8, "train.steps": 80, "train.lr": 1e-3})
        rows.append(("PPO (learned reward)", f"kl_coef={kl_coef}", *evaluate(run, ref, tok, held_out)))
        print(rows[-1], flush=True)
    for beta in BETAS:
        run = out / f"dpo_beta{beta}"
        train(run, objective="dpo", **{
            "data.train": str(out / "pairs_train.jsonl"), "dpo.beta": beta, "dpo.precompute_ref": True,
            "train.steps": 60, "train.batch_size": 16, "train.lr": 1e-3})
        rows.append(("DPO (pairs)", f"beta={beta}", *evaluate(run, ref, tok, held_out)))
        print(rows[-1], flush=True)
    elapsed = time.perf_counter() - start
    write_report(rows, rm, elapsed)


def write_report(rows: list[tuple], rm: dict, elapsed: float) -> None:
    lines = [
        "# Controlled sentiment: reward vs KL (shipped tiny GPT)", "",
        "Written by `PYTHONPATH=src python examples/sentiment_rlhf.py` "
        f"({elapsed / 60:.1f} min on {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, Python {sys.version.split()[0]}).", "",
        f"Reward model (objective=reward, 40 steps): held-out pairwise accuracy "
        f"{rm['pairwise_accuracy_before']:.3f} before, {rm['pairwise_accuracy_after']:.3f} after (40 pairs).", "",
        f"Each policy: 20 held-out prompts × {SAMPLES} samples, temperature 1, ≤ {NEW_TOKENS} new tokens. "
        "Sentiment is the ground-truth `sentiment_score` of the continuation (−1…1); KL is "
        "mean Σ_t (log π − log π_ref) over the sampled continuations, in nats.", "",
        "| method | setting | true sentiment | KL(π‖π_ref) |", "| --- | --- | ---: | ---: |",
    ]
    lines += [f"| {m} | {s} | {score:.3f} | {kl:.3f} |" for m, s, score, kl in rows]
    (HERE / "sentiment_rlhf.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (HERE / "sentiment_rlhf.json").write_text(json.dumps(
        [{"method": m, "setting": s, "sentiment": score, "kl": kl} for m, s, score, kl in rows], indent=2) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, marker in (("PPO (learned reward)", "o"), ("DPO (pairs)", "s"), ("base (reference)", "*")):
        pts = [(kl, score, s) for m, s, score, kl in rows if m == label]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, s=60, label=label)
        for kl, score, s in pts:
            if s != "-":
                ax.annotate(s, (kl, score), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("KL(π ‖ π_ref) per continuation (nats)")
    ax.set_ylabel("true sentiment of continuation")
    ax.set_title("Controlled sentiment on the shipped tiny GPT")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "sentiment_rlhf.png", dpi=120)


if __name__ == "__main__":
    main()
