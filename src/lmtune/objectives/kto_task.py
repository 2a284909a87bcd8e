"""Objective ``kto``: unpaired feedback (prompt, completion, label true/false) through the one loop.

A record is ``{"prompt", "completion", "label"}``: a completion marked desirable (true) or
undesirable (false), each a string or chat messages as in preference pairs. A batch of B
examples also carries B *mismatched* rows — each prompt with the previous example's
completion (TRL's shift by one) — whose log-ratio under policy and reference estimates
KTO's reference point z. The policy runs on them without gradients, as z is a baseline.
"""

from __future__ import annotations

from typing import Any

import torch

from lmtune.data.batching import pad_batch
from lmtune.data.examples import IGNORE, BuildStats
from lmtune.data.preference import split_prompt_completion
from lmtune.data.readers import Record
from lmtune.errors import InputError
from lmtune.objectives.kto import kl_reference_point, kto_loss
from lmtune.objectives.lm import completion_logps
from lmtune.objectives.reference import Reference, disable_dropout
from lmtune.objectives.task import RunContext, Task

TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _label(rec: Record) -> bool:
    value = rec.fields.get("label")
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE + FALSE:  # CSV and Parquet strings
        return value.strip().lower() in TRUE
    raise InputError(f"{rec.where}: a KTO example needs 'label' true (desirable) or false (undesirable), "
                     f"got {value!r}")


def build_examples(records: list[Record], tokenizer: Any, max_length: int) -> tuple[list[dict[str, Any]], BuildStats]:
    """Tokenize unpaired records into ``{"prompt_ids", "completion_ids", "label"}``.

    Raises:
        InputError: a record without prompt, completion or a boolean label, an empty
            completion, or a prompt that fills ``max_length`` — naming file and line.
    """
    stats, examples = BuildStats(), []
    for rec in records:
        label = _label(rec)
        prompt_ids, completion = split_prompt_completion(rec, tokenizer, max_length)
        if len(completion) > max_length - len(prompt_ids):
            stats.truncated += 1
            completion = completion[:max_length - len(prompt_ids)]
        stats.examples += 1
        examples.append({"prompt_ids": prompt_ids, "completion_ids": completion, "label": label})
    return examples, stats


def collate_unpaired(examples: list[dict[str, Any]], pad_id: int, max_length: int) -> dict[str, Any]:
    """B labelled rows plus B mismatched rows (prompt i, completion i−1) for the KL estimate.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` (B, T) with labels on completion tokens;
        the same prefixed ``kl_`` for the mismatched rows; ``label`` (B,) bool;
        ``num_loss_tokens`` = B (an example is the loss unit); ``num_tokens``; ``num_input_tokens``.
    """
    def rows(completions: list[list[int]]) -> list[dict[str, Any]]:
        out = []
        for e, c in zip(examples, completions, strict=True):
            prompt = e["prompt_ids"]
            c = c[:max_length - len(prompt)]
            out.append({"input_ids": prompt + c, "labels": [IGNORE] * len(prompt) + c})
        return out

    completions = [e["completion_ids"] for e in examples]
    batch = pad_batch(rows(completions), pad_id)
    mismatched = pad_batch(rows(completions[-1:] + completions[:-1]), pad_id)
    batch.update({f"kl_{k}": mismatched[k] for k in ("input_ids", "attention_mask", "labels")})
    batch["label"] = torch.tensor([e["label"] for e in examples])  # (B,)
    batch["num_tokens"] = sum(map(len, completions))
    batch["num_loss_tokens"] = len(examples)
    # The policy reads the mismatched rows too (for the KL estimate): both count as input.
    batch["num_input_tokens"] = int(batch["attention_mask"].sum() + batch["kl_attention_mask"].sum())
    return batch


def build_task(ctx: RunContext) -> Task:
    """KTO task: labelled completions in, summed KTO loss over the batch's examples out."""
    cfg, tok = ctx.cfg, ctx.tokenizer
    loaded, max_length = {}, cfg.train.max_length
    for key in ("data.train", "data.eval"):
        records = ctx.records(key)
        if records is not None:
            loaded[key], stats = build_examples(records, tok, max_length)
            if stats.truncated:
                ctx.log.say(f"{ctx.source(key)}: cut {stats.truncated} completions to train.max_length={max_length}")
    train = loaded["data.train"]
    desirable = sum(e["label"] for e in train)
    ctx.log.say(f"kto: {desirable} desirable and {len(train) - desirable} undesirable examples")
    model = ctx.load_causal_lm()
    disable_dropout(model)
    prepared = ctx.apply_method(model)
    policy, pad_id = prepared.model, tok.pad_token_id
    reference = Reference(policy, ctx.method.adapter)
    beta, wd, wu = cfg.kto.beta, cfg.kto.desirable_weight, cfg.kto.undesirable_weight

    def loss(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        mismatched = {k[3:]: v for k, v in batch.items() if k.startswith("kl_")}
        logps = completion_logps(model, batch)  # (B,)
        with torch.no_grad():
            policy_kl = completion_logps(model, mismatched)  # (B,) z is a baseline: no gradient
        with reference.model(batch["input_ids"].device) as ref:
            ref_logps, ref_kl = completion_logps(ref, batch), completion_logps(ref, mismatched)  # (B,), (B,)
        kl = kl_reference_point(policy_kl, ref_kl)
        mean, metrics = kto_loss(logps, ref_logps, batch["label"], kl, beta, wd, wu)
        return mean * batch["num_loss_tokens"], metrics

    return Task(model=policy, batches=ctx.batches(train, lambda es: collate_unpaired(es, pad_id, max_length)),
                eval_examples=loaded.get("data.eval"), loss=loss, save=prepared.save,
                summary={"data": {"examples": len(train), "desirable": desirable},
                         "kto": {"beta": beta, "desirable_weight": wd, "undesirable_weight": wu}, **prepared.summary})
