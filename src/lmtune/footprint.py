"""``lmtune inspect``: parameters and training memory per method, with the arithmetic shown.

The model is built on PyTorch's ``meta`` device from its ``config.json``: shapes without
storage, so a 7B model is inspected in a second and no weight is read. Each method is then
applied with the same code a run uses (target matching, LoRA wrapping, freezing), so the counts
are the ones ``summary.json`` reports for the same config.

Training memory = weights + gradients (fp32, one per trainable parameter) + AdamW state (two
fp32 moments per trainable parameter). Activations depend on batch and sequence length and are
not included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lmtune.config import load_config
from lmtune.errors import InputError
from lmtune.methods.adapters import inject
from lmtune.methods.freeze import freeze_layers
from lmtune.methods.lora_layer import LoRASpec
from lmtune.methods.qlora import checked_plan, weight_memory
from lmtune.methods.targets import resolve_targets
from lmtune.models.loading import param_counts, resolve_model_dir

KB, MB, GB = 1024, 1024**2, 1024**3


def human(n: float) -> str:
    """Bytes as B / KB / MB / GB."""
    for unit, size in (("GB", GB), ("MB", MB), ("KB", KB)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _meta_model(folder: Path, trust_remote_code: bool) -> nn.Module:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def _counts(model: nn.Module) -> tuple[int, int]:

    return param_counts(model)


def method_row(model_fn: Any, method: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Parameters and memory of one method on a fresh (meta) model from ``model_fn()``."""

    model = model_fn()
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

            names, keep = checked_plan(model, cfg.quant.block_size, cfg.quant.double_quant)
            memory = weight_memory(model, names, cfg.quant.block_size, cfg.quant.double_quant)
            quantized_bytes, quantized_numel = memory["quantized_bytes"], memory["quantized_params"]
            row.update(unquantized_layers=sorted(keep), bytes_per_quantized_param=memory["bytes_per_quantized_param"],
                       base_weight_bytes=memory["weight_bytes"], weight_bytes_fp32=memory["weight_bytes_fp32"],
                       weight_bytes_bf16=memory["weight_bytes_bf16"])
        targets = resolve_targets(model, cfg.lora.target_modules, dora=spec.dora)
        inject(model, targets, spec)
        row.update(lora_target_modules=len(targets))
    elif method == "prompt_tuning":
        hidden = model.get_input_embeddings().weight.shape[1]
        total, _ = _counts(model)
        n = cfg.prompt_tuning.num_virtual_tokens
        row.update(total_params=total + n * hidden, trainable_params=n * hidden)
    if "total_params" not in row:
        total, trainable = _counts(model)
        if method in ("lora", "qlora"):
            trainable = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
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
        "weights": (f"{full_precision:,} × 4 B" + (f" + {quantized_numel:,} × {quantized_bytes / quantized_numel:.4f} B"
                                                   " (NF4)" if quantized_numel else "")),
        "gradients": f"{trainable:,} × 4 B",
        "adamw": f"{trainable:,} × 8 B (two fp32 moments)",
    }
    return row


def inspect_model(model_fn: Any, cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Rows for full, (freeze,) lora, qlora and prompt_tuning under ``cfg``'s settings."""

    methods = ["full"] + (["freeze"] if cfg.freeze.layers or cfg.method == "freeze" else [])
    methods += ["lora", "qlora", "prompt_tuning"]
    rows = {}
    for method in methods:
        try:
            rows[method] = method_row(model_fn, method, cfg)
        except InputError as e:
            if method == cfg.method:
                raise
            rows[method] = {"error": str(e)}  # e.g. nothing quantizable: shown, not fatal for other rows
    return rows


def render(folder: Path, model_name: str, cfg: dict[str, Any], rows: dict[str, dict[str, Any]]) -> str:
    """The human-readable report."""
    lines = [f"model: {folder} ({model_name})",
             "training memory = weights + gradients (fp32) + AdamW state (2 × fp32); activations not included", ""]
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
        if method == "qlora":
            lines.append(f"  NF4 bytes per quantized parameter: {row['bytes_per_quantized_param']:.4f}; base weights "
                         f"{human(row['base_weight_bytes'])} vs fp32 {human(row['weight_bytes_fp32'])}, "
                         f"bf16 {human(row['weight_bytes_bf16'])}")
            if row["unquantized_layers"]:
                lines.append(f"  kept in full precision (size not a whole number of blocks): "
                             f"{', '.join(row['unquantized_layers'])}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def run_inspect(model: str | Path | None, overrides: list[str]) -> dict[str, Any]:
    """``lmtune inspect``: the report as a dict (``--json``) with its text under ``"text"``.

    Raises:
        InputError: bad model folder or config keys, or the configured method cannot apply.
    """
    cfg = load_config(overrides=overrides)
    folder = resolve_model_dir(model if model is not None else cfg.model)
    trust = cfg.trust_remote_code
    probe = _meta_model(folder, trust)
    rows = inspect_model(lambda: _meta_model(folder, trust), cfg)
    return {"model": str(folder), "architecture": type(probe).__name__, "method": cfg.method,
            "methods": rows, "text": render(folder, type(probe).__name__, cfg, rows)}
