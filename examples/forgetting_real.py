"""The forgetting experiment on a real chat model, with a retain set the model wrote itself.

Called by ``forgetting.py --model DIR|FILE.gguf``. A real model's pre-training text is not at
hand, so "what it knew" is what it *said*: its greedy answers to varied prompts, generated once
before any fine-tuning. Half of the prompts give the retain set (held out: its loss before and
after training is the forgetting), the other half the replay set (mixed into the replay arm's
batches). The task is the same as on the shipped model: the lower-case toy questions of
``questions.txt``, a distribution no chat model writes.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from typing import Any

import torch

import lmtune
from forgetting import NOTES, plot, run_arm, table, task_loss_before
from lmtune.assets.corpora import data_path

FULL_HIGH, FULL_LOW, LORA_LR = 1e-4, 1e-5, 1e-3

ARMS: dict[str, tuple[str, dict[str, Any]]] = {
    "full, high lr": ("every weight, lr 1e-4", {"train.lr": FULL_HIGH}),
    "full, low lr": ("every weight, lr 1e-5", {"train.lr": FULL_LOW}),
    "full + L2-to-init": ("lr 1e-4, regularize.l2_init=0.01", {"train.lr": FULL_HIGH, "regularize.l2_init": 0.01}),
    "full + replay": ("lr 1e-4, 25% of each batch from the model's own other answers",
                      {"train.lr": FULL_HIGH, "regularize.replay_ratio": 0.25}),
    "LoRA r=8": ("lr 1e-3, alpha 16, default targets", {"method": "lora", "lora.r": 8, "lora.alpha": 16,
                                                       "train.lr": LORA_LR}),
    "LoRA r=64": ("lr 1e-3, alpha 128, default targets", {"method": "lora", "lora.r": 64, "lora.alpha": 128,
                                                         "train.lr": LORA_LR}),
}

TOPICS = ("photosynthesis", "the French Revolution", "black holes", "how vaccines work", "the water cycle",
          "compound interest", "the Roman Empire", "machine learning", "volcanoes", "the human heart",
          "prime numbers", "climate change", "the printing press", "honeybees", "electric cars",
          "the Moon landing", "democracy", "sourdough bread", "plate tectonics", "the internet",
          "Shakespeare", "recycling", "the immune system", "gravity", "coffee", "the Great Wall of China",
          "solar panels", "chess", "rainbows", "the stock market", "antibiotics", "jazz", "glaciers",
          "the alphabet", "bicycles", "DNA", "earthquakes", "the Olympic Games", "owls", "tea")
ASKS = ("Explain {} in two sentences.", "Write one short paragraph about {}.")


def self_generated(model: str, out: Path, max_new_tokens: int) -> tuple[Path, Path, float]:
    """The model's own greedy answers, one ``prompt answer`` line each: (retain file, replay file, s)."""
    retain, replay = out / "retain_self.txt", out / "replay_self.txt"
    if retain.exists() and replay.exists():
        return retain, replay, 0.0
    start = time.perf_counter()
    lm, tokenizer = lmtune.load(model)
    lines = []
    for topic in TOPICS:
        for ask in ASKS:
            prompt = ask.format(topic)
            answer = lmtune.generate(lm, tokenizer, prompt, chat=True,
                                     max_new_tokens=max_new_tokens)
            lines.append(" ".join(f"{prompt} {answer}".split()))
    out.mkdir(parents=True, exist_ok=True)
    # Alternate topics between the two sets so that both cover every kind of prompt.
    retain.write_text("\n".join(lines[0::2]) + "\n", encoding="utf-8")
    replay.write_text("\n".join(lines[1::2]) + "\n", encoding="utf-8")
    return retain, replay, time.perf_counter() - start


def run_real(args: argparse.Namespace, out: Path, docs: Path) -> None:
    """Every arm on ``args.model``; writes FORGETTING_SMOLLM2.md and forgetting_smollm2.png."""
    t0 = time.perf_counter()
    retain, replay, gen_seconds = self_generated(args.model, out, args.answer_tokens)
    task_eval = out / "questions_eval_40.txt"
    task_eval.write_text("\n".join(data_path("questions_eval.txt").read_text().splitlines()[:40]) + "\n")
    common = {"model": args.model, "data.eval": str(task_eval), "data.retain": str(retain),
              "train.batch_size": args.batch_size, "train.max_length": 96}
    start = task_loss_before(args.model, str(task_eval))
    results = {}
    for name, (_, extra) in ARMS.items():
        if "regularize.replay_ratio" in extra:
            extra = {**extra, "regularize.replay_data": str(replay)}
        results[name] = s = run_arm(name, extra, out, args.steps, args.eval_every, common)
        print(f"{name:<20} task {s['eval_loss']:.3f} | retain {s['retain_loss_before']:.3f} -> "
              f"{s['retain_loss_after']:.3f} ({s['retain_loss_change']:+.3f}) | {s['wall_seconds']:.1f}s", flush=True)
    elapsed = time.perf_counter() - t0
    base = Path(args.model).name
    plot(results, start, docs / "forgetting_smollm2.png", base=base, retain="its own answers")
    text = table(results, start, [], ARMS, base=base)
    print(text)
    md = docs / "FORGETTING_SMOLLM2.md"
    notes = md.read_text(encoding="utf-8").partition(NOTES)[2] if md.exists() else ""
    md.write_text(report(text, args, elapsed, gen_seconds, retain) + NOTES + notes, encoding="utf-8")


def report(text: str, args: argparse.Namespace, elapsed: float, gen_seconds: float, retain: Path) -> str:
    import transformers

    example = retain.read_text(encoding="utf-8").splitlines()[0]
    n = len(retain.read_text(encoding="utf-8").splitlines())
    return f"""# Catastrophic forgetting on a real chat model ({Path(args.model).name})

The experiment of [FORGETTING.md](FORGETTING.md) on SmolLM2-135M-Instruct (width 576, 30 layers,
134.5M weights): {args.steps} steps of {args.batch_size} lower-case toy questions (`questions.txt`,
language-model loss), constant learning rate, no early stopping, same seed. *Task loss* is the final
loss per token on 40 lines of `questions_eval.txt`. The model's pre-training text is not available, so
the *retain set* is its own greedy answers ({args.answer_tokens} new tokens, chat template) to {n} varied
prompts, written before any training; the replay arm mixes in its answers to {n} other prompts. A
retain line looks like:

> {example[:300]}

{text}

![task loss vs retain-loss increase](forgetting_smollm2.png)

Regenerate: `PYTHONPATH=src python examples/forgetting.py --model DIR --steps {args.steps} --eval-every
{args.eval_every} --batch-size {args.batch_size}` ({elapsed:.0f} s in all, {gen_seconds:.0f} s of it
writing the retain and replay sets, on {platform.processor() or platform.machine()},
{torch.get_num_threads()} threads, torch {torch.__version__}, transformers {transformers.__version__}).
"""

