"""4-bit NormalFloat (NF4) weights for QLoRA, with bounded dequantization temporaries.

NF4 (Dettmers et al., 2023) stores each weight as one of 16 levels placed at the quantiles of a
normal distribution, scaled per block of 64 weights by the block's absolute maximum. With
*double quantization* those per-block scales are themselves quantized to 8 bits in blocks of 256
(after subtracting their mean), which takes the cost of the scales from 32/64 = 0.5 bits to
~8/64 + 32/(64·256) ≈ 0.127 bits per weight:

    bytes per weight = 4/8 (codes) + 1/64 (int8 scales) + 4/(64·256) (fp32 scale of scales) ≈ 0.516

The quantizer reproduces torchao's ``NF4Tensor`` (the one torchtune's QLoRA uses) bit for bit
wherever that applies (tested), and extends it to every size: the last block of weights is
padded with zeros, and so is the last block of 256 scales, as bitsandbytes does. So SmolLM2's
576 × 576 projections (5,184 blocks, not a multiple of 256) quantize too; the padding is counted
in :func:`nf4_nbytes`. ``quant.double_quant=false`` keeps one fp32 scale per block (0.5625 B/weight).

Training never holds a dense copy of a weight. :func:`linear_4bit` is an autograd Function that
dequantizes a few rows at a time (at most :data:`DEQUANT_BLOCK` numbers) and multiplies them in
forward, and again in backward for the input gradient, into a few scratch buffers
(:class:`Scratch`) that every layer reuses; nothing but the 4-bit weight is kept for backward.
Dequantizing the whole weight (torchao's path) made every forward and backward allocate and free
a full-precision matrix per layer, and the allocator kept them: a QLoRA run's resident set was
barely below LoRA's. (What glibc still keeps of the other temporaries, activations and
gradients, ``lmtune.allocator`` hands back.)
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SCALER_BLOCK = 256  # scales per second-level block (QLoRA paper)
# The 16 NF4 levels, as torchao (and bitsandbytes) define them.
NF4_LEVELS = (-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
              0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0)
DEQUANT_BLOCK = 2**20  # weights dequantized at once in linear_4bit (4 MB in fp32)
_QUANT_CHUNK = 2**18  # weights compared with the 16 levels at once while quantizing (16 MB of distances)


def _padded(numel: int, block_size: int) -> int:
    """``numel`` rounded up to whole blocks (and to an even count: two codes per byte)."""
    unit = max(block_size, 2)
    return -(-numel // unit) * unit


def nf4_nbytes(numel: int, block_size: int = 64, double_quant: bool = True) -> int:
    """Bytes of an NF4 weight of ``numel`` elements, in closed form (what :meth:`NF4Weight.nbytes` measures).

    Codes: half a byte per weight, the last block padded. Double quantization: one int8 scale per
    block, one fp32 factor per (padded) block of 256 scales and one fp32 mean; otherwise one fp32
    scale per block.
    """
    padded = _padded(numel, block_size)
    blocks = padded // block_size
    if double_quant:
        return padded // 2 + blocks + 4 * -(-blocks // SCALER_BLOCK) + 4
    return padded // 2 + 4 * blocks


def _nearest_level(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest NF4 level of each value (first on ties, as torchao), in bounded chunks."""
    out = torch.empty(values.numel(), dtype=torch.uint8, device=values.device)  # (N,)
    for start in range(0, values.numel(), _QUANT_CHUNK):
        chunk = values[start:start + _QUANT_CHUNK].unsqueeze(-1)  # (c, 1)
        out[start:start + _QUANT_CHUNK] = (chunk - levels).abs().min(dim=-1).indices.to(torch.uint8)
    return out


