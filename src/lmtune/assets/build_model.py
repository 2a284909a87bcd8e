"""Rebuild the shipped model: ``python -m lmtune.assets.build_model``.

Pre-trains the small word-level GPT on the shipped ``pretrain.txt`` with ``lmtune pretrain``
(the same ``train()`` that fine-tunes it) and keeps its loss curve in ``metrics.jsonl``, which
``lmtune demo`` plots next to the fine-tuning curves.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from lmtune.assets.corpora import data_path
from lmtune.pretrain import pretrain


def main() -> int:
    out = Path(__file__).parent / "model"
    if out.exists():
        shutil.rmtree(out)
    pretrain(data_path("pretrain.txt"), out, ["train.log_every=10", *sys.argv[1:]], tensorboard=False)
    for leftover in ("checkpoints",):
        shutil.rmtree(out / leftover, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
