"""Packing: several examples per row, each attending only to itself.

Padding variable-length examples to the longest in a batch wastes compute on pad tokens;
packing fills each row of ``max_length`` with whole examples instead. Three things keep a
packed row equivalent to its examples run one by one:

1. **Positions restart** at 0 for every example (``position_ids``), so position embeddings
   and RoPE see what they would see unpacked.
2. **No attention across examples.** Plain causal attention over the row would let example 2
   read example 1. ``segment_attention`` (registered with ``transformers``' ``AttentionInterface``)
   finds the examples from the restarting ``position_ids`` and runs causal attention on each
   slice separately: cost Σ Lᵢ² instead of T², and no T×T mask is ever built.
   ``block_mask_attention`` gives the same result in one call per layer with a dense
   block-diagonal mask (T² per row); on CPU it measured faster, because the CPU kernel's cost
   per call barely depends on the length (benchmarks/sft_packing.py), so ``sft_loss`` uses it there.
3. **No loss across examples.** The first token of every example carries no label, so the last
   token of one example is never trained to predict the start of the next.
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from lmtune.data.batching import count_loss_tokens, pad_rows
from lmtune.data.examples import IGNORE

ATTENTION_NAME = "lmtune_segments"
BLOCK_MASK = "lmtune_block_mask"


def pack_examples(examples: list[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Pack whole examples into rows of at most ``max_length`` tokens (best fit, longest first).

    Returns:
        Rows with ``input_ids``, ``labels`` and ``position_ids`` (restarting at 0 per example);
        every example's first label is ``-100``. Deterministic for a given input order.
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row index), sorted: best fit = smallest that fits
    for i in order:
        n = len(examples[i]["input_ids"])
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens, more than the row length {max_length}")
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            space, row = free.pop(at)
        else:
            space, row = max_length, len(rows)
            rows.append([])
        rows[row].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, row))
    return [_join([examples[i] for i in sorted(members)]) for members in rows]


def _join(parts: list[dict[str, list[int]]]) -> dict[str, list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for part in parts:
        ids += part["input_ids"]
        labels += [IGNORE] + part["labels"][1:]
        positions += list(range(len(part["input_ids"])))
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def collate_packed(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    """Stack packed rows, right-padding with a segment of its own.

    No ``attention_mask`` is returned: the ``position_ids`` say which tokens belong together,
    and padding after the last example is a separate segment no real token attends to.

    Returns:
        ``input_ids``, ``labels``, ``position_ids`` (B, T), ``num_loss_tokens`` and
        ``num_input_tokens`` (the real tokens, padding tail excluded).
    """
    ids, mask = pad_rows([r["input_ids"] for r in rows], pad_id)  # (B, T)
    labels, _ = pad_rows([r["labels"] for r in rows], IGNORE)  # (B, T)
    positions, _ = pad_rows([r["position_ids"] for r in rows], 0)  # (B, T)
    # The padding tail counts 0, 1, ... from where its row ends: a segment of its own.
    tail = torch.arange(ids.shape[1]) - mask.sum(1, keepdim=True)  # (B, T)
    positions = torch.where(mask.bool(), positions, tail)  # (B, T)
    return {"input_ids": ids, "labels": labels, "position_ids": positions,
            "num_loss_tokens": count_loss_tokens(labels),
            "num_input_tokens": int(mask.sum())}  # no attention mask to count them from: the padding tail is not read


def segment_bounds(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the ``(start, end)`` of each segment: a segment starts wherever the position is 0."""
    starts = (position_ids == 0).tolist()  # one device sync per forward layer; cheap next to attention
    bounds = []
    for row in starts:
        cuts = [t for t, s in enumerate(row) if s and t > 0] + [len(row)]
        bounds.append(list(zip([0] + cuts[:-1], cuts)))
    return bounds