class NF4Weight(nn.Module):
    """A 2-D weight in NF4: packed codes plus per-block scales (double-quantized or fp32).

    Buffers, so the weight moves with ``model.to(device)`` and never shows up as a parameter.

    Args:
        weight: the ``(rows, cols)`` weight to quantize (any float dtype).
        block_size: weights per scale.
        double_quant: quantize the scales to int8 in blocks of 256.
    """

    def __init__(self, weight: torch.Tensor, block_size: int = 64, double_quant: bool = True):
        super().__init__()
        rows, cols = weight.shape
        self.shape, self.dtype = (rows, cols), weight.dtype
        self.block_size, self.double_quant = block_size, double_quant
        numel, padded = rows * cols, _padded(rows * cols, block_size)
        flat = F.pad(weight.detach().float().flatten(), (0, padded - numel))  # (P,) zeros pad the last block
        blocks = flat.view(-1, block_size)  # (n_blocks, block)
        absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
        levels = torch.tensor(NF4_LEVELS, device=weight.device)
        safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax)).unsqueeze(-1)  # all-zero block: codes 0.0
        idx = _nearest_level((blocks / safe).flatten(), levels)  # (P,)
        self.register_buffer("codes", idx[::2] << 4 | idx[1::2])  # (P/2,) two weights per byte, first high
        pairs = torch.stack([levels.repeat_interleave(16), levels.repeat(16)], dim=-1)  # (256, 2) byte -> levels
        self.register_buffer("pairs", pairs, persistent=False)
        if double_quant:
            mean = absmax.mean()
            centred = absmax - mean  # (n_blocks,)
            n_groups = -(-centred.numel() // SCALER_BLOCK)
            grouped = F.pad(centred, (0, n_groups * SCALER_BLOCK - centred.numel())).view(n_groups, SCALER_BLOCK)
            spread = grouped.abs().amax(dim=1, keepdim=True)  # (groups, 1)
            factor = 256 / (2 * torch.where(spread > 0, spread, torch.ones_like(spread)))  # (groups, 1)
            q = (grouped * factor).round().clamp(-128, 127).to(torch.int8).flatten()[:centred.numel()]
            self.register_buffer("scales", q)  # (n_blocks,) int8
            self.register_buffer("factor", factor.flatten())  # (groups,) fp32
            self.register_buffer("mean", mean.reshape(1))  # (1,) fp32
        else:
            self.register_buffer("scales", absmax)  # (n_blocks,) fp32

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def block_scales(self, start: int, stop: int, scratch: Scratch | None = None) -> torch.Tensor:
        """The fp32 scales of blocks ``start:stop`` (in a ``scratch`` buffer when given)."""
        scratch = scratch or Scratch()
        if not self.double_quant:
            return self.scales[start:stop]
        # Whole scaler groups around the range, so each group divides by its factor as a view.
        lo = start // SCALER_BLOCK * SCALER_BLOCK
        hi = min(-(-stop // SCALER_BLOCK) * SCALER_BLOCK, self.scales.numel())
        s = scratch.get("scales", hi - lo, torch.float32, self.device).copy_(self.scales[lo:hi])  # int8 -> fp32
        full, g0 = (hi - lo) // SCALER_BLOCK, lo // SCALER_BLOCK
        s[:full * SCALER_BLOCK].view(full, SCALER_BLOCK).div_(self.factor[g0:g0 + full].unsqueeze(-1))
        if full * SCALER_BLOCK < hi - lo:  # the model's last, partial group
            s[full * SCALER_BLOCK:].div_(self.factor[g0 + full])
        return s.add_(self.mean)[start - lo:stop - lo]  # (stop-start,)

    def rows(self, start: int, stop: int, dtype: torch.dtype = torch.float32,
             scratch: Scratch | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of the dense weight, ``(stop-start, cols)``, decoding only the blocks they touch.

        With ``scratch`` the result lives in its reused buffers: valid until the next call with the
        same scratch. Without, in fresh memory of its own.
        """
        scratch = scratch or Scratch()
        cols, unit = self.shape[1], max(self.block_size, 2)
        first, last = start * cols, stop * cols  # element range wanted
        lo, hi = first // unit * unit, -(-last // unit) * unit  # widened to whole blocks (and bytes)
        n_bytes = (hi - lo) // 2
        idx = scratch.get("codes", n_bytes, torch.int32, self.device).copy_(self.codes[lo // 2:hi // 2])
        values = scratch.get("values", hi - lo, torch.float32, self.device).view(n_bytes, 2)
        torch.index_select(self.pairs, 0, idx, out=values)  # (n/2, 2): byte -> its two levels
        scales = self.block_scales(lo // self.block_size, hi // self.block_size, scratch)  # (blocks,)
        scaled = values.view(-1, self.block_size).mul_(scales.unsqueeze(-1))  # (blocks, block), in place
        dense = scaled.view(-1)[first - lo:last - lo].view(stop - start, cols)
        if dtype == torch.float32:
            return dense
        return scratch.get("cast", dense.numel(), dtype, self.device).view_as(dense).copy_(dense)

    def row_blocks(self) -> Iterator[tuple[int, int]]:
        """Row ranges of at most :data:`DEQUANT_BLOCK` weights each (one row when a row is longer)."""
        rows, cols = self.shape
        step = max(1, DEQUANT_BLOCK // cols)
        for start in range(0, rows, step):
            yield start, min(rows, start + step)

    def dequantize(self) -> torch.Tensor:
        """The whole dense weight, in the original dtype (for merging checks and DoRA norms, not training)."""
        return self.rows(0, self.shape[0], self.dtype)

    def nbytes(self) -> int:
        """Bytes held: codes and scales (and the scales' factors and mean)."""
        held = [self.codes, self.scales] + ([self.factor, self.mean] if self.double_quant else [])
        return sum(t.numel() * t.element_size() for t in held)


class Scratch(threading.local):
    """Reusable dequantization buffers, one per role and dtype, grown to the largest block asked for.

    One row block of any NF4 weight is decoded into the same few buffers, so the temporaries of a
    whole forward and backward are a few MB that stay put, instead of thousands of fresh
    allocations of a row block each (which the allocator kept around: benchmarks/QLORA.md).
    Thread-local: autograd may run backward on another thread than forward (CUDA).
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, role: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A 1-D tensor of ``numel`` elements, reused from the last request for ``role``."""
        key = (role, dtype, device)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = self.buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]

    def nbytes(self) -> int:
        """Bytes the buffers hold."""
        return sum(b.numel() * b.element_size() for b in self.buffers.values())


SCRATCH = Scratch()  # what linear_4bit decodes into (per thread)


def _block_matmul(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
    """``out = x @ wᵀ``, into ``out`` directly when it is a whole tensor, else via a reused buffer."""
    if out.is_contiguous():
        torch.mm(x, w.t(), out=out)
        return
    tmp = SCRATCH.get("product", out.numel(), out.dtype, out.device).view(out.shape)
    torch.mm(x, w.t(), out=tmp)
    out.copy_(tmp)


class _Linear4bit(torch.autograd.Function):
    """``x @ Wᵀ`` with ``W`` decoded a block of rows at a time, in forward and again in backward.

    Only the 4-bit weight is kept for backward (``W`` is frozen: no weight gradient, and so no need
    to save ``x``). At most one block of rows is dense at any moment, in :data:`SCRATCH`.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, q: NF4Weight) -> torch.Tensor:
        ctx.q, ctx.x_dtype = q, x.dtype
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        flat = x.reshape(-1, q.shape[1]).to(dtype)  # (M, d_in)
        out = flat.new_empty(flat.shape[0], q.shape[0])  # (M, d_out)
        with torch.autocast(x.device.type, enabled=False):
            for start, stop in q.row_blocks():
                _block_matmul(flat, q.rows(start, stop, dtype, SCRATCH), out[:, start:stop])  # (M, rows)
        return out.view(*x.shape[:-1], q.shape[0])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        q = ctx.q
        g = grad_out.reshape(-1, q.shape[0])  # (M, d_out)
        grad_x = g.new_zeros(g.shape[0], q.shape[1])  # (M, d_in)
        for start, stop in q.row_blocks():
            grad_x.addmm_(g[:, start:stop], q.rows(start, stop, g.dtype, SCRATCH))  # (M, rows) @ (rows, d_in)
        return grad_x.view(*grad_out.shape[:-1], q.shape[1]).to(ctx.x_dtype), None


def quantize(weight: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a 2-D weight of any size to NF4."""
    return NF4Weight(weight.detach().contiguous(), block_size, double_quant)


def dequantize(q: NF4Weight) -> torch.Tensor:
    """The dense weight the 4-bit codes stand for, in the original dtype."""
    return q.dequantize()


def linear_4bit(x: torch.Tensor, q: NF4Weight) -> torch.Tensor:
    """``x @ Wᵀ`` for a 4-bit ``W``; gradients flow to ``x`` only; no dense ``W`` is kept."""
    return _Linear4bit.apply(x, q)


def quant_nbytes(q: NF4Weight) -> int:
    """Bytes the 4-bit weight occupies: codes plus (quantized) scales."""
    return q.nbytes()

