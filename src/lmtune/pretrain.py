"""``lmtune pretrain``: build the word tokenizer from a corpus and pre-train the shipped GPT with ``train()``.

Lives at the loop's level (it runs the loop); the model and tokenizer it builds are
``lmtune.models.shipped``'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmtune.config import load_config
from lmtune.data.batching import pad_batch
from lmtune.data.examples import text_examples
from lmtune.data.readers import read_records
from lmtune.methods.full import apply as apply_full
from lmtune.models.shipped import build_word_tokenizer, random_model
from lmtune.objectives.lm import lm_loss
from lmtune.run import check_output_dir, pick_device
from lmtune.runlog import RunLog
from lmtune.train import Task, train

PRETRAIN_DEFAULTS = {
    "method": "full", "objective": "lm",
    "train.steps": 1500, "train.batch_size": 32, "train.lr": 1e-2,  # from scratch: move fast
    "train.schedule": "linear", "train.warmup_steps": 50, "train.betas": [0.85, 0.99],
    "train.log_every": 100, "train.max_length": 64,
}


def pretrain(corpus: str | Path, out: str | Path, overrides: list[str] | None = None, quiet: bool = False,
             tensorboard: bool = True) -> dict[str, Any]:
    """Build the word tokenizer from ``corpus`` and pre-train a small GPT on it with ``train()``.

    Returns:
        The run summary; ``out`` becomes a ``transformers`` model folder.
    """
    cfg = load_config(base={**PRETRAIN_DEFAULTS, "output_dir": str(out), "data.train": str(corpus)},
                      overrides=overrides)
    out = check_output_dir(cfg)
    records = read_records(cfg["data.train"])
    tokenizer = build_word_tokenizer([r.fields["text"] for r in records])
    log = RunLog(out, quiet=quiet, tensorboard=tensorboard)
    examples, stats = text_examples(records, tokenizer, cfg["train.max_length"])
    model = random_model(tokenizer, cfg["train.seed"])
    n_words = len(tokenizer) - 1
    log.say(f"vocab size: {len(tokenizer)} ({n_words} words + BOS)")
    log.say(f"pre-training sentences: {len(examples)}")
    log.say(f"model: {sum(p.numel() for p in model.parameters()):,} params")
    prepared = apply_full(model, tokenizer, cfg, Path(corpus))
    pad_id = tokenizer.pad_token_id
    task = Task(model=prepared.model, train_examples=examples, collate=lambda exs: pad_batch(exs, pad_id),
                loss=lm_loss, save=prepared.save, summary={"data": stats.as_dict()})
    summary = train(task, cfg, out, device=pick_device(), log=log)
    log.say(f"model saved to {out}")
    return summary
