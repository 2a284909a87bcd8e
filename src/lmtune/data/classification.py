"""Classification records -> token examples: labels mapped to class indices, tasks kept apart.

A record has ``text`` (optionally ``text_pair``) and ``label``, a string or an integer; with
several tasks in one file, each record also names its ``task``. Labels are kept as strings
(``1`` and ``"1"`` are the same class, so a JSONL train file and a CSV eval file agree) and
numbered in sorted order — numerically when every label is an integer — so the class index of
a label does not depend on which record happened to come first.

Encoders frame the text the way their tokenizer does (``[CLS] a [SEP] b [SEP]`` with token
types); causal LMs get ``BOS a EOS b`` and are read at the last token, which has seen it all.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lmtune.data.batching import pad_rows
from lmtune.data.examples import BuildStats, encode, special_ids
from lmtune.data.readers import Record
from lmtune.errors import InputError

TASK_FIELD = "task"


def label_key(value: Any, where: str) -> str:
    """The class a record's ``label`` names, as a string (``1``, ``1.0`` and ``"1"`` agree).

    Raises:
        InputError: the label is missing, empty, a boolean, a fraction or another type.
    """
    if isinstance(value, bool) or value is None:
        raise InputError(f"{where}: field 'label' must be a string or an integer, got "
                         f"{'nothing' if value is None else repr(value)}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # Parquet/pandas write integer columns with gaps as floats
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise InputError(f"{where}: field 'label' must be a non-empty string or an integer, got {value!r}")


def label_names(keys: Iterable[str]) -> list[str]:
    """The sorted class names; numerically sorted when all are integers (so "10" follows "9")."""
    uniq = set(keys)
    if all(k.lstrip("-").isdigit() for k in uniq):
        return sorted(uniq, key=int)
    return sorted(uniq)


def check_classes(names: list[str], source: str, task: str | None) -> None:
    """Refuse a label column with fewer than two classes."""
    if len(names) < 2:
        which = f" of task '{task}'" if task else ""
        raise InputError(f"{source}: the label column{which} holds one class ({names[0]!r}); a classifier needs "
                         "examples of at least two classes")


def check_known(records: list[Record], names: list[str], source: str, task: str | None = None) -> None:
    """Refuse labels the head never saw in training, naming each and where it first occurs."""
    known = set(names)
    unseen: dict[str, str] = {}
    for rec in records:
        key = label_key(rec.fields.get("label"), rec.where)
        if key not in known:
            unseen.setdefault(key, rec.where)
    if unseen:
        which = f" of task '{task}'" if task else ""
        listed = ", ".join(f"{k!r} ({w})" for k, w in unseen.items())
        raise InputError(f"{source}: labels never seen in training{which}: {listed}. The head knows only: "
                         f"{', '.join(names)}. Drop those rows or train with them.")


def record_text(rec: Record) -> tuple[str, str | None]:
    """``(text, text_pair)`` of a record, checked."""
    text, pair = rec.fields.get("text"), rec.fields.get("text_pair")
    if not isinstance(text, str):
        raise InputError(f"{rec.where}: field 'text' must be a string, got "
                         f"{'nothing' if text is None else type(text).__name__}")
    if pair is not None and not isinstance(pair, str):
        raise InputError(f"{rec.where}: field 'text_pair' must be a string, got {type(pair).__name__}")
    return text, pair


def encode_input(tokenizer: Any, text: str, pair: str | None, max_length: int, encoder: bool,
                 stats: BuildStats) -> dict[str, list[int]] | None:
    """Token ids (and token types for encoders) of one input, truncated to ``max_length``."""
    if encoder:
        enc = tokenizer(text, pair)
        if len(enc["input_ids"]) > max_length:
            enc = tokenizer(text, pair, truncation=True, max_length=max_length)
            stats.truncated += 1
        out = {"input_ids": list(enc["input_ids"])}
        if "token_type_ids" in enc:
            out["token_type_ids"] = list(enc["token_type_ids"])
    else:
        bos, eos = special_ids(tokenizer)
        ids = ([bos] if bos is not None else []) + encode(tokenizer, text)
        if pair is not None:
            ids += ([eos] if eos is not None else []) + encode(tokenizer, pair)
        if len(ids) > max_length:
            ids = ids[:max_length]
            stats.truncated += 1
        out = {"input_ids": ids}
    if not out["input_ids"]:
        stats.drop("empty text")
        return None
    stats.examples += 1
    return out


def build_examples(records: list[Record], tokenizer: Any, max_length: int, encoder: bool, names: list[str],
                   task: int, stats: BuildStats) -> list[dict[str, Any]]:
    """Examples of one task: ``input_ids`` [+ ``token_type_ids``], ``label`` (class index), ``task``."""
    index = {n: i for i, n in enumerate(names)}
    examples = []
    for rec in records:
        label = index[label_key(rec.fields.get("label"), rec.where)]
        try:
            ex = encode_input(tokenizer, *record_text(rec), max_length, encoder, stats)
        except InputError as e:  # the tokenizer's complaint does not know the line; add it
            raise (e if str(e).startswith(rec.where) else InputError(f"{rec.where}: {e}")) from None
        if ex is not None:
            examples.append({**ex, "label": label, "task": task})
    return examples


def collate(examples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-padded batch; one loss unit per example.

    Returns:
        ``input_ids`` (B, T), ``attention_mask`` (B, T), ``token_type_ids`` (B, T) when the
        examples have them, ``labels`` (B,), ``task`` (B,) and ``num_loss_tokens`` = B.
    """
    ids, mask = pad_rows([e["input_ids"] for e in examples], pad_id)  # (B, T)
    batch = {"input_ids": ids, "attention_mask": mask,
             "labels": torch.tensor([e["label"] for e in examples]),  # (B,)
             "task": torch.tensor([e["task"] for e in examples]),  # (B,)
             "num_loss_tokens": len(examples),
             "num_tokens": int(mask.sum())}  # what tokens_trained reports
    if "token_type_ids" in examples[0]:
        batch["token_type_ids"] = pad_rows([e["token_type_ids"] for e in examples], 0)[0]  # (B, T)
    return batch
