"""``method=lora`` (and QLoRA's adapter half): wrap the target modules in LoRA layers, save PEFT's way.

The layer itself, with its picture, is ``lmtune.methods.lora_layer``; adapter folders are
``lmtune.methods.adapters``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmtune.config import LoraConfig
from lmtune.methods.adapter_files import base_fingerprint
from lmtune.methods.adapters import adapter_parameters, inject, save_adapter
from lmtune.methods.lora_layer import DEFAULT, LoRASpec
from lmtune.methods.prepared import Prepared
from lmtune.methods.targets import resolve_targets


def apply(model: nn.Module, tokenizer: Any, base_folder: Path, section: LoraConfig, seed: int, method: str = "lora",
          quantize: dict[str, Any] | None = None, quantize_only: set[str] | None = None) -> Prepared:
    """Freeze ``model``, add a fresh adapter on ``lora.target_modules``; save it PEFT's way.

    ``quantize``/``quantize_only``: QLoRA's NF4 settings and the targets that can take them.
    """
    spec = LoRASpec.from_config(section)
    fingerprint = base_fingerprint(model)  # before wrapping: the base the adapter belongs to
    names = resolve_targets(model, section.target_modules, dora=spec.dora)
    model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):  # A's init follows train.seed, without touching the global RNG
        torch.manual_seed(seed)
        inject(model, names, spec, DEFAULT, quantize, quantize_only)
    params = adapter_parameters(model)
    for p in params:
        p.requires_grad_(True)

    def save(out: Path) -> None:
        save_adapter(model, out, tokenizer, DEFAULT, base_folder,
                     {"method": method, "base_fingerprint": fingerprint, **({"quant": quantize} if quantize else {})})

    summary = {"lora_target_modules": len(names), "lora_scaling": spec.scaling,
               "adapter_params": sum(p.numel() for p in params)}
    return Prepared(model=model, save=save, summary=summary)

