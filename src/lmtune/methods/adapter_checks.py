"""Checks of an adapter folder's contents before they touch a model.

An adapter folder may come from anywhere. PEFT reads ``adapter_config.json`` leniently: a string
``use_dora: "false"`` is truthy, a string ``lora_alpha`` fails deep in a multiplication, and a
``lora_alpha`` of NaN or 1e308 or a NaN tensor loads and then generates garbage (or merges into
NaN weights) with exit status 0. Each is refused here with the file and the key named.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from lmtune.errors import InputError

MAX_ALPHA = 1e6  # alpha / r scales the update; far beyond any trained adapter's, short of overflow
BOOL_KEYS = ("use_dora", "use_rslora", "fan_in_fan_out")


def _number(config: dict[str, Any], key: str) -> float | None:
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"'{key}' must be a number, got {value!r}")
    if not math.isfinite(value):
        raise TypeError(f"'{key}' must be a finite number, got {value!r}")
    return float(value)


def check_adapter_config(config: Any, path: Path) -> dict[str, Any]:
    """``adapter_config.json``'s object, with its LoRA hyper-parameters of the right type and range.

    Raises:
        InputError: not an object; ``lora_alpha`` not a finite number in (0, 1e6]; ``lora_dropout``
            not in [0, 1); ``r`` not a positive integer; a boolean option that is not ``true``/``false``.
    """
    if not isinstance(config, dict):
        raise InputError(f"{path}: must hold a JSON object, but holds a {type(config).__name__}")
    try:
        alpha = _number(config, "lora_alpha")
        dropout = _number(config, "lora_dropout")
    except TypeError as e:
        raise InputError(f"{path}: {e}") from None
    if alpha is not None and not 0 < alpha <= MAX_ALPHA:
        raise InputError(f"{path}: 'lora_alpha' must be in (0, {MAX_ALPHA:g}], got {alpha:g}")
    if dropout is not None and not 0 <= dropout < 1:
        raise InputError(f"{path}: 'lora_dropout' must be in [0, 1), got {dropout:g}")
    r = config.get("r")
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r <= 0):
        raise InputError(f"{path}: 'r' must be a positive integer, got {r!r}")
    for key in BOOL_KEYS:
        if key in config and config[key] is not None and not isinstance(config[key], bool):
            raise InputError(f"{path}: '{key}' must be true or false, got {config[key]!r} (a JSON string such as "
                             "\"false\" would count as true)")
    return config


def check_finite_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse NaN or infinite values in an adapter's floating-point tensors, naming up to five."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise InputError(f"{path}: {len(bad)} tensor(s) hold NaN or infinite values ({', '.join(sorted(bad)[:5])}); "
                         "the adapter is damaged or was saved from a diverged run")
