"""Objective ``sft``: instruction tuning with the loss on the response only.

Records (prompt/completion, Alpaca, chat messages) become token examples whose labels cover the
completion or every assistant turn, plus the EOS / end-of-turn token that teaches the model to
stop (``train.loss_on=all`` trains every token). Chat data is rendered with the tokenizer's own
template, or ChatML added for the occasion (see ``lmtune.data.chat``). With ``train.packing``
several examples share a row without attending to each other (``lmtune.data.packing``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

from lmtune.data.batching import pad_batch
from lmtune.data.chat import chat_example_ids
from lmtune.data.example_check import check_example, show_example
from lmtune.data.examples import BuildStats
from lmtune.data.formats import Conversation, PromptCompletion, parse_records, prompt_completion_ids
from lmtune.data.packing import ATTENTION_NAME, BLOCK_MASK, collate_packed, pack_examples, packed_attention
from lmtune.data.readers import Record
from lmtune.data.templates import apply_chat_setting
from lmtune.errors import InputError
from lmtune.methods.adapter_files import save_new_token_rows
from lmtune.methods.prepared import Prepared
from lmtune.methods.token_rows import wrap_token_rows
from lmtune.models.loading import param_counts
from lmtune.objectives.lm import lm_loss
from lmtune.objectives.task import RunContext, Task, TrainingError


def as_turns(sample: PromptCompletion) -> list[dict[str, str]]:
    """A prompt/completion sample as the conversation a chat model sees: one user turn, one assistant turn."""
    return [{"role": "user", "content": sample.prompt}, {"role": "assistant", "content": sample.completion}]


def sft_examples(records: list[Record], fmt: str, tokenizer: Any, max_length: int, loss_on: str,
                 stats: BuildStats | None = None,
                 templated: bool = False) -> tuple[list[dict[str, list[int]]], BuildStats]:
    """Token examples with response-only (or all-token) labels from instruction records.

    With ``templated``, prompt/completion (and Alpaca) records are rendered with the tokenizer's
    chat template as a user and an assistant turn; their labels still come from token ids
    (``lmtune.data.chat.conversation_ids``). Chat records always are.

    Returns:
        The examples and the ``BuildStats`` (examples, truncated, dropped by reason).

    Raises:
        InputError: a malformed record (named), or text the tokenizer cannot encode.
    """
    stats = stats or BuildStats()
    examples = []
    for sample in parse_records(records, fmt, stats):
        if isinstance(sample, Conversation) or templated:
            turns = sample.messages if isinstance(sample, Conversation) else as_turns(sample)
            ex = chat_example_ids(tokenizer, turns, max_length, stats, loss_on, sample.where)
        else:
            ex = prompt_completion_ids(tokenizer, sample.prompt, sample.completion, max_length, stats, loss_on,
                                       sample.where)
        if ex is not None:
            examples.append(ex)
    return examples, stats


def sft_loss(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """``lm_loss``, with per-example attention when the batch is packed (has ``position_ids``).

    On CPU one attention call per layer with a block-diagonal mask measured 1.7x faster than one
    call per example (benchmarks/sft_packing.py: the CPU kernel's per-call cost barely depends on
    length); on GPU the per-example calls keep memory at Σ Lᵢ² (not measured here).
    """
    if batch.get("position_ids") is None:
        return lm_loss(model, batch)
    on_cpu = batch["input_ids"].device.type == "cpu"
    with packed_attention(model, BLOCK_MASK if on_cpu else ATTENTION_NAME):
        return lm_loss(model, batch)


def sft_collate(pad_id: int, cause: str) -> Any:
    """Packed rows (they carry ``position_ids``) or plain examples -> a batch; no loss token is an error."""
    def run(items: list[dict[str, list[int]]]) -> dict[str, Any]:
        batch = collate_packed(items, pad_id) if "position_ids" in items[0] else pad_batch(items, pad_id)
        if batch["num_loss_tokens"] == 0:
            raise TrainingError(f"a batch of {len(items)} examples has no token that carries loss: {cause}")
        return batch
    return run


def train_new_token_rows(model: Any, new_ids: list[int], vocab: int) -> int:
    """Let only the embedding rows of ``new_ids`` train, in input and (untied) output embeddings.

    Methods that freeze the embeddings (freeze, LoRA, QLoRA, prompt tuning) would otherwise
    leave freshly added tokens such as ``<|im_end|>`` at their initial values. The other rows
    get a zero gradient, so Adam leaves them unchanged (weight decay would not: the caller
    refuses ``train.weight_decay > 0`` in this case).

    Returns:
        The number of embedding rows made trainable (0 when the method already trains them).
    """
    # A QLoRA layer's wrapped nn.Linear has weight None (its weight lives in 4 bits): skip it.
    weights = {id(p): p for m in model.modules() if isinstance(m, (torch.nn.Embedding, torch.nn.Linear))
               for p in [m.weight] if p is not None and p.shape[0] == vocab and not p.requires_grad}
    keep = torch.zeros(vocab, 1)  # (V, 1) broadcast over the hidden size
    keep[new_ids] = 1.0
    for p in weights.values():
        p.requires_grad_(True)
        p.register_hook(lambda g: g * keep.to(g.device, g.dtype))
    return len(new_ids) * len(weights)


def build_task(ctx: RunContext) -> Task:
    """SFT task: response-only labels, EOS that carries loss, optional packing."""
    cfg, tok, log = ctx.cfg, ctx.tokenizer, ctx.log
    fmt, loss_on, packing = cfg.data.format, cfg.train.loss_on, cfg.train.packing
    if packing and cfg.method == "prompt_tuning":
        raise InputError("train.packing=true does not work with method=prompt_tuning: the soft prompt is "
                         "prepended once per row, so packed examples would share it; set train.packing=false")
    choice = apply_chat_setting(tok, cfg.data.chat_template, fmt)
    added = list(choice.added)
    log.say(f"chat template: {choice.source}")
    # LoRA and QLoRA train the new rows as their own tensors (PEFT's trainable_token_indices); freeze
    # and prompt tuning keep the embeddings frozen and let the new rows train through a gradient mask.
    own_rows = ctx.method.adapter and cfg.method != "prompt_tuning"
    if added and cfg.method != "full" and not own_rows and cfg.train.weight_decay > 0:
        raise InputError(f"the tokenizer needs new chat tokens ({', '.join(added)}) whose embeddings must train, "
                         f"but method={cfg.method} keeps the other rows frozen only without weight decay; "
                         "set train.weight_decay=0, use method=full, or use a model whose tokenizer has a chat "
                         "template")
    max_length = cfg.train.max_length  # already clamped to the model's context by lmtune.run
    train_ex, stats = sft_examples(ctx.records("data.train"), fmt, tok, max_length, loss_on,
                                   templated=choice.templated)
    if not train_ex:
        raise InputError(f"{ctx.source('data.train')}: no usable examples ({stats.examples} kept, dropped: "
                         f"{stats.dropped or 'none'})")
    example = _check_first_example(ctx, ctx.records("data.train"), max_length, choice.templated)
    eval_records = ctx.records("data.eval")
    eval_ex = (sft_examples(eval_records, fmt, tok, max_length, loss_on, templated=choice.templated)[0]
               if eval_records else None)
    _report(log, stats, max_length)

    model = ctx.load_causal_lm()
    rows_before = model.get_input_embeddings().weight.shape[0]
    if len(tok) > rows_before:
        model.resize_token_embeddings(len(tok))
        log.say(f"no chat template: using ChatML; added {', '.join(added)} to the tokenizer and resized the "
                f"embeddings {rows_before} -> {len(tok)}")
    prepared = ctx.apply_method(model)
    if added and own_rows:
        tensors = wrap_token_rows(prepared.model, tok.convert_tokens_to_ids(added))
        log.say(f"method={cfg.method}: training the rows of the new chat tokens only ({len(tensors)} × {len(added)} "
                "rows, saved as PEFT trainable_token_indices with the tokenizer and its chat template)")
        prepared = _save_new_rows_too(prepared, added)
    elif added:
        rows = train_new_token_rows(prepared.model, tok.convert_tokens_to_ids(added), len(tok))
        if rows:
            log.say(f"method={cfg.method} freezes the embeddings: training only the {rows} embedding rows of "
                    "the new chat tokens (the other rows get no gradient)")
        if ctx.method.adapter:  # the saved output is an adapter: it must carry the new rows
            log.say("the adapter will also carry the input embedding and output head (PEFT modules_to_save) with "
                    "the new chat tokens' rows, and the tokenizer with the chat template")
            prepared = _save_new_rows_too(prepared, added, rows)

    cause = (f"every label is -100 (train.loss_on={loss_on}, train.max_length={max_length}); "
             "check that the data's responses are non-empty and fit")
    train_rows = train_ex
    if packing:
        train_rows = pack_examples(train_ex, max_length)
        filled = sum(len(r["input_ids"]) for r in train_rows) / (len(train_rows) * max_length)
        log.say(f"packed {len(train_ex)} examples into {len(train_rows)} rows of {max_length} tokens "
                f"({100 * filled:.0f}% filled)")
    summary = {"data": stats.as_dict(), "truncated": stats.truncated,
               "dropped": sum(stats.dropped.values()), "loss_on": loss_on, "packing": packing,
               "chat_template": choice.source, "example": example,
               **({"added_tokens": added} if added else {}), **prepared.summary}
    return Task(model=prepared.model, batches=ctx.batches(train_rows, sft_collate(tok.pad_token_id, cause)),
                eval_examples=eval_ex, loss=sft_loss, save=prepared.save, summary=summary)


def _save_new_rows_too(prepared: Prepared, added: list[str], masked_rows: int = 0) -> Prepared:
    """An adapter method's output carries the new tokens' rows (see ``save_new_token_rows``).

    ``trainable_params`` counts what trains: the adapter and the new rows. Rows trained through a
    gradient mask (``masked_rows`` of them) sit in whole matrices that count only those rows.
    """
    model = prepared.model

    def save(out: Path) -> None:
        prepared.save(out)
        save_new_token_rows(Path(out), model, added)

    if not masked_rows:
        return Prepared(model=model, save=save, summary=prepared.summary)
    vocab, hidden = model.get_input_embeddings().weight.shape
    total, trainable = param_counts(model)
    trainable -= (masked_rows // len(added)) * vocab * hidden - masked_rows * hidden  # only the new rows learn
    summary = {**prepared.summary, "trainable_params": trainable, "trainable_ratio": trainable / max(total, 1)}
    return Prepared(model=model, save=save, summary=summary)


def _check_first_example(ctx: RunContext, records: list[Record], max_length: int, templated: bool) -> str:
    """Check the first usable example against its record (``lmtune.data.example_check``); show it if asked.

    Returns:
        The example with its labelled runs in ``[[ ]]`` (for summary.json).
    """
    cfg, tok = ctx.cfg, ctx.tokenizer
    for rec in records:
        stats = BuildStats()
        built = sft_examples([rec], cfg.data.format, tok, max_length, cfg.train.loss_on, stats, templated)[0]
        if built:
            break
    sample = parse_records([rec], cfg.data.format, BuildStats())[0]
    responses = ([m["content"] for m in sample.messages if m["role"] == "assistant"]
                 if isinstance(sample, Conversation) else [sample.completion])
    for warning in check_example(tok, built[0], responses, cfg.train.loss_on, bool(stats.truncated), rec.where):
        ctx.log.say(f"warning: {warning}")
    if ctx.show_example:
        color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        legend = "labelled tokens in green, masked dimmed" if color else "labelled tokens in [[ ]]"
        ctx.log.say(f"first training example ({rec.where}; {legend}):\n{show_example(tok, built[0], color)}")
    return show_example(tok, built[0], color=False)


def _report(log: Any, stats: BuildStats, max_length: int) -> None:
    log.say(f"sft examples: {stats.examples}")
    if stats.truncated:
        log.say(f"truncated {stats.truncated} examples to train.max_length={max_length} (kept their start)")
    for reason, n in sorted(stats.dropped.items()):
        log.say(f"dropped {n} examples: {reason}")
