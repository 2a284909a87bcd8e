"""What generation metrics feed the model and compare against: prompt ids and a reference per record.

- prompt/completion and Alpaca records: the prompt (after any few-shot prefix) is the prompt and
  the completion the reference. For a model with a chat template (``templated``) the prompt is
  rendered as one user turn with the template's generation prompt, exactly as ``objective=sft``
  trained on it and ``lmtune generate --chat`` asks; otherwise it is BOS + the raw text.
- chat (``messages``) records: the last assistant turn is the reference; the conversation before
  it, rendered with the template and its generation prompt, is the prompt.

Generation stops at the template's end-of-turn token (and EOS), so a chat model's answer is its
turn and nothing after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmtune.data.chat import end_of_turn_ids, has_chat_template, prompt_ids, render
from lmtune.data.examples import BuildStats, encode, special_ids
from lmtune.data.formats import Conversation, PromptCompletion, parse_records
from lmtune.data.readers import Record
from lmtune.errors import InputError


@dataclass(frozen=True)
class Case:
    """One record as generation metrics see it."""

    prompt_ids: list[int]  # what the model continues
    reference: str  # what its answer is compared with
    where: str


def parse_case(record: Record, fmt: str) -> PromptCompletion | Conversation:
    """The record parsed as ``objective=sft`` parses it; an empty reference is an error here.

    Raises:
        InputError: a malformed record, or an empty reference answer (naming the record).
    """
    samples = parse_records([record], fmt, BuildStats())
    if not samples:
        raise InputError(f"{record.where}: the reference answer is empty; drop the record or fill it in")
    return samples[0]


def generation_cases(records: list[Record], fmt: str, tokenizer: Any, prefixes: list[str],
                     templated: bool) -> list[Case]:
    """A ``Case`` per record (see the module docstring); few-shot prefixes go before the prompt.

    Raises:
        InputError: a malformed record, chat records without a chat template (or with few-shot
            prefixes), or text the tokenizer cannot encode.
    """
    samples = [parse_case(r, fmt) for r in records]
    if any(isinstance(s, Conversation) for s in samples):
        if not has_chat_template(tokenizer):
            raise InputError("chat records are answered through the model's chat template, and this tokenizer "
                             "has none; evaluate a model fine-tuned on chat data (it saves the template) or "
                             "convert the records to prompt/completion")
        if any(prefixes):
            raise InputError("--shots works with text, prompt/completion and alpaca data, not chat messages")
    cases = []
    for sample, prefix in zip(samples, prefixes, strict=True):
        if isinstance(sample, Conversation):
            turns, reference = sample.messages[:-1], sample.messages[-1]["content"]
            ids = encode(tokenizer, render(tokenizer, turns, True, sample.where), "prompt", sample.where)
        else:
            reference = sample.completion
            ids = prompt_ids(tokenizer, prefix + sample.prompt, templated, sample.where)
        cases.append(Case(ids, reference, sample.where))
    return cases


def answer_stops(tokenizer: Any, templated: bool) -> list[int]:
    """Token ids that end a generated answer: the template's end of turn and EOS, or EOS alone."""
    if templated:
        return end_of_turn_ids(tokenizer)
    eos = special_ids(tokenizer)[1]
    return [eos] if eos is not None else []
