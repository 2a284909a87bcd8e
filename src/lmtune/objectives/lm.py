"""Next-token loss over the positions that carry labels, without materialising all logits.

The model body runs once; the output head and cross-entropy then run only on the rows whose
next token has a label, in chunks, each chunk recomputed during backward (activation
checkpointing) so that at most ``chunk`` rows of ``V`` logits exist at any moment. With a
32k vocabulary and a batch of 8×512 that is the difference between ~500 MB and ~16 MB.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lmtune.data.examples import IGNORE

CHUNK_ROWS = 1024


def final_hidden(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Last hidden states (B, T, H) for the batch's tokens.

    Wrappers that change the input (prompt tuning) provide ``forward_hidden``; plain
    ``transformers`` models run their ``base_model``.
    """
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if batch.get(k) is not None}
    if hasattr(model, "forward_hidden"):
        return model.forward_hidden(**kwargs)
    return model.base_model(**kwargs).last_hidden_state  # (B, T, H)


def output_head(model: Any) -> torch.nn.Module:
    """The module that maps hidden states to vocabulary logits."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings; it is not a causal LM")
    return head


def _chunk_ce(head: torch.nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()  # (n, V); float32 so bf16 autocast does not degrade the softmax
    return F.cross_entropy(logits, y, reduction="sum")


def lm_loss(model: Any, batch: dict[str, Any], chunk_rows: int = CHUNK_ROWS) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed next-token cross-entropy over labelled positions.

    Args:
        model: a causal LM (or wrapper) whose trainable parameters get gradients.
        batch: ``input_ids`` (B, T), ``attention_mask`` (B, T), ``labels`` (B, T) unshifted,
            optional ``position_ids`` (B, T).
        chunk_rows: rows of logits computed at once.

    Returns:
        ``(loss_sum, metrics)``; the loop divides by the number of loss tokens across its
        accumulation window so that 1×8 and 8×1 micro-batching give the same gradient.
    """
    hidden = final_hidden(model, batch)  # (B, T, H)
    targets = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at t
    keep = targets != IGNORE
    h = hidden[:, :-1][keep]  # (N, H) only rows that carry loss
    y = targets[keep]  # (N,)
    head = output_head(model)
    if h.shape[0] == 0:
        return hidden.sum() * 0.0, {}
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk_rows):
        hc, yc = h[start:start + chunk_rows], y[start:start + chunk_rows]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_ce, head, hc, yc, use_reentrant=False)
        else:
            total = total + _chunk_ce(head, hc, yc)
    return total, {}


def per_token_logprobs(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Log-probability of each labelled next token, (B, T-1), zero where unlabelled.

    Used by preference objectives (sums over completion tokens) and evaluation.
    """
    hidden = final_hidden(model, batch)  # (B, T, H)
    logits = output_head(model)(hidden[:, :-1]).float()  # (B, T-1, V)
    targets = batch["labels"][:, 1:]  # (B, T-1)
    keep = targets != IGNORE
    safe = targets.masked_fill(~keep, 0)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return logp * keep
