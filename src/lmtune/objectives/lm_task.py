"""Objective ``lm``: next-token loss on plain text (pre-training and continued pre-training)."""

from __future__ import annotations

from lmtune.data.batching import pad_batch
from lmtune.data.examples import text_examples
from lmtune.errors import InputError
from lmtune.objectives.lm import lm_loss
from lmtune.objectives.task import RunContext, Task


def build_task(ctx: RunContext) -> Task:
    """LM task: every token after BOS carries loss."""
    cfg, tok = ctx.cfg, ctx.tokenizer
    max_length = cfg.train.max_length
    train_ex, stats = text_examples(ctx.records("data.train"), tok, max_length)
    if not train_ex:
        raise InputError(f"{ctx.source('data.train')}: no usable examples")
    eval_records = ctx.records("data.eval")
    eval_ex = text_examples(eval_records, tok, max_length)[0] if eval_records else None
    if stats.truncated:
        ctx.log.say(f"truncated {stats.truncated} of {stats.examples} examples to train.max_length="
                    f"{max_length} tokens")
    prepared = ctx.apply_method(ctx.load_causal_lm())
    pad_id = tok.pad_token_id
    return Task(model=prepared.model, batches=ctx.batches(train_ex, lambda exs: pad_batch(exs, pad_id)),
                eval_examples=eval_ex, loss=lm_loss, save=prepared.save,
                summary={"data": stats.as_dict(), **prepared.summary})
