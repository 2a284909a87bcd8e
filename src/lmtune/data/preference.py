"""Preference pairs: records -> token ids, batches of chosen+rejected, the batch layout.

A record holds ``chosen`` and ``rejected`` and usually a ``prompt``; each is a string or a
list of chat messages (``{"role", "content"}``, rendered with the tokenizer's chat template).
Without a prompt (the *implicit-prompt* form, ``chosen``/``rejected`` as whole texts sharing
a beginning), the prompt is the longest common prefix of the two token sequences.

A pair is ``{"prompt_ids", "chosen_ids", "rejected_ids"}``: ``prompt_ids`` starts with BOS,
completions end with EOS (when ``add_eos``; a reward model scores texts without it). A batch
stacks the B chosen rows and then the B rejected rows, so both go through one forward pass,
and labels mark only completion tokens: prompt and padding never count.
"""

from __future__ import annotations

from typing import Any

import torch

from lmtune.data.batching import pad_batch
from lmtune.data.chat import render
from lmtune.data.examples import IGNORE, BuildStats, encode, refuse_full_prompt, special_ids
from lmtune.data.readers import Record
from lmtune.errors import InputError

IDENTICAL = "identical chosen and rejected"


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _render(tokenizer: Any, messages: list[dict], where: str, generation_prompt: bool = False) -> list[int]:
    return encode(tokenizer, render(tokenizer, messages, generation_prompt, where), "conversation", where)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _split_ids(rec: Record, tokenizer: Any) -> tuple[list[int], list[int], list[int], bool]:
    """(prompt ids, chosen ids, rejected ids, whether completions still need EOS) for one record."""
    f, where = rec.fields, rec.where
    prompt, chosen, rejected = f.get("prompt"), f.get("chosen"), f.get("rejected")
    bos, _ = special_ids(tokenizer)
    framed = [bos] if bos is not None else []
    if isinstance(chosen, str) and isinstance(rejected, str):
        if prompt is None:  # implicit prompt: split two whole texts where they first differ
            full_c, full_r = framed + encode(tokenizer, chosen), framed + encode(tokenizer, rejected)
            k = _common_prefix(full_c, full_r)
            return full_c[:k], full_c[k:], full_r[k:], True
        if not isinstance(prompt, str):
            raise InputError(f"{where}: 'prompt' must be a string like 'chosen' and 'rejected', "
                             f"got {type(prompt).__name__}")
        return framed + encode(tokenizer, prompt), encode(tokenizer, chosen), encode(tokenizer, rejected), True
    if _is_messages(chosen) and _is_messages(rejected):
        # A chat template closes each turn itself, so no EOS is appended to its completions.
        if prompt is None:
            full_c, full_r = _render(tokenizer, chosen, where), _render(tokenizer, rejected, where)
            k = _common_prefix(full_c, full_r)
            return full_c[:k], full_c[k:], full_r[k:], False
        if not _is_messages(prompt):
            raise InputError(f"{where}: 'prompt' must be a list of chat messages like 'chosen' and 'rejected'")
        head = _render(tokenizer, prompt, where, generation_prompt=True)
        full_c, full_r = _render(tokenizer, prompt + chosen, where), _render(tokenizer, prompt + rejected, where)
        if full_c[:len(head)] != head or full_r[:len(head)] != head:
            # The template renders the conversation differently from its prompt alone: fall back
            # to the shared prefix, which still leaves out everything both completions share.
            k = min(_common_prefix(full_c, full_r), len(head))
            head = full_c[:k]
        return head, full_c[len(head):], full_r[len(head):], False
    missing = [k for k in ("chosen", "rejected") if f.get(k) is None]
    if missing:
        raise InputError(f"{where}: a preference pair needs {' and '.join(repr(m) for m in missing)} "
                         f"(fields present: {', '.join(sorted(f)) or 'none'})")
    raise InputError(f"{where}: 'chosen' and 'rejected' must both be strings or both be lists of chat messages "
                     f"({{'role': ..., 'content': ...}}), got {type(chosen).__name__} and {type(rejected).__name__}")


