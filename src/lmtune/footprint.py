"""``lmtune inspect``: parameters and training memory per method, with the arithmetic shown.

The model is built on PyTorch's ``meta`` device from its ``config.json``: shapes without
storage, so a 7B model is inspected in a second and no weight is read. Each method is then
applied with the same code a run uses (target matching, LoRA wrapping, freezing), so the counts
are the ones ``summary.json`` reports for the same config.

Training memory = weights + gradients (fp32, one per trainable parameter) + AdamW state (two
fp32 moments per trainable parameter). The predicted peak adds what a step of the configured
batch shape holds (:func:`predict_peak`): activations kept for backward, the chunked output head,
backward's working set, the process baseline (Python, torch, transformers) and, for methods whose
runs keep glibc's malloc defaults, the heap that keeps freed activations.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from lmtune.allocator import FREEING_METHODS
from lmtune.config import load_config
from lmtune.data.formats import detect_format
from lmtune.data.readers import read_records
from lmtune.data.templates import apply_chat_setting
from lmtune.errors import InputError
from lmtune.methods.adapters import inject
from lmtune.methods.freeze import freeze_layers
from lmtune.methods.lora_layer import LoRASpec
from lmtune.methods.qlora import checked_plan, weight_memory
from lmtune.methods.targets import resolve_targets
from lmtune.methods.token_rows import wrap_token_rows
from lmtune.models.loading import auto_config, load_tokenizer, param_counts, resolve_model_dir
from lmtune.objectives.head_logprobs import chunk_rows_for

if TYPE_CHECKING:
    from lmtune.config import RunConfig

KB, MB, GB = 1024, 1024**2, 1024**3


def human(n: float) -> str:
    """Bytes as B / KB / MB / GB."""
    for unit, size in (("GB", GB), ("MB", MB), ("KB", KB)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _meta_model(folder: Path, trust_remote_code: bool) -> nn.Module:
    config = auto_config(folder, trust_remote_code)
    return _meta_from_config(config, trust_remote_code)


def _meta_from_config(config: Any, trust_remote_code: bool = False) -> nn.Module:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def _counts(model: nn.Module) -> tuple[int, int]:

    return param_counts(model)


def method_row(model_fn: Any, method: str, cfg: RunConfig, new_tokens: int = 0) -> dict[str, Any]:
    """Parameters and memory of one method on a fresh (meta) model from ``model_fn()``.

    ``new_tokens``: tokens a run adds (ChatML's, for chat data on a tokenizer without a template):
    the embeddings grow by that many rows, and LoRA/QLoRA train those rows only, as a run does.
    """

    model = model_fn()
    if new_tokens:
        vocab = model.get_input_embeddings().weight.shape[0]
        model.resize_token_embeddings(vocab + new_tokens, mean_resizing=False)
    row: dict[str, Any] = {}
    quantized_bytes, quantized_numel = 0, 0
    if method in ("full", "freeze"):
        model.requires_grad_(True)
        if method == "freeze":

            freeze_layers(model, cfg.freeze.layers)
    elif method in ("lora", "qlora"):
        spec = LoRASpec.from_config(cfg.lora)
        model.requires_grad_(False)
        if method == "qlora":

            names = checked_plan(model)
            memory = weight_memory(model, names, cfg.quant.block_size, cfg.quant.double_quant)
            quantized_bytes, quantized_numel = memory["quantized_bytes"], memory["quantized_params"]
            row.update(quantized_layers=len(names), bytes_per_quantized_param=memory["bytes_per_quantized_param"],
                       base_weight_bytes=memory["weight_bytes"], weight_bytes_fp32=memory["weight_bytes_fp32"],
                       weight_bytes_bf16=memory["weight_bytes_bf16"])
        targets = resolve_targets(model, cfg.lora.target_modules, dora=spec.dora)
        inject(model, targets, spec)
        row.update(lora_target_modules=len(targets))
        if new_tokens:
            wrap_token_rows(model, list(range(vocab, vocab + new_tokens)))
    elif method == "prompt_tuning":
        hidden = model.get_input_embeddings().weight.shape[1]
        total, _ = _counts(model)
        n = cfg.prompt_tuning.num_virtual_tokens
        row.update(total_params=total + n * hidden, trainable_params=n * hidden)
    if "total_params" not in row:
        total, trainable = _counts(model)
        if method in ("lora", "qlora"):
            trainable = sum(p.numel() for n, p in model.named_parameters()
                            if ".lora_" in n or n.endswith(".token_rows"))
        row.update(total_params=total, trainable_params=trainable)
    total, trainable = row["total_params"], row["trainable_params"]
    full_precision = total - quantized_numel
    row.update(
        trainable_ratio=trainable / total,
        weight_bytes=4 * full_precision + quantized_bytes,
        gradient_bytes=4 * trainable,
        optimizer_bytes=8 * trainable,
    )
    row["train_bytes"] = row["weight_bytes"] + row["gradient_bytes"] + row["optimizer_bytes"]
    row["arithmetic"] = {
        "weights": (f"{full_precision:,} × 4 B" + (f" + {quantized_numel:,} NF4 weights in {quantized_bytes:,} B"
                                                   if quantized_numel else "")),
        "gradients": f"{trainable:,} × 4 B",
        "adamw": f"{trainable:,} × 8 B (two fp32 moments)",
    }
    return row


def inspect_model(model_fn: Any, cfg: RunConfig, new_tokens: int = 0) -> dict[str, dict[str, Any]]:
    """Rows for full, (freeze,) lora, qlora and prompt_tuning under ``cfg``'s settings."""
    methods = ["full"] + (["freeze"] if cfg.freeze.layers or cfg.method == "freeze" else [])
    methods += ["lora", "qlora", "prompt_tuning"]
    rows = {}
    for method in methods:
        try:
            rows[method] = method_row(model_fn, method, cfg, new_tokens)
        except InputError as e:
            if method == cfg.method:
                raise
            rows[method] = {"error": str(e)}  # e.g. nothing quantizable: shown, not fatal for other rows
    return rows


# Numbers a decoder block keeps for backward, per token, measured with saved_tensors_hooks on
# transformers' Llama (tests/test_footprint.py checks them against that oracle): the block's input,
# the normed input, q after RoPE, the attention output, the residual, the second normed input
# (6·H), k and v (2·kv), and gate, up, SiLU(gate) and their product (4·I; 2·I for a GELU MLP).
# Trainable norms keep their normalised inputs too (+2·H), each LoRA adapter its r-dim middle.
# With every weight frozen (prompt tuning) the normed inputs and down_proj's input are not kept (-2·H - I).
_BLOCK_H, _BLOCK_KV, _TRAINED_NORMS_H, _FROZEN_UNSAVED_H = 6, 2, 2, 2
_TAIL_H = {True: 3.25, False: 1.25}  # final norm, gathered rows, head-input gradient (trainable head or not)
_PAIRED = {"dpo", "reward"}  # objectives whose batch rows are pairs: 2 sequences each


def architecture(config: Any) -> dict[str, Any]:
    """Hidden size, MLP width, layers, K/V width, vocabulary and MLP kind of a ``transformers`` config."""
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    gated = getattr(config, "intermediate_size", None) is not None  # Llama family: gate, up, down
    inter = config.intermediate_size if gated else (getattr(config, "n_inner", None) or 4 * hidden)
    return {"hidden": hidden, "inter": inter, "layers": layers, "kv": kv_heads * head_dim,
            "vocab": config.vocab_size, "gated": gated}


def activation_numbers(arch: dict[str, Any], method: str, lora_r: int = 0, adapters_per_block: int = 0,
                       checkpointing: bool = False) -> dict[str, float]:
    """Numbers kept for backward per token: ``per_block`` (one decoder block) and ``total``."""
    h, i, kv = arch["hidden"], arch["inter"], arch["kv"]
    per_block = _BLOCK_H * h + _BLOCK_KV * kv + (4 if arch["gated"] else 2) * i
    if method in ("full", "freeze"):
        per_block += _TRAINED_NORMS_H * h
    if method in ("lora", "qlora"):
        per_block += lora_r * adapters_per_block
    if method == "prompt_tuning":  # a frozen linear or norm weight needs no input saved for its gradient
        per_block -= _FROZEN_UNSAVED_H * h + i  # the two normed inputs and down_proj's input
    tail = _TAIL_H[method in ("full", "freeze")] * h
    kept = (arch["layers"] * h + per_block) if checkpointing else arch["layers"] * per_block  # one block recomputed
    return {"per_block": per_block, "total": kept + tail}


def predict_peak(row: dict[str, Any], arch: dict[str, Any], *, method: str, objective: str, batch_size: int,
                 seq_len: int, precision: str = "fp32", checkpointing: bool = False, lora_r: int = 0,
                 chunk_rows: int = 1024, baseline_bytes: float = 0.0, heap_slack: bool = False) -> dict[str, Any]:
    """A training step's peak resident memory, by part (bytes), for ``row`` (from :func:`method_row`).

    Activations assume every sequence is ``seq_len`` long (padding to the batch's longest makes
    that the bound). Under bf16 autocast matmul outputs are 2 bytes (norms and the loss stay fp32:
    3 bytes per kept number on average).

    ``heap_slack``: glibc keeps its default malloc thresholds for the run (every method but those
    in :data:`lmtune.allocator.FREEING_METHODS`). Its heap then keeps what a step frees: the first
    step's activations stay resident after backward and the next step allocates beside them. The
    part ``heap`` adds one step's activations as an uncheckpointed step keeps them (the recompute
    of a checkpointed backward allocates and frees the same): measured on random Llamas at
    128–2,048 tokens per step, with and without checkpointing, this left peak minus the other parts
    at 0.9–1.1× that figure (benchmarks/MEMORY.md).

    Returns:
        ``{"parts": {name: bytes}, "total": bytes, "arithmetic": {name: text}}``.
    """
    tokens = batch_size * seq_len * (2 if objective in _PAIRED else 1)
    per_number = 3 if precision == "bf16" else 4
    adapters = row.get("lora_target_modules", 0) / max(arch["layers"], 1)
    acts = activation_numbers(arch, method, lora_r, adapters, checkpointing)
    # The head computes log-probs a chunk of rows at a time, at most CHUNK_BYTES of fp32 logits (262
    # rows at V=32000): one logits buffer, reused in place, and its gradient in backward.
    rows = min(chunk_rows_for(arch["vocab"], chunk_rows), tokens)
    head = 2 * rows * arch["vocab"] * 4
    working = tokens * (2 * arch["hidden"] + 2 * arch["inter"]) * 4  # one block's activation gradients in backward
    parts = {"baseline": baseline_bytes, "weights": row["weight_bytes"], "gradients": row["gradient_bytes"],
             "optimizer": row["optimizer_bytes"], "activations": tokens * acts["total"] * per_number,
             "head": head, "backward": working}
    if heap_slack:
        freed = activation_numbers(arch, method, lora_r, adapters)["total"]  # uncheckpointed, whatever the run
        parts["heap"] = tokens * freed * per_number
    arithmetic = {
        "activations": f"{tokens:,} tokens × {acts['total']:,.0f} numbers × {per_number} B"
                       + (" (checkpointed: block inputs + one block)" if checkpointing else ""),
        "head": f"2 × {rows:,} rows × {arch['vocab']:,} logits × 4 B",
        "backward": f"{tokens:,} tokens × (2·{arch['hidden']} + 2·{arch['inter']}) × 4 B",
    }
    if heap_slack:
        arithmetic["heap"] = (f"{tokens:,} tokens × {freed:,.0f} numbers × {per_number} B "
                              "(freed activations glibc's heap keeps)")
    return {"parts": parts, "total": sum(parts.values()), "arithmetic": arithmetic}


def current_rss_bytes() -> float:
    """This process's resident set now (Linux ``/proc/self/statm``; 0 where unavailable)."""
    import os

    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0.0


def predicted_peak_mb(folder: Path, cfg: RunConfig, baseline_bytes: float, seq_len: int | None = None) -> float:
    """The peak ``lmtune inspect`` predicts for ``cfg``'s run (what summary.json reports next to ``peak_rss_mb``).

    ``seq_len``: the run's longest sequence when its examples are known (:func:`longest_sequence`);
    ``train.max_length`` otherwise, as ``inspect`` assumes.
    """
    trust = cfg.trust_remote_code
    model = _meta_model(folder, trust)
    row = method_row(lambda: _meta_model(folder, trust), cfg.method, cfg)
    shape = {**_shape(cfg), **({"seq_len": seq_len} if seq_len else {})}
    return predict_peak(row, architecture(model.config), **shape, baseline_bytes=baseline_bytes)["total"] / MB


def longest_sequence(examples: Any, max_length: int) -> int:
    """Tokens in the longest row a batch of ``examples`` pads to: the bound of a step's activations.

    Knows lmtune's example dicts: ``input_ids`` (LM, SFT, packed rows, classification); a preference
    pair's prompt plus its longer side; a KTO example's longest prompt plus longest completion
    (its KL rows pair a prompt with another example's completion). Anything else: ``max_length``.
    """
    if not isinstance(examples, list) or not examples or not all(isinstance(e, dict) for e in examples):
        return max_length
    if all("input_ids" in e for e in examples):
        longest = max(len(e["input_ids"]) for e in examples)
    elif all({"prompt_ids", "chosen_ids", "rejected_ids"} <= e.keys() for e in examples):
        longest = max(len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in examples)
    elif all({"prompt_ids", "completion_ids"} <= e.keys() for e in examples):
        longest = max(len(e["prompt_ids"]) for e in examples) + max(len(e["completion_ids"]) for e in examples)
    else:
        return max_length
    return min(longest, max_length)


def added_chat_tokens(folder: Path, cfg: RunConfig) -> int:
    """How many tokens a run of ``cfg`` adds to the tokenizer (ChatML's, for chat data without a template)."""
    fmt, train = cfg.data.format, cfg.data.train
    if fmt == "auto" and isinstance(train, str) and Path(train).is_file():
        fmt = detect_format(read_records(train))
    if fmt != "messages":
        return 0
    # The same choice training makes: a template the tokenizer has, a detected family, or ChatML added.
    choice = apply_chat_setting(load_tokenizer(folder, cfg.trust_remote_code), cfg.data.chat_template, fmt)
    return len(choice.added)


def _shape(cfg: RunConfig, method: str | None = None) -> dict[str, Any]:
    method = method or cfg.method
    return {"method": method, "objective": cfg.objective, "batch_size": cfg.train.batch_size,
            "seq_len": cfg.train.max_length, "precision": cfg.train.precision,
            "checkpointing": cfg.train.gradient_checkpointing, "lora_r": cfg.lora.r,
            "heap_slack": method not in FREEING_METHODS}


def render(folder: Path | str, model_name: str, cfg: RunConfig, rows: dict[str, dict[str, Any]]) -> str:
    """The human-readable report."""
    lines = [f"model: {folder} ({model_name})",
             "training memory = weights + gradients (fp32) + AdamW state (2 × fp32); the predicted peak adds "
             "activations, the chunked head, backward's working set and this process's baseline", ""]
    for method, row in rows.items():
        mark = "   <- this config" if method == cfg.method else ""
        lines.append(f"{method}{mark}")
        if "error" in row:
            lines += [f"  not possible: {row['error']}", ""]
            continue
        a = row["arithmetic"]
        lines.append(f"  parameters: {row['trainable_params']:,} trainable of {row['total_params']:,} "
                     f"({100 * row['trainable_ratio']:.2f}%)")
        lines.append(f"  weights:    {a['weights']:<44} = {human(row['weight_bytes'])}")
        lines.append(f"  gradients:  {a['gradients']:<44} = {human(row['gradient_bytes'])}")
        lines.append(f"  AdamW:      {a['adamw']:<44} = {human(row['optimizer_bytes'])}")
        lines.append(f"  total:      {'':<44} = {human(row['train_bytes'])}")
        if "predicted_peak" in row:
            peak = row["predicted_peak"]
            lines.append(f"  predicted peak RSS for batch {cfg.train.batch_size} × {cfg.train.max_length} tokens "
                         f"({cfg.train.precision}) = {human(peak['total'])}:")
            for part, size in peak["parts"].items():
                how = peak["arithmetic"].get(part, "")
                lines.append(f"    {part + ':':<13}{how:<60} {human(size)}")
        if method == "qlora":
            lines.append(f"  NF4 bytes per quantized parameter (padding included): "
                         f"{row['bytes_per_quantized_param']:.5f}; base weights "
                         f"{human(row['base_weight_bytes'])} vs fp32 {human(row['weight_bytes_fp32'])}, "
                         f"bf16 {human(row['weight_bytes_bf16'])}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def run_inspect(model: str | Path | nn.Module | None, overrides: list[str] | dict[str, Any] | None = None,
                **keys: Any) -> dict[str, Any]:
    """``lmtune inspect``: the report as a dict (``--json``) with its text under ``"text"``.

    Args:
        model: model folder (``None``: ``model`` from the config, else the shipped model), or an
            in-memory ``transformers`` model, whose config is used (its weights are not touched).
        overrides: config keys as ``key=value`` strings or a dict of dotted keys.
        **keys: config keys and sections as for ``load_config`` (``method="lora", lora={"r": 16}``).

    Raises:
        InputError: bad model folder or config keys, or the configured method cannot apply.
    """

    cfg = load_config(overrides=overrides, **keys)
    if isinstance(model, nn.Module):
        config = getattr(model, "config", None)
        if config is None:
            raise InputError(f"inspect reads a transformers config; {type(model).__name__} has no .config")
        where, model_fn = f"in-memory {config.model_type} model", lambda: _meta_from_config(config)
    else:
        folder = resolve_model_dir(model if model is not None else cfg.model)
        trust = cfg.trust_remote_code
        where, model_fn = str(folder), lambda: _meta_model(folder, trust)
    new_tokens = added_chat_tokens(folder, cfg) if not isinstance(model, nn.Module) else 0
    probe = model_fn()
    baseline = current_rss_bytes()  # this process has imported what a run imports: the baseline on this machine
    rows = inspect_model(model_fn, cfg, new_tokens)
    arch = architecture(probe.config)
    for method, row in rows.items():
        if "error" not in row:
            row["predicted_peak"] = predict_peak(row, arch, **_shape(cfg, method), baseline_bytes=baseline)
    return {"model": where, "architecture": type(probe).__name__, "method": cfg.method,
            "methods": rows, "text": render(where, type(probe).__name__, cfg, rows)}
