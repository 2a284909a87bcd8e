"""What a method hands back: the model made ready to train, and how to save what it learned."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class Prepared:
    """A model made ready to train by a method, and how to save what it learned."""

    model: torch.nn.Module
    save: Callable[[Path], None]
    summary: dict[str, Any] = field(default_factory=dict)
