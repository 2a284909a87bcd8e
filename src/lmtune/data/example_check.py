"""Check one rendered training example the way a careful practitioner would, and show it by mask.

Before an instruction run trains, the first usable example is decoded and compared with the
record it came from (not with the code that labelled it):

- BOS appears once at the start (a template that writes BOS plus a tokenizer that adds it gives
  two, which the model never saw in pre-training) — a warning;
- every response (completion, or assistant turn) carries labels, and its end-of-turn token (or
  EOS) does too, else the model never learns to stop — an error;
- nothing else carries labels (the prompt, the template's role headers) — a warning naming the text.

``show_example`` renders the example token by token, labelled tokens in green and masked ones
dimmed (or, without colour, labelled runs between ``[[`` and ``]]``).
"""

from __future__ import annotations

from typing import Any

from lmtune.data.chat import end_of_turn_ids, has_chat_template
from lmtune.data.examples import IGNORE, special_ids
from lmtune.errors import InputError

GREEN, DIM, RESET = "\x1b[32m", "\x1b[2m", "\x1b[0m"


def _runs(labels: list[int]) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of consecutive labelled positions."""
    runs, start = [], None
    for i, label in enumerate([*labels, IGNORE]):
        if label != IGNORE and start is None:
            start = i
        elif label == IGNORE and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _squash(text: str) -> str:
    return " ".join(text.split())


def check_example(tokenizer: Any, example: dict[str, list[int]], responses: list[str], loss_on: str,
                  truncated: bool, where: str) -> list[str]:
    """Problems with one example, as warnings; the fatal one raises.

    Args:
        tokenizer: the run's tokenizer.
        example: ``{"input_ids", "labels"}`` as the objective built it.
        responses: the texts that should carry loss, in order (the completion, or each assistant turn).
        loss_on: ``response`` or ``all`` (then only BOS is checked).
        truncated: the example was cut at ``train.max_length`` (its end is not checked).
        where: the record, for messages.

    Returns:
        Warnings naming what is wrong (empty: the example is as it should be).

    Raises:
        InputError: a response's end-of-turn token carries no label (the model would not learn to stop).
    """
    ids, labels = example["input_ids"], example["labels"]
    warnings = []
    bos = special_ids(tokenizer)[0]
    if bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos:
        warnings.append(f"{where}: the example starts with BOS twice ({tokenizer.convert_ids_to_tokens(bos)} "
                        f"{tokenizer.convert_ids_to_tokens(bos)}); the template writes BOS and it is added again")
    if loss_on == "all":
        return warnings
    stops = set(end_of_turn_ids(tokenizer)) if has_chat_template(tokenizer) else set()
    eos = special_ids(tokenizer)[1]
    stops |= {eos} if eos is not None else set()
    runs = _runs(labels)
    texts = [_squash(tokenizer.decode(ids[a:b], skip_special_tokens=True)) for a, b in runs]
    wanted = [_squash(r) for r in responses]
    for (_, b), text in zip(runs, texts):
        if ids[b - 1] not in stops and not (truncated and b == len(ids)):
            raise InputError(f"{where}: the response {text!r} carries labels but the token that ends it does not "
                             f"(last labelled token {tokenizer.convert_ids_to_tokens(ids[b - 1])!r}), so the model "
                             "would never learn to stop; the chat template must close the assistant turn with a "
                             "special token (or EOS)")
    extra = [t for t in texts if t not in wanted]
    if extra and not truncated:
        warnings.append(f"{where}: labels cover text that is not a response: {extra[0]!r} (responses: {wanted}); "
                        "the loss would train the model to write it")
    missing = [w for w in wanted if w not in texts]
    if missing and not truncated:
        warnings.append(f"{where}: the response {missing[0]!r} carries no label; the model would not learn it")
    return warnings


def show_example(tokenizer: Any, example: dict[str, list[int]], color: bool) -> str:
    """The example token by token: labelled tokens green (or in ``[[ ]]``), masked ones dimmed."""
    ids, labels = example["input_ids"], example["labels"]
    pieces = []
    previous = False
    for t, label in zip(ids, labels):
        text = tokenizer.decode([t])
        on = label != IGNORE
        if color:
            pieces.append(f"{GREEN if on else DIM}{text}{RESET}")
        else:
            pieces.append(("[[" if on and not previous else "]]" if previous and not on else "") + text)
        previous = on
    if previous and not color:
        pieces.append("]]")
    return "".join(pieces)
