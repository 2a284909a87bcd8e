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

Each chunk holds one float32 ``(n, V)`` buffer and reuses it in place (``exp``, softmax, the
gradient's ``onehot - softmax``): ``logsumexp`` would allocate a second one. Chunks are cut to
about ``CHUNK_BYTES`` of float32 logits (fewer than ``chunk_rows`` rows for a large vocabulary),
so under bf16 autocast the bf16 logits plus their float32 copy stay small too. Measured on a
50M Llama (V=32000) in a LoRA DPO step, where the reference pass's head ran on top of the
policy's saved activations: two 118 MiB float32 logit buffers were alive at the step's peak.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHUNK_ROWS = 1024
CHUNK_BYTES = 32 * 2**20  # float32 logits per chunk: 262 rows at V=32000, all 1024 at V=4096


def chunk_rows_for(vocab: int, chunk_rows: int = CHUNK_ROWS) -> int:
    """Rows per head chunk: at most ``chunk_rows``, and at most ``CHUNK_BYTES`` of float32 logits.

    ``vocab`` 0 (a head that does not say its output size) leaves ``chunk_rows`` as it is.
    """
    if vocab <= 0:
        return chunk_rows
    return max(1, min(chunk_rows, CHUNK_BYTES // (4 * vocab)))


def _logp_exp(z: torch.Tensor, y: torch.Tensor, in_place: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Target log-probs of float32 logits ``z`` (n, V); in place, ``z`` becomes ``exp(z - max)``.

    Returns ``(logp (n,), sum of exp (n, 1))``: ``z / sum`` is then the softmax, with no second
    (n, V) buffer (``torch.logsumexp`` allocates one for its ``exp``). ``in_place=False`` (logits
    autograd still needs) computes the very same numbers out of place, so a policy whose head trains
    and its frozen reference agree exactly where their weights do.
    """
    picked = z.gather(-1, y.unsqueeze(-1))  # (n, 1), taken before z is overwritten
    top = z.detach().amax(-1, keepdim=True)  # (n, 1); a shift only, no gradient (as in logsumexp)
    total = (z.sub_(top).exp_() if in_place else (z - top).exp()).sum(-1, keepdim=True)  # (n, 1)
    return (picked - top - total.log()).squeeze(-1), total


def _chunk_logp(head: torch.nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()  # (n, V); float32 so bf16 autocast does not degrade the softmax
    # Checkpointed (trainable head): autograd needs the logits unchanged. No gradient (the
    # reference pass, eval): reuse the buffer.
    return _logp_exp(logits, y, in_place=not logits.requires_grad)[0]  # (n,)


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
            out[start:start + chunk], total = _logp_exp(z, yc)
            z.div_(total).neg_()  # -softmax, in place: no second (n, V) buffer
            z[torch.arange(z.shape[0], device=z.device), yc] += 1.0  # onehot - softmax
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
        chunk_rows: rows of logits computed at once (fewer for a large vocabulary:
            ``chunk_rows_for``).

    Returns:
        (N,) log-probabilities, differentiable w.r.t. ``h`` (and the head's parameters when
        they train).
    """
    if h.shape[0] == 0:
        return h.sum(-1).float()  # (0,), still attached to the graph
    chunk_rows = chunk_rows_for(getattr(head, "out_features", 0), chunk_rows)  # Linear and LoRA-wrapped heads
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
