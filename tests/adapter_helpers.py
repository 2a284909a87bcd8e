"""Helpers shared by the adapter tests: tiny models with adapters whose B is not zero."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import build_model, word_tokenizer
from lmtune.methods.adapters import inject, save_adapter
from lmtune.methods.lora_layer import LoRASpec
from lmtune.methods.targets import resolve_targets


def ids(batch: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, len(word_tokenizer()), (batch, length), generator=g)  # (B, T)


def logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out if torch.is_tensor(out) else out.logits


def randomize_adapters(model, seed: int = 1, std: float = 0.2) -> None:
    """Give every adapter tensor random values (B = 0 would hide any mistake in B's layout)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * std)


def adapted_model(arch: str, targets="all-linear", seed: int = 1, **spec):
    """A tiny model with one random (non-zero) adapter, plus its tokenizer."""
    tok = word_tokenizer()
    model = build_model(arch, tok)
    inject(model, resolve_targets(model, targets), LoRASpec(**{"r": 4, "alpha": 8.0, **spec}))
    randomize_adapters(model, seed)
    return model, tok


def saved_adapter(tmp_path: Path, arch: str, name: str = "adapter", **spec) -> tuple[Path, torch.nn.Module]:
    model, tok = adapted_model(arch, **spec)
    folder = tmp_path / name
    save_adapter(model, folder, tok)
    return folder, model
