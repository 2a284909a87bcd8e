"""Instruction data: records -> prompt/response samples -> token examples with response-only labels.

Three record formats become two kinds of sample:

- ``prompt_completion`` (``prompt``, ``completion``) and ``alpaca`` (``instruction``, optional
  ``input``, ``output``) become a ``PromptCompletion``: plain text, no chat template.
- ``messages`` (``role``/``content``) and ShareGPT ``conversations`` (``from``/``value``) become a
  ``Conversation`` of ``{"role", "content"}`` turns, rendered later by ``lmtune.data.chat``.
  Content may also be a list of parts (``[{"type": "text", "text": ...}]``): the text parts are
  joined by newlines, any other part type (an image) is refused.

A record that is *malformed* (a missing or non-string field, an unknown role, a conversation
that does not end with an assistant turn) is an ``InputError`` naming the row and field: the
file is wrong and training on a guess would hide it. A well-formed record with nothing to learn
(an empty response) is dropped and counted in ``BuildStats``.

Token examples are built from token ids, never by re-tokenizing a joined string: the prompt and
the response are encoded separately and concatenated, so the boundary is exact even for
tokenizers that would merge across it, and the prompt's ids are the ones generation will see.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmtune.data.examples import IGNORE, BuildStats, encode, special_ids
from lmtune.data.readers import Record
from lmtune.errors import InputError

# ShareGPT speaker names -> the role names chat templates expect.
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}

DROP_EMPTY = "empty response"
DROP_CUT = "response cut off by train.max_length"


@dataclass(frozen=True)
class PromptCompletion:
    """A plain-text prompt and the response the model should learn to give."""

    prompt: str
    completion: str
    where: str


@dataclass(frozen=True)
class Conversation:
    """Chat turns ``[{"role": "system"|"user"|"assistant", "content": str}, ...]`` ending with the assistant."""

    messages: list[dict[str, str]]
    where: str


Sample = PromptCompletion | Conversation


def parse_records(records: list[Record], fmt: str, stats: BuildStats) -> list[Sample]:
    """Turn records of format ``fmt`` into samples; empty responses are dropped and counted.

    Args:
        records: as read by ``lmtune.data.readers.read_records``.
        fmt: ``prompt_completion``, ``alpaca`` or ``messages``.
        stats: receives the drop counts.

    Raises:
        InputError: a malformed record, naming its row and field.
    """
    parse = {"prompt_completion": _prompt_completion, "alpaca": _alpaca, "messages": _conversation}.get(fmt)
    if parse is None:
        raise InputError(f"data.format={fmt} is not an instruction format; objective=sft reads "
                         "prompt_completion, alpaca or messages")
    samples = []
    for rec in records:
        sample = parse(rec)
        if _has_empty_response(sample):
            stats.drop(DROP_EMPTY)
            continue
        samples.append(sample)
    return samples


def _text(rec: Record, key: str, fields: dict[str, Any] | None = None, required: bool = True,
          where: str | None = None) -> str:
    """A string field, or an error naming the row and the field."""
    fields = rec.fields if fields is None else fields
    where = where or rec.where
    value = fields.get(key)
    if value is None:
        if not required:
            return ""
        raise InputError(f"{where}: field '{key}' is missing; present: {sorted(fields)}")
    if not isinstance(value, str):
        raise InputError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON "\ud800" escapes decode to lone surrogates, which no tokenizer takes
        raise InputError(f"{where}: field '{key}' holds characters that are not valid Unicode "
                         "(an unpaired surrogate escape); fix the text") from None
    return value


def _prompt_completion(rec: Record) -> PromptCompletion:
    return PromptCompletion(_text(rec, "prompt"), _text(rec, "completion"), rec.where)


def _alpaca(rec: Record) -> PromptCompletion:
    # Instruction and input joined by a newline: no fixed English preamble, so any vocabulary
    # (the shipped word-level one included) can encode it.
    instruction, extra = _text(rec, "instruction"), _text(rec, "input", required=False)
    prompt = instruction if not extra.strip() else f"{instruction}\n{extra}"
    return PromptCompletion(prompt, _text(rec, "output"), rec.where)


def _conversation(rec: Record) -> Conversation:
    key = "messages" if "messages" in rec.fields else "conversations"
    role_key, content_key = ("role", "content") if key == "messages" else ("from", "value")
    turns = rec.fields.get(key)
    if turns is None:
        raise InputError(f"{rec.where}: field 'messages' (or 'conversations') is missing; "
                         f"present: {sorted(rec.fields)}")
    if not isinstance(turns, list) or not turns:
        raise InputError(f"{rec.where}: field '{key}' must be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        where = f"{rec.where}, {key}[{i}]"
        if not isinstance(turn, dict):
            raise InputError(f"{where}: a turn must be an object with '{role_key}' and '{content_key}'")
        speaker = _text(rec, role_key, turn, where=where)
        role = ROLES.get(speaker.strip().lower())
        if role is None:
            raise InputError(f"{where}: unknown role '{speaker}'; use one of {', '.join(ROLES)}")
        content = turn.get(content_key)
        text = (_joined_parts(rec, content, f"{where}.{content_key}") if isinstance(content, list)
                else _text(rec, content_key, turn, where=where))
        messages.append({"role": role, "content": text})
    if messages[-1]["role"] != "assistant":
        raise InputError(f"{rec.where}: the conversation ends with a '{messages[-1]['role']}' turn; it must end "
                         "with an assistant turn (the response to learn) — remove the trailing turns")
    return Conversation(messages, rec.where)


def _joined_parts(rec: Record, parts: list[Any], where: str) -> str:
    """Message content given as a list of parts: the text parts, joined by newlines.

    ``[{"type": "text", "text": ...}, ...]`` is the OpenAI/HF multimodal chat format, common in
    public datasets; vLLM joins text parts the same way for a text-only template.

    Raises:
        InputError: a part that is not an object, or not of type ``text`` (images, audio:
            lmtune trains text models), naming the part.
    """
    texts = []
    for j, part in enumerate(parts):
        here = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise InputError(f"{here}: a content part must be an object like {{'type': 'text', 'text': ...}}, "
                             f"got {type(part).__name__}")
        kind = part.get("type")
        if kind != "text":
            raise InputError(f"{here}: content part of type {kind!r} is not supported; lmtune trains on text, so "
                             "only parts with 'type': 'text' are accepted — drop the other parts or the row")
        texts.append(_text(rec, "text", part, where=here))
    return "\n".join(texts)


def _has_empty_response(sample: Sample) -> bool:
    if isinstance(sample, PromptCompletion):
        return not sample.completion.strip()
    return any(not m["content"].strip() for m in sample.messages if m["role"] == "assistant")


def separator(prompt: str, completion: str) -> str:
    """``" "`` between prompt and completion unless one side already has whitespace there."""
    if not prompt or prompt[-1].isspace() or completion[:1].isspace():
        return ""
    return " "


def prompt_completion_ids(tokenizer: Any, prompt: str, completion: str, max_length: int, stats: BuildStats,
                          loss_on: str = "response", where: str = "example") -> dict[str, list[int]] | None:
    """One token example: BOS + prompt, then completion + EOS carrying the loss.

    The prompt and the completion (with its separating space, see ``separator``) are encoded
    separately and their ids concatenated, so the prompt part is exactly what ``generate``
    feeds the model and no token straddles the boundary. Preference tuning calls this for
    ``prompt``+``chosen`` and ``prompt``+``rejected``.

    Args:
        tokenizer: a Hugging Face tokenizer.
        prompt: the text the model is given.
        completion: the text it should produce (non-empty).
        max_length: longer examples keep their start and are counted as truncated.
        stats: receives ``examples``, ``truncated`` and drop counts.
        loss_on: ``response`` (labels on completion + EOS only) or ``all``.
        where: the row, for error messages.

    Returns:
        ``{"input_ids", "labels"}``, or ``None`` (counted in ``stats``) when the completion is
        empty or ``max_length`` cuts it off entirely.

    Raises:
        InputError: the tokenizer has neither EOS nor BOS, or cannot encode the text.
    """
    if not completion.strip():
        stats.drop(DROP_EMPTY)
        return None
    bos, eos = special_ids(tokenizer)
    if eos is None:
        raise InputError("the tokenizer has no EOS (or BOS) token, so the model could not learn to stop; "
                         "give the tokenizer an eos_token")
    head = ([bos] if bos is not None else []) + encode(tokenizer, prompt, "prompt", where)
    tail = encode(tokenizer, separator(prompt, completion) + completion, "completion", where) + [eos]
    return finish_example(head + tail, [False] * len(head) + [True] * len(tail), max_length, stats, loss_on)


def finish_example(ids: list[int], trained: list[bool], max_length: int, stats: BuildStats,
                   loss_on: str) -> dict[str, list[int]] | None:
    """Labels from a per-token "is response" mask, then truncation (kept start) and drop accounting.

    Position 0 never carries a label: nothing precedes it, and in a packed row its label would
    be predicted from the previous example.

    Returns:
        The example, or ``None`` when no response token survives truncation (counted).
    """
    cut = len(ids) > max_length
    ids, trained = ids[:max_length], trained[:max_length]
    labels = [t if (loss_on == "all" or keep) else IGNORE for t, keep in zip(ids, trained)]
    labels[0] = IGNORE
    if all(label == IGNORE for label in labels):
        stats.drop(DROP_CUT)
        return None
    stats.truncated += cut
    stats.examples += 1
    return {"input_ids": ids, "labels": labels}


def detect_format(records: list[Record]) -> str:
    """The data format implied by the first record's fields."""
    fields = set(records[0].fields)
    if {"chosen", "rejected"} <= fields:
        return "preference"
    if "messages" in fields or "conversations" in fields:
        return "messages"
    if "instruction" in fields and "output" in fields:
        return "alpaca"
    if {"prompt", "completion", "label"} <= fields:
        return "unpaired_preference"
    if {"prompt", "completion"} <= fields:
        return "prompt_completion"
    if "label" in fields and ("text" in fields or "text_pair" in fields):
        return "classification"
    if "text" in fields:
        return "text"
    if "prompt" in fields:
        return "prompts"
    raise InputError(f"{records[0].where}: cannot tell the data format from the fields {sorted(fields)}; "
                     "expected text, prompt+completion, instruction+output, messages, prompt+chosen+rejected, "
                     "prompt+completion+label, or text+label — or set data.format")
