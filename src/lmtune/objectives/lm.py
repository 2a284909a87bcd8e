"""Next-token loss over the positions that carry labels, without materialising all logits.

The model body runs once; the output head and cross-entropy then run only on the rows whose
next token has a label, in chunks, so that at most ``chunk`` rows of ``V`` logits exist at any
moment (``head_logprobs``: a frozen head gets its input gradient in the forward pass instead of
a checkpointed recompute). With a 32k vocabulary and a batch of 8×512 that is the difference
between ~500 MB and ~16 MB. ``perplexity`` is the same loss summed over a whole data set, which
``lmtune eval`` and the retain-loss guard (``regularize``) both report.
"""

from __future__ import annotations

from typing import Any

import torch

from lmtune.data.batching import pad_batch
from lmtune.data.examples import IGNORE
from lmtune.metrics import perplexity_from
from lmtune.objectives.head_logprobs import CHUNK_ROWS, head_logprobs

EVAL_BATCH = 16  # examples per forward when scoring perplexity


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


def labelled_logprobs(model: Any, batch: dict[str, Any], chunk_rows: int = CHUNK_ROWS
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probability of each labelled next token, through ``head_logprobs``.

    Returns:
        ``(logps (M,), rows (M,), hidden (B, T, H))``: one entry per position whose next token
        has a label, the batch row it belongs to, and the body's output.
    """
    hidden = final_hidden(model, batch)  # (B, T, H)
    targets = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at t
    keep = targets != IGNORE  # (B, T-1)
    h, y = hidden[:, :-1][keep], targets[keep]  # (M, H), (M,) only rows that carry loss
    return head_logprobs(output_head(model), h, y, chunk_rows), keep.nonzero()[:, 0], hidden


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
    logps, _, hidden = labelled_logprobs(model, batch, chunk_rows)  # (N,)
    if logps.shape[0] == 0:
        return hidden.sum() * 0.0, {}
    return -logps.sum(), {}


def completion_logps(model: Any, batch: dict[str, Any], chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """Summed log-probability of each row's labelled (completion) tokens, (N,) float32.

    What DPO compares between policy and reference; the body runs once over all rows and the
    head only on the positions that predict a completion token (a frozen head, as with LoRA,
    gets its input gradient in the forward pass: ``head_logprobs``).
    """
    logps, rows, hidden = labelled_logprobs(model, batch, chunk_rows)  # (M,), (M,)
    sums = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # (N,)
    return sums.index_add(0, rows, logps)


@torch.no_grad()
def perplexity(model: Any, examples: list[dict[str, list[int]]], pad_id: int,
               batch_size: int = EVAL_BATCH) -> dict[str, float | int]:
    """Token-weighted loss and perplexity: one sum over all scored tokens, one division.

    Returns:
        ``{"loss": mean nats per token, "perplexity": exp(loss), "tokens": scored tokens}``.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = pad_batch(examples[start:start + batch_size], pad_id)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        loss_sum, _ = lm_loss(model, batch)
        total += float(loss_sum)
        tokens += batch["num_loss_tokens"]
    model.train(was_training)
    return {"loss": total / max(tokens, 1), "perplexity": perplexity_from(total, tokens), "tokens": tokens}

