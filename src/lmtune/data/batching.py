"""Turn lists of examples into padded tensors, and order them deterministically."""

from __future__ import annotations

from typing import Any

import torch

from lmtune.data.examples import IGNORE


def pad_batch(examples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-pad ``input_ids`` and ``labels`` to the longest example.

    Padding is marked by ``attention_mask`` (not by comparing ids with ``pad_id``), so a real
    EOS that shares its id with padding keeps its label.

    Returns:
        ``input_ids`` (B, T), ``attention_mask`` (B, T), ``labels`` (B, T) with ``-100`` on
        padding, and ``num_loss_tokens``: how many positions predict a label.
    """
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "num_loss_tokens": count_loss_tokens(labels)}


def count_loss_tokens(labels: torch.Tensor) -> int:
    """Positions that carry loss; position 0 never does since nothing precedes it."""
    return int((labels[:, 1:] != IGNORE).sum())


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A permutation of ``range(n)`` that depends only on (seed, epoch): resumable and reproducible."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()