def split_prompt_completion(rec: Record, tokenizer: Any, max_length: int) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of an unpaired record (``prompt`` + ``completion``, KTO's data).

    Strings and chat messages are encoded exactly as one side of a preference pair (EOS added
    to string completions).

    Raises:
        InputError: no prompt, an empty completion, or a prompt that fills ``max_length``.
    """
    f = rec.fields
    if f.get("prompt") is None or f.get("completion") is None:
        missing = [k for k in ("prompt", "completion") if f.get(k) is None]
        raise InputError(f"{rec.where}: an unpaired example needs {' and '.join(repr(m) for m in missing)} "
                         f"(fields present: {', '.join(sorted(f)) or 'none'})")
    both_text = isinstance(f["prompt"], str) and isinstance(f["completion"], str)
    if not both_text and not (_is_messages(f["prompt"]) and _is_messages(f["completion"])):
        raise InputError(f"{rec.where}: 'prompt' and 'completion' must both be strings or both be lists of chat "
                         f"messages ({{'role': ..., 'content': ...}}), got {type(f['prompt']).__name__} and "
                         f"{type(f['completion']).__name__}")
    # One side of a pair whose other side is the same: the pair's encoding, reused as it is.
    side = Record({"prompt": f["prompt"], "chosen": f["completion"], "rejected": f["completion"]}, rec.where)
    try:
        prompt_ids, completion, _, needs_eos = _split_ids(side, tokenizer)
    except InputError as e:  # the tokenizer's complaint does not know the line; add it
        raise (e if str(e).startswith(rec.where) else InputError(f"{rec.where}: {e}")) from None
    if not completion:
        raise InputError(f"{rec.where}: the completion is empty; every example needs a non-empty completion")
    refuse_full_prompt(len(prompt_ids), max_length, rec.where)
    _, eos = special_ids(tokenizer)
    if needs_eos and eos is not None:
        completion = completion + [eos]
    return prompt_ids, completion


def build_pairs(records: list[Record], tokenizer: Any, max_length: int, add_eos: bool = True,
                margin: bool = False, stats: BuildStats | None = None) -> tuple[list[dict[str, Any]], BuildStats]:
    """Tokenize preference records into pairs.

    Pairs whose chosen and rejected are identical teach nothing and are skipped and counted
    (``stats.dropped``). Completions longer than the room left after the prompt are cut from
    the end and counted (``stats.truncated``).

    Args:
        records: records with ``chosen``, ``rejected`` and optionally ``prompt`` (and
            ``margin`` when ``margin`` is set).
        tokenizer: the model's tokenizer.
        max_length: most tokens of prompt + completion.
        add_eos: end each completion with EOS (DPO: the model learns to stop; reward: no).
        margin: read a numeric ``margin`` field into each pair.
        stats: counts to add to.

    Returns:
        ``(pairs, stats)``.

    Raises:
        InputError: a malformed record, an empty completion, or a prompt that leaves no room
            for a completion within ``max_length`` — each naming the file and line.
    """
    stats = stats or BuildStats()
    _, eos = special_ids(tokenizer)
    pairs = []
    for rec in records:
        try:
            prompt_ids, chosen, rejected, needs_eos = _split_ids(rec, tokenizer)
        except InputError as e:  # the tokenizer's complaint does not know the line; add it
            raise (e if str(e).startswith(rec.where) else InputError(f"{rec.where}: {e}")) from None
        if chosen == rejected:
            stats.drop(IDENTICAL)
            continue
        for name, ids in (("chosen", chosen), ("rejected", rejected)):
            if not ids:
                shared = "" if "prompt" in rec.fields else " once the prefix it shares with the other is removed"
                raise InputError(f"{rec.where}: the {name} completion is empty{shared}; every pair needs two "
                                 "non-empty completions")
        refuse_full_prompt(len(prompt_ids), max_length, rec.where)
        if add_eos and needs_eos and eos is not None:
            chosen, rejected = chosen + [eos], rejected + [eos]
        room = max_length - len(prompt_ids)
        if len(chosen) > room or len(rejected) > room:
            stats.truncated += 1
            chosen, rejected = chosen[:room], rejected[:room]
            if chosen == rejected:
                stats.drop(IDENTICAL + " within train.max_length")
                continue
        pair: dict[str, Any] = {"prompt_ids": prompt_ids, "chosen_ids": chosen, "rejected_ids": rejected}
        if margin:
            value = rec.fields.get("margin")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InputError(f"{rec.where}: reward.margin=true needs a numeric 'margin' field, got {value!r}")
            pair["margin"] = float(value)
        stats.examples += 1
        pairs.append(pair)
    return pairs, stats


def collate_pairs(pairs: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """One batch of 2B rows: the B chosen sequences, then the B rejected ones.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` (2B, T) with labels only on completion
        tokens; ``completion_lengths`` (2B,); ``num_loss_tokens`` = B (a pair is the loss
        unit); ``ref_chosen``/``ref_rejected`` (B,) when precomputed; ``margin`` (B,) if given.
    """
    rows = []
    for side in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            prompt = p["prompt_ids"]
            rows.append({"input_ids": prompt + p[side], "labels": [IGNORE] * len(prompt) + p[side]})
    batch = pad_batch(rows, pad_id)
    batch["completion_lengths"] = (batch["labels"] != IGNORE).sum(dim=1)  # (2B,)
    batch["num_loss_tokens"] = len(pairs)
    batch["num_tokens"] = int(batch["completion_lengths"].sum())  # what tokens_trained reports
    for key in ("ref_chosen", "ref_rejected", "margin"):
        if key in pairs[0]:
            batch[key] = torch.tensor([p[key] for p in pairs], dtype=torch.float32)  # (B,)
    return batch
