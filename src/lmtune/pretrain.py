"""``lmtune pretrain``: a word tokenizer and a small GPT from scratch, trained by the same ``train()``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmtune.config import KEYS, load_config
from lmtune.data.batching import pad_batch
from lmtune.data.examples import text_examples
from lmtune.data.readers import read_records
from lmtune.distributed import pick_device
from lmtune.errors import InputError
from lmtune.methods.full import apply as apply_full
from lmtune.models.shipped import build_word_tokenizer, random_model
from lmtune.objectives.lm import lm_loss
from lmtune.objectives.task import ExampleBatches, Task
from lmtune.run import check_output_dir
from lmtune.runlog import RunLog
from lmtune.train import train

PRETRAIN_DEFAULTS = {
    "method": "full", "objective": "lm",
    "train.steps": 1500, "train.batch_size": 32, "train.lr": 1e-2,  # from scratch: move fast
    "train.schedule": "linear", "train.warmup_steps": 50, "train.betas": [0.85, 0.99],
    "train.log_every": 100, "train.max_length": 64,
}
# What pre-training reads: the train section (minus SFT's keys) and where the corpus and model go.
# Anything else would be accepted and ignored, so it is refused.
PRETRAIN_KEYS = {k for k in KEYS if k.startswith("train.")} - {"train.packing", "train.loss_on"}


def pretrain(corpus: str | Path, out: str | Path, overrides: list[str] | None = None, quiet: bool = False,
             tensorboard: bool = True) -> dict[str, Any]:
    """Build the word tokenizer from ``corpus`` and pre-train a small GPT on it with ``train()``.

    Returns:
        The run summary; ``out`` becomes a ``transformers`` model folder.

    Raises:
        InputError: a key pre-training does not read, or a bad corpus or output folder.
    """
    cfg = load_config(base={**PRETRAIN_DEFAULTS, "output_dir": str(out), "data.train": str(corpus)},
                      overrides=overrides)
    defaults = load_config(base={**PRETRAIN_DEFAULTS, "output_dir": str(out), "data.train": str(corpus)})
    ignored = [k for k, v in cfg.flat().items() if k not in PRETRAIN_KEYS and v != defaults.get(k)]
    if ignored:
        raise InputError(f"lmtune pretrain does not use {', '.join(ignored)}: it trains a new word-level GPT "
                         "(method=full, objective=lm) on --corpus into --out; it takes train.* keys only")
    out = check_output_dir(cfg.output_dir, cfg.train.resume)
    records = read_records(cfg.data.train)
    tokenizer = build_word_tokenizer([r.fields["text"] for r in records])
    log = RunLog(out, quiet=quiet, tensorboard=tensorboard)
    examples, stats = text_examples(records, tokenizer, cfg.train.max_length)
    model = random_model(tokenizer, cfg.train.seed)
    n_words = len(tokenizer) - 1
    log.say(f"vocab size: {len(tokenizer)} ({n_words} words + BOS)")
    log.say(f"pre-training sentences: {len(examples)}")
    log.say(f"model: {sum(p.numel() for p in model.parameters()):,} params")
    prepared = apply_full(model, tokenizer, Path(corpus))
    pad_id = tokenizer.pad_token_id
    batches = ExampleBatches(examples, lambda exs: pad_batch(exs, pad_id), cfg.train.batch_size, cfg.train.seed)
    task = Task(model=prepared.model, batches=batches, loss=lm_loss, save=prepared.save,
                summary={"method": "full", "objective": "lm", "data": stats.as_dict()})
    summary = train(task, cfg.train, out, device=pick_device(), log=log)
    log.say(f"model saved to {out}")
    return summary
