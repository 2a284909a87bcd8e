"""QLoRA (Dettmers et al., 2023): LoRA adapters in full precision on a frozen 4-bit NF4 base.

Every linear layer of the transformer blocks is stored in NF4 (``lmtune.quant``), whatever its
size (the last block of weights and of scales is padded); embeddings, norms and the output head
stay in full precision. The
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

from lmtune import allocator
from lmtune.config import LoraConfig, QuantConfig
from lmtune.errors import InputError
from lmtune.methods import lora
from lmtune.methods.lora_layer import LoRALinear, lora_layers
from lmtune.methods.prepared import Prepared
from lmtune.methods.targets import base_modules, head_layers, is_linear
from lmtune.models.loading import load_causal_lm
from lmtune.quant import nf4_nbytes


def _head_ids(model: nn.Module) -> set[int]:
    return {id(h) for h in head_layers(model)}


def plan_quantization(model: nn.Module) -> dict[str, int]:
    """Which linear layers go to NF4 (name -> weight count): every one but the output head.

    Any size quantizes (``lmtune.quant`` pads the last blocks). The output head (or a reward
    model's ``score``) is never quantized: its errors would land directly on the logits, it is
    often tied to the input embeddings, and a classification head trains in full. Layers already
    in NF4 (from :func:`load_quantized`) count as quantized.
    """
    done = {name: layer.in_features * layer.out_features for name, layer in lora_layers(model).items()
            if layer.quantized}
    heads = _head_ids(model)
    quantize = {}
    for name, module in base_modules(model).items():
        if name in done:
            quantize[name] = done[name]
        elif is_linear(module) and id(module) not in heads:
            quantize[name] = module.weight.numel()
    return quantize


def checked_plan(model: nn.Module) -> dict[str, int]:
    """:func:`plan_quantization`, refusing a model that has no linear layer besides its head.

    Raises:
        InputError: nothing to quantize.
    """
    quantize = plan_quantization(model)
    if not quantize:
        raise InputError(f"method=qlora: {type(model).__name__} has no linear layer to store in NF4 (besides its "
                         "output head, which stays in full precision); use method=lora.")
    return quantize


def weight_memory(model: nn.Module, quantized: dict[str, int], block_size: int, double_quant: bool) -> dict[str, Any]:
    """Weight bytes with the NF4 layers vs the same model in fp32 and bf16 (closed form)."""
    q_numel = sum(quantized.values())
    q_bytes = sum(nf4_nbytes(n, block_size, double_quant) for n in quantized.values())  # padding included
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
    if Path(folder).suffix.lower() == ".gguf":  # dequantized by transformers' GGUF reader, then quantized in place
        return load_causal_lm(folder, trust)
    settings = {"block_size": quant.block_size, "double_quant": quant.double_quant}
    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=trust)
    with no_init_weights(), _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust, dtype=torch.float32)
    model.tie_weights()
    quantize = plan_quantization(model)
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
        want = getattr(owner, leaf).shape  # the shape config.json gives, on the meta device
        if tensor.shape != want:
            raise InputError(f"{file}: tensor {key} is {tuple(tensor.shape)} but the config needs {tuple(want)}; "
                             "the weights belong to another model, or config.json was edited")
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
    allocator.trim()  # quantizing's temporaries (distances to the 16 levels) are freed: hand them back
    return model.eval()  # as from_pretrained returns it


def apply(model: Any, tokenizer: Any, base_folder: Path, lora_section: LoraConfig, quant: QuantConfig,
          seed: int) -> Prepared:
    """``method=qlora``: quantize the base's linear layers to NF4, then add a LoRA adapter."""
    block, double = quant.block_size, quant.double_quant
    quantize = checked_plan(model)
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
    prepared.summary.update({
        "quant_block_size": block, "quant_double_quant": double,
        "quantized_layers": len(quantize),
        "bytes_per_quantized_param": memory["bytes_per_quantized_param"],
        "weight_memory_mb": memory["weight_bytes"] / 2**20,
        "weight_memory_fp32_mb": memory["weight_bytes_fp32"] / 2**20,
        "weight_memory_bf16_mb": memory["weight_bytes_bf16"] / 2**20,
    })
    return prepared
