"""LoRA: a frozen linear layer plus a trainable low-rank update; rsLoRA, DoRA, QLoRA.

                 x  (…, d_in)
          ┌──────┴───────────────┐
          │                      │ dropout
    ┌─────▼─────┐          ┌─────▼─────┐
    │     W     │ frozen   │     A     │ r × d_in   Kaiming-uniform (or gaussian)
    │ d_out×d_in│ (NF4 for └─────┬─────┘
    │           │  QLoRA)  ┌─────▼─────┐
    └─────┬─────┘          │     B     │ d_out × r  zeros: the update starts at exactly 0
          │                └─────┬─────┘
          │                      │ × s,  s = alpha/r   (rsLoRA: alpha/√r)
          └────────(+)───────────┘
                    │
     y = W x + s · B A dropout(x)            trainable: r·(d_in + d_out) numbers, not d_in·d_out

DoRA (Liu et al., 2024) splits the adapted weight into a direction and a magnitude per output:
``W' = m ⊙ (W + sBA) / ‖W + sBA‖`` (row norms, *detached* as the paper's §4.3 advises), with ``m``
trainable and initialised to ``‖W‖`` so that the model again starts unchanged.

GPT-2 stores its projections as ``Conv1D`` with the weight transposed (``d_in × d_out``) and
fuses q, k and v into one ``c_attn`` of width 3·d. LoRA treats the fused layer as one
``d_in × 3d`` matrix: A sees the input once, B's rows [0:d], [d:2d], [2d:3d] write the q, k and v
parts of the update. That is exactly PEFT's layout for ``c_attn``, so adapters interchange.

QLoRA is the constructor flag ``quantize_base=True``: W is stored in 4-bit NF4 (``lmtune.quant``)
and dequantized on the fly; A and B stay in full precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lmtune.config import LoraConfig
from lmtune.errors import InputError
from lmtune.frozen_matmul import frozen_linear
from lmtune.quant import dequantize, linear_4bit, quantize

DEFAULT = "default"  # adapter name used when only one adapter is in play (PEFT's name too)


@dataclass(frozen=True)
class LoRASpec:
    """One adapter's hyper-parameters (the ``lora.*`` keys)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    dora: bool = False
    init: str = "default"

    @property
    def scaling(self) -> float:
        """``alpha/r``, or ``alpha/√r`` for rsLoRA (keeps the update's size steady as r grows)."""
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r

    @classmethod
    def from_config(cls, section: LoraConfig) -> LoRASpec:
        """The spec of a ``lora`` config section."""
        return cls(r=section.r, alpha=float(section.alpha), dropout=float(section.dropout),
                   rslora=section.rslora, dora=section.dora, init=section.init)


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` / ``Conv1D`` with any number of named LoRA adapters, one active.

    Attribute names follow PEFT (``base_layer``, ``lora_A``, ``lora_B``,
    ``lora_magnitude_vector``), so a state-dict key maps to PEFT's by dropping the adapter name.

    Args:
        base: the layer to adapt; its parameters are frozen.
        quantize_base: store the base weight in NF4 (QLoRA).
        block_size: NF4 block size.
        double_quant: quantize the per-block scales too.
    """

    def __init__(self, base: nn.Module, quantize_base: bool = False, block_size: int = 64,
                 double_quant: bool = True):
        super().__init__()
        self.fan_in_fan_out = isinstance(base, Conv1D)  # Conv1D weight is (d_in, d_out)
        self.base_shape = tuple(base.weight.shape)
        self.in_features, self.out_features = self.base_shape if self.fan_in_fan_out else self.base_shape[::-1]
        base.requires_grad_(False)
        self.base_layer = base
        self.weight_4bit: Any = None
        if quantize_base:
            self.weight_4bit = quantize(self.dense_weight(), block_size, double_quant)  # (d_out, d_in) in 4 bits
            base.weight = None  # the full-precision copy goes; only the 4-bit one is kept
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.specs: dict[str, LoRASpec] = {}
        self.active: str | None = None
        self.merged: dict[str, torch.Tensor | None] = {}  # name -> DoRA row norms used (None for LoRA)

    @property
    def quantized(self) -> bool:
        return self.weight_4bit is not None

    def dense_weight(self) -> torch.Tensor:
        """The base weight as a ``(d_out, d_in)`` tensor (a view for full precision, decoded for NF4)."""
        if self.quantized:
            return dequantize(self.weight_4bit)
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    def base_device(self) -> torch.device:
        if self.quantized:
            return self.weight_4bit.device
        return self.base_layer.weight.device

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantized:
            if type(self.base_layer) is nn.Linear:  # no bf16 weight copy kept for backward under autocast
                return frozen_linear(x, self.base_layer.weight, self.base_layer.bias)
            return self.base_layer(x)

        y = linear_4bit(x, self.weight_4bit)  # (…, d_out)
        bias = self.base_layer.bias
        return y if bias is None else y + bias

    def add_adapter(self, name: str, spec: LoRASpec) -> None:
        """Attach a new adapter ``name`` (B = 0, so the layer's output is unchanged)."""
        if name in self.lora_A:
            raise InputError(f"an adapter named {name!r} is already loaded; choose another name")
        if spec.r > min(self.in_features, self.out_features):
            raise InputError(f"lora.r={spec.r} is larger than the layer ({self.out_features} × {self.in_features}); "
                             f"use r ≤ {min(self.in_features, self.out_features)}")
        device = self.base_device()
        a = nn.Linear(self.in_features, spec.r, bias=False, device=device)  # weight (r, d_in)
        b = nn.Linear(spec.r, self.out_features, bias=False, device=device)  # weight (d_out, r)
        if spec.init == "gaussian":
            nn.init.normal_(a.weight, std=1 / spec.r)
        else:
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)
        self.lora_A[name], self.lora_B[name] = a, b
        self.lora_dropout[name] = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.specs[name] = spec
        if spec.dora:
            with torch.no_grad():  # ‖W + s·BA‖ with B = 0: the magnitude the base already has
                norm = self.dense_weight().float().norm(dim=1)  # (d_out,)
            self.lora_magnitude_vector[name] = nn.Parameter(norm)
        if self.active is None:
            self.active = name

    def adapter_params(self, name: str) -> list[nn.Parameter]:
        params = [self.lora_A[name].weight, self.lora_B[name].weight]
        return params + ([self.lora_magnitude_vector[name]] if name in self.lora_magnitude_vector else [])

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s · B A`` as a ``(d_out, d_in)`` matrix."""
        return self.specs[name].scaling * (self.lora_B[name].weight @ self.lora_A[name].weight)

    def _dora_norm(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        # The norm is a constant for the gradient (DoRA §4.3): only m and the direction learn.
        with torch.no_grad():
            return (weight + self.delta_weight(name).to(weight.dtype)).norm(dim=1)  # (d_out,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)  # (…, d_out)
        name = self.active
        if name is None or name in self.merged or name not in self.lora_A:
            return y
        a, b = self.lora_A[name], self.lora_B[name]
        dropout = self.lora_dropout[name]
        xd = dropout(x).to(a.weight.dtype)  # adapters keep their own precision (fp32 on a bf16/NF4 base)
        update = b(a(xd)) * self.specs[name].scaling  # (…, d_out)
        if name not in self.lora_magnitude_vector:
            return y + update.to(y.dtype)
        weight = self.dense_weight().to(a.weight.dtype)  # (d_out, d_in)
        scale = self.lora_magnitude_vector[name] / self._dora_norm(name, weight)  # (d_out,)
        if isinstance(dropout, nn.Identity) or not self.training:
            bias = self.base_layer.bias
            base = (y if bias is None else y - bias).to(a.weight.dtype)  # W x, reused
        else:
            base = F.linear(xd, weight)  # W·dropout(x): DoRA rescales what the adapter saw
        return y + ((scale - 1) * base + scale * update).to(y.dtype)

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Fold adapter ``name`` into the base weight (full-precision bases only)."""
        if self.quantized:
            raise InputError("merging into a 4-bit NF4 base would round the update away (lossy); merge the "
                             "adapter into the original full-precision model: lmtune merge --model BASE --adapter DIR")
        if name in self.merged:
            return
        w = self.dense_weight()  # (d_out, d_in) view of the stored weight
        delta = self.delta_weight(name).to(torch.float32)
        merged = w.float() + delta
        norm = None
        if name in self.lora_magnitude_vector:
            norm = merged.norm(dim=1)  # (d_out,)
            merged = merged * (self.lora_magnitude_vector[name] / norm).unsqueeze(1)
        w.copy_(merged.to(w.dtype))
        self.merged[name] = norm

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        """Take a merged adapter back out of the base weight."""
        if name not in self.merged:
            return
        norm = self.merged.pop(name)
        w = self.dense_weight()
        restored = w.float()
        if norm is not None:
            restored = restored * (norm / self.lora_magnitude_vector[name]).unsqueeze(1)
        w.copy_((restored - self.delta_weight(name).float()).to(w.dtype))


    def extra_repr(self) -> str:
        kind = "NF4" if self.quantized else ("Conv1D" if self.fan_in_fan_out else "Linear")
        return f"{kind} {self.in_features}→{self.out_features}, adapters={list(self.lora_A)}, active={self.active}"


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRA layer of ``model`` by its module name (the name the base layer had)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