def segment_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      position_ids: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Causal attention within each packed segment, never across.

    Args:
        module: the attention module (for ``num_key_value_groups``).
        query: (B, H, T, D). key, value: (B, Hkv, T, D).
        attention_mask: unused; the mask interface passes ``None`` for this implementation.
        scaling: softmax scale. dropout: attention dropout probability.
        position_ids: (B, T) or (1, T), restarting at 0 for each segment.

    Returns:
        ``(output (B, T, H, D), None)``, the layout ``transformers`` attention functions return.
    """
    if position_ids is None or query.shape[2] != key.shape[2]:
        raise RuntimeError("segment_attention needs position_ids and no KV cache; it is for packed training only")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: share each KV head among its query heads
        key = key.repeat_interleave(groups, dim=1)  # (B, H, T, D)
        value = value.repeat_interleave(groups, dim=1)  # (B, H, T, D)
    position_ids = position_ids.expand(query.shape[0], -1)  # (B, T)
    rows = []
    # unbind/split rather than slicing: their backward concatenates the pieces' gradients once,
    # where every slice would allocate and add a full-size gradient of its own.
    for bounds, q, k, v in zip(segment_bounds(position_ids), query.unbind(0), key.unbind(0), value.unbind(0)):
        sizes = [e - s for s, e in bounds]
        pieces = [F.scaled_dot_product_attention(qs.unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0),
                                                 dropout_p=dropout, is_causal=True, scale=scaling)  # (1, H, L, D)
                  for qs, ks, vs in zip(q.split(sizes, dim=1), k.split(sizes, dim=1), v.split(sizes, dim=1))]
        rows.append(torch.cat(pieces, dim=2))  # (1, H, T, D)
    out = torch.cat(rows, dim=0)  # (B, H, T, D)
    return out.transpose(1, 2).contiguous(), None  # (B, T, H, D)


def block_mask_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                         position_ids: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The same attention as ``segment_attention`` in one call, with a dense block-diagonal causal mask.

    Costs T² per row instead of Σ Lᵢ², but one kernel call per layer instead of one per
    example; on CPU with short examples the call overhead dominates (see benchmarks/sft_packing.py).
    Shapes as ``segment_attention``.
    """
    if position_ids is None or query.shape[2] != key.shape[2]:
        raise RuntimeError("block_mask_attention needs position_ids and no KV cache; it is for packed training only")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)  # (B, H, T, D)
        value = value.repeat_interleave(groups, dim=1)  # (B, H, T, D)
    segment = (position_ids.expand(query.shape[0], -1) == 0).cumsum(-1)  # (B, T) example index per token
    t = torch.arange(query.shape[2], device=query.device)
    mask = (segment[:, :, None] == segment[:, None, :]) & (t[:, None] >= t[None, :])  # (B, T, T)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask[:, None], dropout_p=dropout,
                                         scale=scaling)  # (B, H, T, D)
    return out.transpose(1, 2).contiguous(), None  # (B, T, H, D)


IMPLEMENTATIONS = {ATTENTION_NAME: segment_attention, BLOCK_MASK: block_mask_attention}


def _register() -> None:
    from transformers import AttentionInterface

    for name, fn in IMPLEMENTATIONS.items():
        AttentionInterface.register(name, fn)


@contextlib.contextmanager
def packed_attention(model: torch.nn.Module, implementation: str = ATTENTION_NAME) -> Iterator[None]:
    """Run ``model`` (or any wrapper around it) with per-example attention inside the block.

    Args:
        model: the model or wrapper.
        implementation: ``lmtune_segments`` (one attention call per example) or
            ``lmtune_block_mask`` (one call per layer, dense block-diagonal mask).

    The implementation is switched on the configs only for the duration, so the saved
    ``config.json`` and generation keep the model's own attention.
    """
    _register()
    configs = {id(c): c for m in model.modules()
               if (c := getattr(m, "config", None)) is not None and hasattr(c, "_attn_implementation")}
    before = {k: c._attn_implementation for k, c in configs.items()}
    for c in configs.values():
        c._attn_implementation = implementation
    try:
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = before[k]
