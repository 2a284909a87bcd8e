"""QLoRA (Dettmers et al., 2023): LoRA adapters in full precision on a frozen 4-bit NF4 base.

Every linear layer of the transformer blocks is stored in NF4 (``lmtune.quant``); embeddings,
norms and the output head stay in full precision, as do linear layers whose size does not divide
into whole quantization blocks (they are listed in the log and in ``summary.json``). The
``lora.*`` targets get adapters exactly as with ``method=lora``; the 4-bit weights never get a
gradient, the inputs do (so earlier adapters learn).

The saved adapter is an ordinary PEFT LoRA adapter. It belongs to the *original* full-precision
base: load it there for inference or ``lmtune merge`` it there. Merging into the 4-bit weights
would round most of the update away, so lmtune refuses to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lmtune.errors import InputError
from lmtune.methods import Prepared
from lmtune.methods.targets import base_modules, is_linear
from lmtune.quant import nf4_nbytes, quantize_problem


def _head_ids(model: nn.Module) -> set[int]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {id(getattr(head, "base_layer", head))} if head is not None else set()


def plan_quantization(model: nn.Module, block_size: int, double_quant: bool) -> tuple[list[str], dict[str, str]]:
    """Which linear layers go to NF4, and which stay in full precision (with the reason).

    The output head is never quantized (it is not listed): its errors would land directly on
    the logits, and it is often tied to the input embeddings.
    """
    heads = _head_ids(model)
    quantize, keep = [], {}
    for name, module in base_modules(model).items():
        if not is_linear(module) or id(module) in heads:
            continue
        weight = getattr(module, "weight", None)
        numel = weight.numel() if weight is not None else 0
        problem = quantize_problem(numel, block_size, double_quant)
        if problem:
            keep[name] = problem
        else:
            quantize.append(name)
    return quantize, keep


def checked_plan(model: nn.Module, block: int, double: bool) -> tuple[list[str], dict[str, str]]:
    """:func:`plan_quantization`, refusing a model where nothing would be quantized.

    Raises:
        InputError: no linear layer divides into NF4 blocks (or the model has none).
    """
    quantize, keep = plan_quantization(model, block, double)
    if not quantize:
        reasons = "; ".join(f"{n}: {why}" for n, why in list(keep.items())[:4]) or "it has no linear layers"
        raise InputError(f"method=qlora: no linear layer of {type(model).__name__} can be stored in NF4 with "
                         f"quant.block_size={block}, quant.double_quant={str(double).lower()} ({reasons}). "
                         "Try a smaller quant.block_size, quant.double_quant=false, or method=lora.")
    return quantize, keep


def weight_memory(model: nn.Module, quantized: list[str], block_size: int, double_quant: bool) -> dict[str, Any]:
    """Weight bytes with the NF4 layers vs the same model in fp32 and bf16 (closed form)."""
    modules = base_modules(model)
    q_numel = sum(modules[n].weight.numel() for n in quantized)
    q_bytes = sum(nf4_nbytes(modules[n].weight.numel(), block_size, double_quant) for n in quantized)
    seen = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in seen.values())
    rest = total - q_numel  # everything else stays in fp32
    return {"quantized_params": q_numel, "quantized_bytes": q_bytes,
            "bytes_per_quantized_param": q_bytes / q_numel if q_numel else None,
            "weight_bytes": q_bytes + 4 * rest, "weight_bytes_fp32": 4 * total, "weight_bytes_bf16": 2 * total}


def apply(model: Any, tokenizer: Any, cfg: dict[str, Any], base_folder: Path) -> Prepared:
    """``method=qlora``: quantize the base's linear layers to NF4, then add a LoRA adapter."""
    from lmtune.methods.adapters import prepare_lora
    from lmtune.methods.lora import LoRALinear

    block, double = cfg["quant.block_size"], cfg["quant.double_quant"]
    quantize, keep = checked_plan(model, block, double)
    memory = weight_memory(model, quantize, block, double)
    settings = {"block_size": block, "double_quant": double}
    # Targets are quantized as they are wrapped (so no fp32 copy lingers); then the rest.
    prepared = prepare_lora(model, tokenizer, cfg, base_folder, quantize=settings, quantize_only=set(quantize))
    modules = dict(model.named_modules())
    for name in quantize:
        if not isinstance(modules[name], LoRALinear):
            parent, _, child = name.rpartition(".")
            wrapped = LoRALinear(modules[name], quantize_base=True, **settings)  # quantized, no adapter
            setattr(model.get_submodule(parent) if parent else model, child, wrapped)
    if keep:
        print(f"qlora: kept {len(keep)} linear layer(s) in full precision: "
              + "; ".join(f"{n} ({why})" for n, why in keep.items()), flush=True)
    prepared.summary.update({
        "quant_block_size": block, "quant_double_quant": double,
        "quantized_layers": len(quantize), "unquantized_layers": sorted(keep),
        "bytes_per_quantized_param": memory["bytes_per_quantized_param"],
        "weight_memory_mb": memory["weight_bytes"] / 2**20,
        "weight_memory_fp32_mb": memory["weight_bytes_fp32"] / 2**20,
        "weight_memory_bf16_mb": memory["weight_bytes_bf16"] / 2**20,
    })
    return prepared
