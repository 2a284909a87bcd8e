"""4-bit NormalFloat (NF4) weights for QLoRA, built on torchao's ``NF4Tensor``.

NF4 (Dettmers et al., 2023) stores each weight as one of 16 levels placed at the quantiles of a
normal distribution, scaled per block of 64 weights by the block's absolute maximum. With
*double quantization* those per-block scales are themselves quantized to 8 bits in blocks of 256
(after subtracting their mean), which takes the cost of the scales from 32/64 = 0.5 bits to
~8/64 + 32/(64·256) ≈ 0.127 bits per weight:

    bytes per weight = 4/8 (codes) + 1/64 (int8 scales) + 4/(64·256) (fp32 scale of scales) ≈ 0.516

torchao's ``NF4Tensor`` (the implementation torchtune's QLoRA uses) always double-quantizes, with
forward and backward on CPU and GPU. ``quant.double_quant=false`` keeps torchao's 4-bit codes
but the block scales in fp32 (0.5625 bytes per weight): :class:`NF4Single`, a few lines on top.

A weight matrix quantizes when its size divides into whole blocks (and, with double
quantization, whole blocks of 256 scales); callers keep the others in full precision.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# torchao is imported inside the functions that need it: it is slow to import and noisy, and
# ``lmtune inspect`` only needs the arithmetic.

SCALER_BLOCK = 256  # scales per second-level block (QLoRA paper)
# The 16 NF4 levels, as torchao (and bitsandbytes) define them.
NF4_LEVELS = (-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
              0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0)


def quantize_problem(numel: int, block_size: int, double_quant: bool) -> str | None:
    """Why a weight of ``numel`` elements cannot be stored as NF4 (``None`` when it can)."""
    if numel % block_size:
        return f"{numel} weights do not divide into blocks of {block_size}"
    if double_quant and (numel // block_size) % SCALER_BLOCK:
        return (f"its {numel // block_size} block scales do not divide into blocks of {SCALER_BLOCK} "
                f"(needs a multiple of {block_size * SCALER_BLOCK} weights)")
    return None


def nf4_nbytes(numel: int, block_size: int = 64, double_quant: bool = True, scale_bytes: int = 4) -> int:
    """Bytes of an NF4 weight of ``numel`` elements, in closed form (what :func:`quant_nbytes` measures).

    Codes: ``numel/2``. Double quantization: one int8 scale per block, one ``scale_bytes``
    factor per 256 blocks and one mean; otherwise one fp32 scale per block.
    """
    blocks = numel // block_size
    if double_quant:
        return numel // 2 + blocks + (blocks // SCALER_BLOCK) * scale_bytes + scale_bytes
    return numel // 2 + blocks * 4


class NF4Single(nn.Module):
    """NF4 codes with one fp32 scale per block (no double quantization).

    The codes come from torchao's quantizer; only the decoding lives here. Buffers, so the
    weight moves with ``model.to(device)``.
    """

    def __init__(self, weight: torch.Tensor, block_size: int):
        super().__init__()
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor, get_block_absmax

        flat = weight.detach().float().flatten()  # (N,)
        n_blocks = flat.numel() // block_size
        self.shape = tuple(weight.shape)
        self.dtype = weight.dtype
        self.block_size = block_size
        levels = torch.tensor(NF4_LEVELS, device=weight.device)
        self.register_buffer("absmax", get_block_absmax(flat, block_size))  # (n_blocks,)
        self.register_buffer("codes", NF4Tensor.convert_to_norm_float_weight(flat, n_blocks, block_size, levels))
        self.register_buffer("levels", levels)

    def dequantize(self) -> torch.Tensor:
        hi = (self.codes >> 4).long()  # (N/2,) first weight of each byte
        lo = (self.codes & 0b1111).long()  # (N/2,) second weight
        codes = torch.stack([hi, lo], dim=-1).flatten()  # (N,)
        values = self.levels[codes].view(-1, self.block_size) * self.absmax.unsqueeze(-1)  # (n_blocks, block)
        return values.view(self.shape).to(self.dtype)

    def nbytes(self) -> int:
        return self.codes.nbytes + self.absmax.nbytes


class _LinearDequant(torch.autograd.Function):
    """``x @ W^T`` with ``W`` rebuilt from 4 bits in forward and again in backward (never stored)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: NF4Single) -> torch.Tensor:
        ctx.weight = weight
        return F.linear(x, weight.dequantize().to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_out @ ctx.weight.dequantize().to(grad_out.dtype), None


QuantWeight = Any  # torchao's NF4Tensor or NF4Single


def quantize(weight: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> QuantWeight:
    """Quantize a 2-D weight to NF4 (call :func:`quantize_problem` first)."""
    weight = weight.detach().contiguous()
    if double_quant:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        return to_nf4(weight, block_size, SCALER_BLOCK)
    return NF4Single(weight, block_size)


def dequantize(q: QuantWeight) -> torch.Tensor:
    """The dense weight the 4-bit codes stand for, in the original dtype."""
    return q.dequantize() if isinstance(q, NF4Single) else q.get_original_weight()


def linear_4bit(x: torch.Tensor, q: QuantWeight) -> torch.Tensor:
    """``x @ W^T`` for a 4-bit ``W``; gradients flow to ``x`` only."""
    if isinstance(q, NF4Single):
        return _LinearDequant.apply(x, q)
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4

    return linear_nf4(x, q)


def quant_nbytes(q: QuantWeight) -> int:
    """Bytes the 4-bit weight occupies: codes plus (quantized) scales."""
    if isinstance(q, NF4Single):
        return q.nbytes()
    return sum(t.numel() * t.element_size() for t in
               (q.quantized_data, q.quantized_scalers, q.quantization_factor, q.scaler_mean))
