"""Token-level examples and the statistics every builder reports.

An example is a dict with ``input_ids`` and ``labels`` (the same length; ``-100`` marks a
position that carries no loss). Labels are *not* shifted: position t's label is the token
at t, and the loss predicts it from positions < t.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmtune.data.readers import Record
from lmtune.errors import InputError

IGNORE = -100


@dataclass
class BuildStats:
    """What happened while turning records into examples (logged and put in summary.json)."""

    examples: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return {"examples": self.examples, "truncated": self.truncated, "dropped": dict(self.dropped)}


def refuse_full_prompt(prompt_length: int, max_length: int, where: str) -> None:
    """Raise when a prompt leaves no room for a completion within ``train.max_length``.

    Raises:
        InputError: naming ``where`` (file and line) and both fixes.
    """
    if prompt_length >= max_length:
        raise InputError(f"{where}: the prompt has {prompt_length} tokens, which fills train.max_length={max_length} "
                         "and leaves no room for a completion; shorten the prompt or raise train.max_length")


def special_ids(tokenizer: Any) -> tuple[int | None, int | None]:
    """The (bos, eos) ids the examples are framed with; a word tokenizer may use BOS for both."""
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    return bos, eos


def encode(tokenizer: Any, text: str, what: str = "text", where: str | None = None) -> list[int]:
    """Token ids of ``text`` without any special tokens (framing is added explicitly).

    Args:
        tokenizer: the model's tokenizer.
        text: what to encode.
        what: what the text is, for the error ("completion", "assistant turn 2").
        where: the record's file and line, put first in the error (callers that learn it
            later prefix it themselves).

    Raises:
        InputError: the tokenizer cannot encode the text (e.g. a word-level vocabulary without
            an unknown-word token meets a new word), naming the words it cannot encode.
    """
    if not text:
        return []
    try:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    except Exception as e:  # tokenizers raises a bare Exception for words missing from a WordLevel vocabulary
        problem = f"the tokenizer cannot encode the {what}: {_encode_problem(tokenizer, text, e)}"
        raise InputError(f"{where}: {problem}" if where else problem) from None


def _encode_problem(tokenizer: Any, text: str, error: Exception) -> str:
    bad = []
    for word in dict.fromkeys(text.split()):
        try:
            tokenizer(word, add_special_tokens=False)
        except Exception:
            bad.append(word)
        if len(bad) == 5:
            break
    if not bad:
        return str(error)
    return (f"words not in its vocabulary: {', '.join(repr(w) for w in bad)}; "
            "the model knows only the words it was trained with")


def text_example(tokenizer: Any, text: str, max_length: int, stats: BuildStats) -> dict[str, list[int]] | None:
    """BOS + text + EOS, all positions carry loss; truncated from the end and counted."""
    bos, eos = special_ids(tokenizer)
    ids = ([bos] if bos is not None else []) + encode(tokenizer, text) + ([eos] if eos is not None else [])
    if len(ids) < 2:
        stats.drop("empty text")
        return None
    if len(ids) > max_length:
        ids = ids[:max_length]
        stats.truncated += 1
    stats.examples += 1
    labels = list(ids)
    if bos is not None:
        labels[0] = IGNORE  # nothing precedes BOS, so nothing predicts it
    return {"input_ids": ids, "labels": labels}


def text_examples(records: list[Record], tokenizer: Any, max_length: int,
                  stats: BuildStats | None = None) -> tuple[list[dict[str, list[int]]], BuildStats]:
    """Token examples from records with a string ``text`` field."""
    stats = stats or BuildStats()
    examples = []
    for rec in records:
        text = rec.fields.get("text")
        if not isinstance(text, str):
            raise InputError(f"{rec.where}: field 'text' must be a string, got "
                             f"{'nothing' if text is None else type(text).__name__}")
        try:
            ex = text_example(tokenizer, text, max_length, stats)
        except InputError as e:  # the tokenizer could not encode it: say which line
            raise InputError(f"{rec.where}: {e}") from None
        if ex is not None:
            examples.append(ex)
    return examples, stats
