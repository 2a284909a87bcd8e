"""Methods decide what trains: full, freeze, lora, qlora, prompt_tuning.

Each method module has ``apply(model, tokenizer, cfg, base_folder) -> Prepared``. They are
imported by name only when used, so ``lmtune --help`` stays fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

METHODS = {
    "full": "lmtune.methods.full",
    "freeze": "lmtune.methods.full",
    "lora": "lmtune.methods.lora",
    "qlora": "lmtune.methods.qlora",
    "prompt_tuning": "lmtune.methods.prompt_tuning",
}


@dataclass
class Prepared:
    """A model made ready to train by a method, and how to save what it learned."""

    model: torch.nn.Module
    save: Callable[[Path], None]
    summary: dict[str, Any] = field(default_factory=dict)


def apply_method(model: Any, tokenizer: Any, cfg: dict[str, Any], base_folder: Path) -> Prepared:
    """Apply ``cfg["method"]`` to ``model``."""
    module = importlib.import_module(METHODS[cfg["method"]])
    return module.apply(model, tokenizer, cfg, base_folder)
