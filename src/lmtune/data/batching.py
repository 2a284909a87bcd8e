"""Turn lists of examples into padded tensors, find the last real token, order examples deterministically."""

from __future__ import annotations

from typing import Any

import torch

from lmtune.data.examples import IGNORE


def pad_rows(rows: list[list[int]], value: int, left: bool = False, min_width: int = 0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ragged rows of ints into one tensor, padded with ``value`` to the longest row.

    Args:
        rows: B lists of ints.
        value: what padding positions hold.
        left: pad before the row (prompts for generation) instead of after it.
        min_width: pad to at least this many columns (e.g. 1, so that all-empty rows still stack).

    Returns:
        ``(values, mask)``, both (B, T) long; ``mask`` is 1 on the rows' own entries.
    """
    lengths = torch.tensor([len(r) for r in rows])  # (B,)
    width = max(min_width, int(lengths.max()) if len(rows) else 0)
    values = torch.full((len(rows), width), value, dtype=torch.long)  # (B, T)
    positions = torch.arange(width)  # (T,)
    mask = (positions >= width - lengths[:, None]) if left else (positions < lengths[:, None])  # (B, T)
    if any(len(r) for r in rows):
        values[mask] = torch.tensor([t for r in rows for t in r], dtype=torch.long)  # row-major, like the mask
    return values, mask.long()


def pad_batch(examples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-pad ``input_ids`` and ``labels`` to the longest example.

    Padding is marked by ``attention_mask`` (not by comparing ids with ``pad_id``), so a real
    EOS that shares its id with padding keeps its label.

    Returns:
        ``input_ids`` (B, T), ``attention_mask`` (B, T), ``labels`` (B, T) with ``-100`` on
        padding, and ``num_loss_tokens``: how many positions predict a label.
    """
    ids, mask = pad_rows([e["input_ids"] for e in examples], pad_id)  # (B, T)
    labels, _ = pad_rows([e["labels"] for e in examples], IGNORE)  # (B, T)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "num_loss_tokens": count_loss_tokens(labels)}


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of ``mask`` (the last real token), for right or left padding alike.

    Args:
        mask: (B, T), 1 on real tokens.

    Returns:
        (B,) long indices (0 for a row with no 1).
    """
    positions = torch.arange(mask.shape[1], device=mask.device)  # (T,)
    return (positions * mask.long()).argmax(dim=-1)  # (B,)


def count_loss_tokens(labels: torch.Tensor) -> int:
    """Positions that carry loss; position 0 never does since nothing precedes it."""
    return int((labels[:, 1:] != IGNORE).sum())


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A permutation of ``range(n)`` that depends only on (seed, epoch): resumable and reproducible."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()
