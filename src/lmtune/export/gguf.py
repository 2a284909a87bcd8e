"""GGUF out: a (merged) Llama-family ``transformers`` model as one llama.cpp GGUF file.

Written with llama.cpp's own ``gguf`` package (``GGUFWriter``), with the metadata keys llama.cpp's
``convert_hf_to_gguf.py`` writes for these architectures:

- ``general.*``: architecture, name, file type (f32, f16, bf16, q8_0);
- ``<arch>.*``: context length, embedding length, block count, feed-forward length, head counts,
  RMS-norm epsilon, RoPE base and dimension count (and key/value length when a head is not
  ``hidden / heads`` wide);
- the tokenizer (``lmtune.export.vocab``) and the chat template the model was trained with.

Tensor names come from gguf's own map (``gguf.get_tensor_name_map``), so they follow llama.cpp.
For the ``llama`` architecture llama.cpp stores q/k projection rows permuted (its RoPE pairs
neighbouring dimensions, Hugging Face's pairs halves), as ``LlamaModel.permute`` does;
``transformers``' GGUF reader undoes it. 1-D tensors (norms, biases) stay f32 in every file
type, as llama.cpp keeps them; q8_0 applies to matrices whose rows split into 32-wide blocks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmtune.errors import InputError
from lmtune.export.vocab import add_vocab, gguf_vocab

DTYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass(frozen=True)
class Arch:
    """How one ``transformers`` model type is written: llama.cpp's architecture and q/k permutation."""

    gguf_name: str
    permute_qk: bool


# Mistral is llama.cpp's ``llama`` architecture; transformers reads a llama file whose name says
# "mistral" back as a Mistral model.
ARCHITECTURES = {"llama": Arch("llama", True), "mistral": Arch("llama", True), "qwen2": Arch("qwen2", False),
                 "qwen3": Arch("qwen3", False)}


def permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order: within each head, interleave the two rotary halves.

    ``weight`` (n_head * head_dim, d_in): rows [h, half, i] -> [h, i, half].
    """
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def check_exportable(config: Any) -> Arch:
    """The architecture record for ``config``, or the reason it cannot be exported.

    Raises:
        InputError: a model type the writer has no mapping for, or a variant (biased llama
            attention, RoPE scaling) the written file would not reproduce.
    """
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise InputError(f"GGUF export supports the Llama family ({', '.join(ARCHITECTURES)}); this model is "
                         f"{config.model_type!r}. Export it with llama.cpp's convert_hf_to_gguf.py instead.")
    if arch.permute_qk and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        raise InputError(f"this {config.model_type} model has attention/MLP biases, which llama.cpp's llama "
                         "architecture does not read")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise InputError(f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not written by lmtune's GGUF "
                         "export; the exported model would attend differently at long range")
    return arch


def _rope_theta(config: Any) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def add_hparams(writer: Any, config: Any, name: str) -> None:
    """The ``general.*`` and ``<arch>.*`` hyper-parameter keys."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(head_dim)
    if head_dim * heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)


def _encode(tensor: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """``(array, ggml type)`` for one tensor in file type ``dtype`` (1-D tensors stay f32)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    data = tensor.detach().to(torch.float32).cpu().numpy()
    if data.ndim < 2 or dtype == "f32":
        return data, Q.F32
    if dtype == "f16":
        return data.astype(np.float16), Q.F16
    if dtype == "q8_0" and data.shape[-1] % 32 == 0:
        return quants.quantize(data, Q.Q8_0), Q.Q8_0
    if dtype == "q8_0":  # rows that do not split into blocks of 32: f16, as llama.cpp falls back
        return data.astype(np.float16), Q.F16
    return quants.quantize(data, Q.BF16), Q.BF16


def gguf_tensors(model: nn.Module, arch: Arch) -> list[tuple[str, torch.Tensor]]:
    """The model's tensors under llama.cpp's names, q/k permuted for the llama architecture.

    Raises:
        InputError: a tensor gguf's name map has no name for (a module llama.cpp does not read).
    """
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_name.upper()], config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    tied = model.get_output_embeddings() is not None and (
        model.get_output_embeddings().weight is model.get_input_embeddings().weight)
    out = []
    for key, value in model.state_dict().items():
        if tied and key == "lm_head.weight":  # no output.weight: readers tie the head to token_embd
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise InputError(f"tensor {key} has no GGUF name in llama.cpp's {arch.gguf_name} architecture; "
                             "the model has modules the format does not describe")
        if arch.permute_qk and key.endswith("self_attn.q_proj.weight"):
            value = permute(value, heads)
        elif arch.permute_qk and key.endswith("self_attn.k_proj.weight"):
            value = permute(value, kv_heads)
        out.append((name, value))
    return out


def file_type(dtype: str) -> int:
    """``general.file_type`` (llama.cpp's ``LlamaFileType``) for a ``--dtype``."""
    from gguf import LlamaFileType as F

    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[dtype]


def write_gguf(model: nn.Module, tokenizer: Any, out: Path, dtype: str = "f16", name: str | None = None,
               chat_template: str | None = None) -> Path:
    """Write ``model`` and ``tokenizer`` as one GGUF file, atomically (a temporary file renamed into place).

    Args:
        model: a plain ``transformers`` causal LM of the Llama family (adapters merged).
        tokenizer: its byte-level BPE tokenizer.
        out: the ``.gguf`` path to write.
        dtype: ``f32``, ``f16``, ``bf16`` or ``q8_0``.
        name: ``general.name`` (default: the file's stem).
        chat_template: the template to store (default: the tokenizer's).

    Raises:
        InputError: an unsupported architecture, tokenizer or dtype (checked before writing).
    """
    import gguf

    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    arch = check_exportable(model.config)
    vocab = gguf_vocab(tokenizer, model.get_input_embeddings().weight.shape[0])
    tensors = gguf_tensors(model, arch)
    name = name or out.stem
    if model.config.model_type == "mistral" and "mistral" not in name.lower():
        name = f"mistral-{name}"  # how readers tell Mistral from Llama in a llama-architecture file
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        writer = gguf.GGUFWriter(tmp, arch.gguf_name)
        add_hparams(writer, model.config, name)
        writer.add_file_type(file_type(dtype))
        add_vocab(writer, vocab, chat_template if chat_template is not None else getattr(tokenizer, "chat_template",
                                                                                           None))
        for tensor_name, value in tensors:
            data, qtype = _encode(value, dtype)
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
