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

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from lmtune.config import LoraConfig, QuantConfig
from lmtune.errors import InputError
from lmtune.methods import lora
from lmtune.methods.lora_layer import LoRALinear, lora_layers
from lmtune.methods.prepared import Prepared
from lmtune.methods.targets import base_modules, is_linear
from lmtune.models.loading import load_causal_lm
from lmtune.quant import nf4_nbytes, quantize_problem


def _head_ids(model: nn.Module) -> set[int]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {id(getattr(head, "base_layer", head))} if head is not None else set()


def plan_quantization(model: nn.Module, block_size: int, double_quant: bool) -> tuple[dict[str, int], dict[str, str]]:
    """Which linear layers go to NF4 (name -> weight count), and which stay in full precision (name -> why).

    The output head is never quantized (it is not listed): its errors would land directly on
    the logits, and it is often tied to the input embeddings. Layers already in NF4 (from
    :func:`load_quantized`) count as quantized.
    """
    done = {name: layer.in_features * layer.out_features for name, layer in lora_layers(model).items()
            if layer.quantized}
    heads = _head_ids(model)
    quantize, keep = {}, {}
    for name, module in base_modules(model).items():
        if name in done:
            quantize[name] = done[name]
            continue
        if not is_linear(module) or id(module) in heads:
            continue
        numel = module.weight.numel()
        problem = quantize_problem(numel, block_size, double_quant)
        if problem:
            keep[name] = problem
        else:
            quantize[name] = numel
    return quantize, keep


def checked_plan(model: nn.Module, block: int, double: bool) -> tuple[dict[str, int], dict[str, str]]:
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


def weight_memory(model: nn.Module, quantized: dict[str, int], block_size: int, double_quant: bool) -> dict[str, Any]:
    """Weight bytes with the NF4 layers vs the same model in fp32 and bf16 (closed form)."""
    q_numel = sum(quantized.values())
    q_bytes = sum(nf4_nbytes(n, block_size, double_quant) for n in quantized.values())
    in_nf4 = sum(layer.in_features * layer.out_features for layer in lora_layers(model).values() if layer.quantized)
    seen = {id(p): p for n, p in model.named_parameters() if "weight_4bit" not in n}
    total = sum(p.numel() for p in seen.values()) + in_nf4
    rest = total - q_numel  # everything not in NF4 stays in fp32
    return {"quantized_params": q_numel, "quantized_bytes": q_bytes,
            "bytes_per_quantized_param": q_bytes / q_numel if q_numel else None,
            "weight_bytes": q_bytes + 4 * rest, "weight_bytes_fp32": 4 * total, "weight_bytes_bf16": 2 * total}


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build modules with parameters on the ``meta`` device (shapes, no storage), buffers as usual.

    Buffers that checkpoints do not hold (rotary frequencies, causal masks) are computed in the
    modules' constructors, so they must be real; parameters will come from the file.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def load_quantized(folder: Path, quant: QuantConfig, trust_remote_code: bool = False) -> nn.Module:
    """Load a causal LM with its linear layers streamed straight into NF4.

    Loading the fp32 model first and quantizing it afterwards would make the peak memory of a
    QLoRA run that of the fp32 model: the thing QLoRA exists to avoid. Here the model is built
    with its parameters on the ``meta`` device, then each tensor is read from the safetensors
    file on its own (the file is opened per tensor, so its memory map never holds more than one);
    a quantizable weight goes to NF4 at once and its full-precision copy is dropped.
    Peak ≈ the 4-bit model + the full-precision rest + the largest single tensor.

    A checkpoint whose tensor names do not match the model exactly falls back to the ordinary
    loader (then quantized in place: correct, with the fp32 peak).
    """
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights


    trust = trust_remote_code
    settings = {"block_size": quant.block_size, "double_quant": quant.double_quant}
    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=trust)
    with no_init_weights(), _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust, dtype=torch.float32)
    model.tie_weights()
    quantize, _ = plan_quantization(model, **settings)
    owners = dict(model.named_modules())  # the original modules, also after they are wrapped
    expected = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()
                                                           if n in model.state_dict()}
    where = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            where.update(dict.fromkeys(f.keys(), file))
    if not expected <= set(where) or not set(where) <= set(model.state_dict()):
        return load_causal_lm(folder, trust)  # unusual names (e.g. legacy prefixes): the safe, slower path
    for key, file in where.items():
        with safe_open(file, framework="pt") as f:
            tensor = f.get_tensor(key).float()
        owner_name, _, leaf = key.rpartition(".")
        owner = owners[owner_name]
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[leaf] = tensor
        if owner_name in quantize and leaf == "weight":
            parent, _, child = owner_name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    LoRALinear(owner, quantize_base=True, **settings))
    model.tie_weights()  # the head again shares the (now loaded) input embeddings where tied
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise InputError(f"{folder}: no weights for {', '.join(left[:5])} in its safetensors files")
    _release_freed_memory()
    return model.eval()  # as from_pretrained returns it


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc only; a no-op elsewhere).

    Quantizing allocates large temporaries (torchao compares each weight with all 16 levels);
    glibc keeps freed heap pages mapped, so without this the process would go on holding a
    quantization's worth of scratch memory: measured +150 MB resident on a 61M model.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def apply(model: Any, tokenizer: Any, base_folder: Path, lora_section: LoraConfig, quant: QuantConfig,
          seed: int) -> Prepared:
    """``method=qlora``: quantize the base's linear layers to NF4, then add a LoRA adapter."""
    block, double = quant.block_size, quant.double_quant
    quantize, keep = checked_plan(model, block, double)
    memory = weight_memory(model, quantize, block, double)
    settings = {"block_size": block, "double_quant": double}
    # Targets are quantized as they are wrapped (so no fp32 copy lingers); then the rest.
    prepared = lora.apply(model, tokenizer, base_folder, lora_section, seed, "qlora", quantize=settings,
                          quantize_only=set(quantize))
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
