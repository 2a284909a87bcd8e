"""Log-probabilities of target tokens through the output head, in chunks, without a recompute.

The output head is the largest single matmul of a small model with a big vocabulary
(d × V = 768 × 32000 is a quarter of a 125M model). Chunking it keeps at most ``chunk``
rows of ``V`` logits alive; the usual way to get gradients through the chunks
(``torch.utils.checkpoint``) runs the head matmul *three* times (forward, recompute,
backward). When the head is frozen (LoRA, QLoRA, prompt tuning, the DPO reference) its
gradient is needed only with respect to the hidden states, and that gradient is already
known in the forward pass::

    logp_t = z_t[y_t] - logsumexp(z_t),  z_t = W h_t
    d logp_t / d h_t = Wᵀ (onehot(y_t) - softmax(z_t))      # (H,), independent of the loss

so each chunk computes it right away (one more matmul, n×V by V×H) and drops its logits.
Backward is then a per-row scale: two head matmuls instead of three, and the same memory
(an n×H gradient instead of the n×H hidden chunk checkpointing keeps). Heads that train
(full fine-tuning) or are not a plain ``nn.Linear`` (LoRA on ``lm_head``) keep the
checkpointed path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHUNK_ROWS = 1024


def _chunk_logp(head: torch.nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()  # (n, V); float32 so bf16 autocast does not degrade the softmax
    return logits.gather(-1, y.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (n,)


class _FrozenHeadLogprobs(torch.autograd.Function):
    """Per-row target log-probs of ``h @ Wᵀ + b``; the gradient w.r.t. ``h`` is formed in forward."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
                chunk: int) -> torch.Tensor:
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)  # (N,)
        grad = torch.empty_like(h)  # (N, H) d logp / d h, filled chunk by chunk
        for start in range(0, h.shape[0], chunk):
            hc, yc = h[start:start + chunk], y[start:start + chunk]  # (n, H), (n,)
            z = F.linear(hc, weight, bias).float()  # (n, V)
            lse = torch.logsumexp(z, dim=-1)  # (n,)
            rows = torch.arange(z.shape[0], device=z.device)
            out[start:start + chunk] = z[rows, yc] - lse
            z.sub_(lse.unsqueeze(-1)).exp_().neg_()  # -softmax, in place: no second (n, V) buffer
            z[rows, yc] += 1.0  # onehot - softmax
            grad[start:start + chunk] = (z.to(weight.dtype) @ weight).to(h.dtype)  # (n, H)
        ctx.save_for_backward(grad)
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        (grad,) = ctx.saved_tensors
        return grad * g.unsqueeze(-1).to(grad.dtype), None, None, None, None  # (N, H)


def head_logprobs(head: torch.nn.Module, h: torch.Tensor, y: torch.Tensor, chunk_rows: int = CHUNK_ROWS
                  ) -> torch.Tensor:
    """``log p(y_t | h_t)`` for each row, (N,), float32, at most ``chunk_rows`` × V logits at a time.

    Args:
        head: the output head (``output_head(model)``).
        h: (N, H) hidden states of the positions that carry a target.
        y: (N,) target ids.
        chunk_rows: rows of logits computed at once.

    Returns:
        (N,) log-probabilities, differentiable w.r.t. ``h`` (and the head's parameters when
        they train).
    """
    if h.shape[0] == 0:
        return h.sum(-1).float()  # (0,), still attached to the graph
    needs_grad = torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.parameters()))
    if not needs_grad:
        return torch.cat([_chunk_logp(head, h[s:s + chunk_rows], y[s:s + chunk_rows])
                          for s in range(0, h.shape[0], chunk_rows)])
    frozen_linear = type(head) is torch.nn.Linear and not any(p.requires_grad for p in head.parameters())
    if frozen_linear:
        weight, bias = head.weight, head.bias
        if torch.is_autocast_enabled(h.device.type):  # run the head in the autocast dtype, as head(h) would
            dtype = torch.get_autocast_dtype(h.device.type)
            weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
            with torch.autocast(h.device.type, enabled=False):
                return _FrozenHeadLogprobs.apply(h.to(dtype), weight, bias, y, chunk_rows)
        return _FrozenHeadLogprobs.apply(h, weight, bias, y, chunk_rows)
    return torch.cat([checkpoint(_chunk_logp, head, h[s:s + chunk_rows], y[s:s + chunk_rows], use_reentrant=False)
                      for s in range(0, h.shape[0], chunk_rows)])
