"""Objective ``lm``: next-token loss on plain text (pre-training and continued pre-training)."""

from __future__ import annotations

from typing import Any

from lmtune.data.batching import pad_batch
from lmtune.data.examples import text_examples
from lmtune.errors import InputError
from lmtune.objectives.lm import lm_loss
from lmtune.train import Task


def build_task(ctx: Any) -> Task:
    """LM task: every token after BOS carries loss."""
    cfg, tok = ctx.cfg, ctx.tokenizer
    train_ex, stats = text_examples(ctx.records("data.train"), tok, cfg["train.max_length"])
    if not train_ex:
        raise InputError(f"{cfg['data.train']}: no usable examples")
    eval_records = ctx.records("data.eval")
    eval_ex = text_examples(eval_records, tok, cfg["train.max_length"])[0] if eval_records else None
    if stats.truncated:
        ctx.log.say(f"truncated {stats.truncated} of {stats.examples} examples to train.max_length="
                    f"{cfg['train.max_length']} tokens")
    prepared = ctx.apply_method(ctx.load_causal_lm())
    pad_id = tok.pad_token_id
    return Task(model=prepared.model, train_examples=train_ex, eval_examples=eval_ex,
                collate=lambda exs: pad_batch(exs, pad_id), loss=lm_loss, save=prepared.save,
                summary={"data": stats.as_dict(), **prepared.summary})
