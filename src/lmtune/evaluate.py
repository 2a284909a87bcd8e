"""``lmtune eval``: score a model (and adapter) on a data file, with or without few-shot prompts.

Which scoring runs depends on the metric (``lmtune.metrics.METRICS[name].needs``):

- ``loss`` (perplexity): exp of the token-weighted mean next-token loss over the tokens that
  carry loss: every token of text data, only the completion of prompt/completion data (the
  prompt is given, not predicted).
- ``text`` (exact_match, token_f1, bleu, rouge): greedy generation from each prompt, compared
  with the reference completion.
- ``labels`` / ``scores`` (accuracy, f1, auc): the classification head saved with the model,
  through ``lmtune.models.heads.predict``.

Few-shot mode (``shots=k``) is evaluation without training: k solved examples from
``shots_file`` are placed before every prompt. It scores the same metrics, so a user can see
whether fine-tuning beats prompting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lmtune.data.chat import chat_example_ids, has_chat_template
from lmtune.data.eval_cases import answer_stops, generation_cases, parse_case
from lmtune.data.examples import BuildStats, text_example
from lmtune.data.formats import detect_format, prompt_completion_ids, separator
from lmtune.data.readers import Record, read_records
from lmtune.distributed import pick_device
from lmtune.errors import InputError
from lmtune.generate import generate, max_context
from lmtune.methods.adapters import load_with_adapter
from lmtune.metrics import METRICS, check_metric_names
from lmtune.models.heads import predict
from lmtune.models.loading import context_length, resolve_model_dir
from lmtune.objectives.lm import EVAL_BATCH, perplexity
from lmtune.objectives.sft_task import sft_examples

SFT_FORMATS = ("prompt_completion", "alpaca")
SHOT_SEPARATOR = "\n"  # between solved examples; whitespace, so word-level tokenizers drop it


def parse_metrics(metrics: str | list[str]) -> list[str]:
    """Metric names from ``"a,b"`` or a list, validated (unknown names raise InputError)."""
    names = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    names = [n for n in names if n.strip()]
    if not names:
        raise InputError(f"--metrics is empty; choose from {', '.join(METRICS)}")
    return check_metric_names(names)


def prompt_pair(record: Record, fmt: str) -> tuple[str, str]:
    """(prompt, completion) of a prompt/completion or alpaca record, parsed as the SFT objective does.

    Raises:
        InputError: a missing or non-string field (naming the record).
    """

    sample = parse_case(record, fmt)
    return sample.prompt, sample.completion


def shot_text(record: Record, fmt: str) -> str:
    """One solved example as it appears in a few-shot prompt."""

    if fmt in SFT_FORMATS:
        prompt, completion = prompt_pair(record, fmt)
        return prompt + separator(prompt, completion) + completion
    return _text_field(record)


def few_shot_prefixes(data_records: list[Record], shots: int, shots_file: str | None,
                      data_path: str | None) -> list[str]:
    """The few-shot prefix for every evaluated record (``""`` when ``shots`` is 0).

    Shots are the first ``shots`` records of ``shots_file`` (default: the data itself; ``data_path``
    is its file, ``None`` for in-memory rows).
    When they come from the data file, a record never appears among its own shots: the
    next record takes its place.

    Raises:
        InputError: negative ``shots`` or too few examples to draw them from.
    """
    if shots < 0:
        raise InputError(f"--shots must be >= 0, got {shots}")
    if shots == 0:
        return [""] * len(data_records)

    same_file = shots_file is None or (data_path is not None
                                       and Path(shots_file).resolve() == Path(data_path).resolve())
    pool = data_records if same_file else read_records(shots_file)
    fmt = detect_format(pool)
    needed = shots + 1 if same_file else shots
    if len(pool) < needed:
        source = shots_file or data_path or "the data"
        raise InputError(f"--shots {shots} needs {needed} examples in {source}, which has {len(pool)}; "
                         "use fewer shots or a larger --shots-file")
    texts = [shot_text(r, fmt) for r in pool[:needed]]
    prefixes = []
    for i in range(len(data_records)):
        chosen = [t for j, t in enumerate(texts) if not (same_file and j == i)][:shots]
        prefixes.append(SHOT_SEPARATOR.join(chosen) + SHOT_SEPARATOR)
    return prefixes


def loss_examples(records: list[Record], fmt: str, tokenizer: Any, prefixes: list[str],
                  max_length: int | None, templated: bool = False) -> tuple[list[dict[str, list[int]]], BuildStats]:
    """Token examples whose labels mark exactly the tokens perplexity is measured on.

    Built by the training objectives' own code, so eval scores what training trained: text
    is BOS + text + EOS with every token after BOS scored (``objective=lm``); prompt/completion,
    alpaca and chat records score only the response (``objective=sft``; with ``templated``,
    prompt/completion records are rendered with the chat template as training renders them). A
    few-shot prefix is context only: it is never scored (with a template, it opens the user turn).

    Raises:
        InputError: a malformed record, chat data for a tokenizer without a chat template, or
            a few-shot example longer than the model's context.
    """

    stats = BuildStats()
    limit = max_length or 10**9
    if fmt == "messages":
        return _chat_examples(records, tokenizer, limit, prefixes, stats)
    examples = []
    for rec, prefix in zip(records, prefixes):
        if fmt == "text" and not prefix:
            ex = text_example(tokenizer, _text_field(rec), limit, stats)
        else:
            if fmt == "text":
                prompt, target = prefix, _text_field(rec)
            else:
                prompt, target = prompt_pair(rec, fmt)
                prompt = prefix + prompt
            # Without shots, a long example is cut as training cuts it; shots must not push it out.
            cut = 10**9 if prefix else limit
            if templated and fmt != "text":
                turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": target}]
                ex = chat_example_ids(tokenizer, turns, cut, stats, "response", rec.where)
            else:
                ex = prompt_completion_ids(tokenizer, prompt, target, cut, stats, "response", rec.where)
            if prefix and ex is not None and len(ex["input_ids"]) > limit:
                raise InputError(f"{rec.where}: {len(ex['input_ids'])} tokens with the few-shot examples, more "
                                 f"than the model's context of {limit}; use fewer --shots or shorter examples")
        if ex is not None:
            examples.append(ex)
    return examples, stats


def _chat_examples(records: list[Record], tokenizer: Any, limit: int, prefixes: list[str],
                   stats: BuildStats) -> tuple[list[dict[str, list[int]]], BuildStats]:
    if any(prefixes):
        raise InputError("--shots works with text, prompt/completion and alpaca data, not chat messages")
    if not has_chat_template(tokenizer):
        raise InputError("chat records are scored through the model's chat template, and this tokenizer has "
                         "none; evaluate a model fine-tuned on chat data (it saves the template) or convert "
                         "the records to prompt/completion")
    return sft_examples(records, "messages", tokenizer, limit, "response", stats)


def _text_field(rec: Record) -> str:
    text = rec.fields.get("text")
    if not isinstance(text, str):
        raise InputError(f"{rec.where}: field 'text' must be a string")
    return text


def generate_answers(model: Any, tokenizer: Any, prompts: list[list[int]], stops: list[int], max_new_tokens: int,
                     batch_size: int = EVAL_BATCH) -> list[str]:
    """Greedy continuation of every prompt (token ids), decoded without special tokens.

    Prompts are batched only with prompts of the same token length, so no row is padded
    and a batched answer is exactly the answer the prompt gets alone.
    """

    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(i)
    answers: list[str] = [""] * len(prompts)
    for rows in by_length.values():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            new = generate(model, [prompts[i] for i in chunk], max_new_tokens=max_new_tokens, stop_ids=stops)
            for i, ids in zip(chunk, new):
                answers[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
    return answers


def run_eval(model: str | Path | nn.Module | None, adapter: str | Path | None, data: str | Path | list[Record],
             metrics: str | list[str] = "perplexity", shots: int = 0, shots_file: str | None = None,
             max_new_tokens: int = 32, tokenizer: Any = None, chat: bool = True) -> dict[str, Any]:
    """Evaluate ``model`` (+ ``adapter``) on ``data`` with the named metrics.

    For a model with a chat template, prompt/completion and Alpaca prompts are rendered with it
    (as ``objective=sft`` trains on them) unless ``chat`` is false; chat records always are.

    Args:
        model: local model folder (``None``: the shipped model), or an in-memory causal LM
            (then ``tokenizer`` is required, and it is scored on the device it is on).
        adapter: adapter folder to apply without merging, or ``None`` (folders only).
        data: evaluation file, or records (``lmtune.data.readers.records_from_rows``): text,
            prompt/completion, alpaca, chat, or text+label records.
        metrics: comma-separated names or a list (see ``lmtune.metrics.METRICS``).
        shots: few-shot mode: solved examples placed before every prompt (0: off).
        shots_file: where the solved examples come from (default: ``data``).
        max_new_tokens: generation length cap for text metrics.
        tokenizer: the in-memory model's tokenizer.
        chat: render prompts with the model's chat template when it has one (``--no-chat``: raw text).

    Returns:
        A flat dict: each metric's value, plus ``examples``, ``shots``, ``chat_template``
        (whether prompts were rendered with it) and, with perplexity, ``loss`` and ``tokens``.

    Raises:
        InputError: unknown metric, empty or unreadable data, a metric the data cannot
            support, labels the model never saw in training, too many shots.
    """
    names = parse_metrics(metrics)
    in_memory = isinstance(data, list)
    records = data if in_memory else read_records(data)
    data = "the data" if in_memory else str(data)  # how messages name it
    fmt = detect_format(records)
    needs = {METRICS[n].needs for n in names}
    if needs & {"labels", "scores"}:
        if needs - {"labels", "scores"}:
            raise InputError(f"{', '.join(names)}: accuracy, f1 and auc score a classifier; evaluate them "
                             "separately from perplexity and generation metrics")
        if shots:
            raise InputError("--shots applies to perplexity and generation metrics, not to a classification head")
        if isinstance(model, nn.Module):
            raise InputError(f"{', '.join(names)} read the classification head saved with a model folder; pass the "
                             "folder (an objective=classify run's output_dir) as model")
        return classification_metrics(model, adapter, records, fmt, names, data)
    if fmt == "classification":
        raise InputError(f"{data} holds text+label records; score them with --metrics accuracy,f1,auc")
    if fmt not in ("text", "messages", *SFT_FORMATS):
        raise InputError(f"{data}: lmtune eval reads text, prompt/completion, alpaca or chat records (this file "
                         f"is {fmt}); convert it, e.g. to {{\"prompt\": ..., \"completion\": ...}} lines")
    if "text" in needs and fmt == "text":
        text_metrics = ", ".join(n for n in names if METRICS[n].needs == "text")
        raise InputError(f"{text_metrics} compare a generated answer with a reference, so {data} needs "
                         "prompt+completion, instruction+output or chat records (the last assistant turn is the "
                         "reference); text data supports perplexity only")
    if fmt == "messages" and not chat:
        raise InputError(f"{data} holds chat records, which only the model's chat template can render; "
                         "leave out --no-chat (chat=False), or convert the records to prompt/completion")

    prefixes = few_shot_prefixes(records, shots, shots_file, None if in_memory else data)
    for rec in records if "text" in needs else []:
        parse_case(rec, fmt)  # malformed rows fail before the model loads
    lm, tokenizer, context = _load(model, adapter, tokenizer)
    templated = chat and has_chat_template(tokenizer)
    results: dict[str, Any] = {"examples": len(records), "shots": shots, "chat_template": templated}
    if "loss" in needs:
        examples, stats = loss_examples(records, fmt, tokenizer, prefixes, context, templated)
        if not examples:
            raise InputError(f"{data}: no example has a token to score (empty texts or responses)")
        scored = perplexity(lm, examples, tokenizer.pad_token_id)
        results.update(perplexity=scored["perplexity"], loss=scored["loss"], tokens=scored["tokens"])
        if stats.truncated or stats.dropped:
            results.update(truncated=stats.truncated, dropped=sum(stats.dropped.values()))
    if "text" in needs:
        cases = generation_cases(records, fmt, tokenizer, prefixes, templated)
        answers = generate_answers(lm, tokenizer, [c.prompt_ids for c in cases], answer_stops(tokenizer, templated),
                                   max_new_tokens)
        references = [c.reference for c in cases]
        for name in names:
            if METRICS[name].needs == "text":
                results[name] = METRICS[name].fn(answers, references)
    return {**{n: results[n] for n in names}, **{k: v for k, v in results.items() if k not in names}}


def _load(model: str | Path | nn.Module | None, adapter: str | Path | None,
          tokenizer: Any) -> tuple[Any, Any, int | None]:
    """The model to score, its tokenizer and context: from folders, or the caller's own objects as they are."""
    lm, tokenizer, folder = load_with_adapter(model, adapter, tokenizer=tokenizer)
    if folder is None:
        return lm, tokenizer, max_context(lm)
    lm.to(pick_device())
    lm.eval()
    return lm, tokenizer, context_length(folder)


def classification_metrics(model: str | None, adapter: str | None, records: list[Record], fmt: str,
                           names: list[str], data: str) -> dict[str, Any]:
    """accuracy / f1 / auc from the classification head saved with the model.

    Raises:
        InputError: the data is not text+label, or (from
            ``heads.predict``) the data holds labels the head was never trained on.
    """
    if fmt != "classification":
        raise InputError(f"{', '.join(names)} need text+label records; {data} holds {fmt} records")

    # Indices into label_names; predict refuses labels the head never saw, naming each with its line.
    truth, pred, probs, label_names = predict(resolve_model_dir(model), adapter, records)
    results: dict[str, Any] = {}
    for name in names:
        metric = METRICS[name]
        results[name] = metric.fn(truth, probs) if metric.needs == "scores" else metric.fn(truth, pred)
    results.update(examples=len(records), labels=list(label_names))
    return results
