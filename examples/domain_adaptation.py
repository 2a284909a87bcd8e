"""Domain adaptation in two stages: continued pre-training on domain text, then the task.

Stage 1 (``objective=lm``): the shipped model, pre-trained on simple statements, reads text of
the question-and-answer domain — the turns of ``chat.jsonl`` as plain lines, no labels. Stage 2
(``objective=sft``): instruction tuning on ``instructions.jsonl`` with ``model=`` the stage-1
output folder, next to the same stage 2 from the shipped model. The adapted model should start
stage 2 lower and stay ahead.

Writes ``DOMAIN_ADAPTATION.md`` next to this script. A few minutes on two CPU cores:

    PYTHONPATH=src python examples/domain_adaptation.py [--out runs/domain]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from lmtune.assets.corpora import data_path
from lmtune.config import load_config
from lmtune.data.readers import read_records
from lmtune.evaluate import run_eval
from lmtune.run import run_training
from lmtune.runlog import RunLog

HERE = Path(__file__).resolve().parent
TASK_EVAL = str(data_path("instructions_eval.jsonl"))
NOTES = "\n<!-- notes: kept across reruns -->\n"


def domain_text(path: Path) -> Path:
    """The chat turns as one plain-text line per conversation: unlabeled in-domain text."""
    lines = [" ".join(m["content"] for m in r.fields["messages"] if m["role"] != "system")
             for r in read_records(data_path("chat.jsonl"))]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def train(folder: Path, **keys: Any) -> dict[str, Any]:
    shutil.rmtree(folder, ignore_errors=True)
    cfg = load_config(overrides={"output_dir": str(folder), "train.batch_size": 16, "train.max_length": 64,
                                 "train.log_every": 1, "train.seed": 0, **keys})
    summary = run_training(cfg, log=RunLog(folder, quiet=True, tensorboard=False)).summary
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    summary["first_loss"] = rows[0]["loss"]
    summary["evals"] = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/domain")
    parser.add_argument("--stage1-steps", type=int, default=150)
    parser.add_argument("--stage2-steps", type=int, default=100)
    parser.add_argument("--docs", default=str(HERE))
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    domain = domain_text(out / "domain.txt")
    stage1 = train(out / "stage1-domain-lm", **{"data.train": str(domain), "objective": "lm",
                                                "train.steps": args.stage1_steps, "train.lr": 1e-3,
                                                "data.retain": str(data_path("retain.txt"))})
    task = {"data.train": str(data_path("instructions.jsonl")), "data.eval": TASK_EVAL, "objective": "sft",
            "train.steps": args.stage2_steps, "train.lr": 1e-3, "train.eval_every": 10}
    starts = {"shipped model": None, "after stage 1": str(out / "stage1-domain-lm")}
    rows = {}
    for name, model in starts.items():
        before = run_eval(model, None, TASK_EVAL, "perplexity,exact_match", max_new_tokens=16)
        slug = "stage2-from-shipped" if model is None else "stage2-from-stage1"
        summary = train(out / slug, model=model, **task)
        after = run_eval(str(out / slug), None, TASK_EVAL, "exact_match", max_new_tokens=16)
        rows[name] = (before, summary, after)
        print(f"{name:<14} task loss before {before['loss']:.3f} | first step {summary['first_loss']:.3f} | "
              f"final eval {summary['eval_loss']:.3f} | exact match {after['exact_match']:.3f}", flush=True)
    text = report(args, stage1, rows, time.perf_counter() - t0)
    md = Path(args.docs) / "DOMAIN_ADAPTATION.md"
    # The reading of the numbers is written by hand below NOTES; a rerun keeps it.
    notes = md.read_text(encoding="utf-8").partition(NOTES)[2] if md.exists() else ""
    md.write_text(text + NOTES + notes, encoding="utf-8")
    print(text)


def report(args: argparse.Namespace, stage1: dict[str, Any], rows: dict[str, Any], elapsed: float) -> str:
    table = ["| stage 2 starts from | task loss before stage 2 | stage-2 step-1 loss | eval loss after "
             f"{args.stage2_steps} steps | exact match before → after |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, (before, summary, after) in rows.items():
        table.append(f"| {name} | {before['loss']:.3f} | {summary['first_loss']:.3f} | {summary['eval_loss']:.3f} | "
                     f"{before['exact_match']:.3f} → {after['exact_match']:.3f} |")
    steps = [s for s, _ in next(iter(rows.values()))[1]["evals"]]
    curves = ["| step | " + " | ".join(rows) + " |", "| ---: |" + " ---: |" * len(rows)]
    for i, step in enumerate(steps):
        curves.append(f"| {step} | " + " | ".join(f"{r[1]['evals'][i][1]:.3f}" for r in rows.values()) + " |")
    return f"""# Domain adaptation: continued pre-training, then the task

Stage 1: `objective=lm` on {stage1['data']['examples']} lines of question-and-answer text (the turns of
`chat.jsonl`, no labels), {args.stage1_steps} steps from the shipped model
(its own loss {stage1['first_loss']:.3f} → {stage1['final_loss']:.3f}; retain loss on pre-training-style text
{stage1['retain_loss_before']:.3f} → {stage1['retain_loss_after']:.3f}).
Stage 2: `objective=sft` on `instructions.jsonl` (loss on the answer only), {args.stage2_steps} steps,
lr 1e-3, batch 16, `model=` the stage-1 folder or the shipped model. Task loss is the mean loss per answer
token on `instructions_eval.jsonl` (`lmtune eval --metrics perplexity`, prompt tokens excluded);
exact match is greedy generation against the reference answer.

{chr(10).join(table)}

Stage-2 eval loss during training:

{chr(10).join(curves)}

The same two stages from the command line:

```
lmtune train data.train=domain.txt objective=lm output_dir=runs/domain/stage1 train.steps={args.stage1_steps}
lmtune train model=runs/domain/stage1 data.train=instructions.jsonl objective=sft output_dir=runs/domain/stage2
```

Regenerate: `PYTHONPATH=src python examples/domain_adaptation.py` ({elapsed:.0f} s on
{platform.processor() or platform.machine()}, torch {torch.__version__}).
"""


if __name__ == "__main__":
    main()
