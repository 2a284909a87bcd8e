"""head_logprobs: chunked target log-probs whose frozen-head gradient is formed in the forward pass.

Oracle: full logits through the same head, ``log_softmax`` + gather, differentiated by autograd.
"""

from __future__ import annotations

import torch

from lmtune.objectives.head_logprobs import head_logprobs


def _oracle(head: torch.nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(head(h).float(), dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


def _case(bias: bool = True, trainable: bool = False, n: int = 37, v: int = 300, d: int = 24):
    torch.manual_seed(0)
    head = torch.nn.Linear(d, v, bias=bias).requires_grad_(trainable)
    h = torch.randn(n, d, requires_grad=True)
    y = torch.randint(0, v, (n,))
    w = torch.randn(n)  # an arbitrary upstream gradient per row (DPO weighs rows unevenly)
    return head, h, y, w


def _grads(fn, head, h, y, w):
    h.grad = None
    head.zero_grad(set_to_none=True)
    out = fn(head, h, y)
    (out * w).sum().backward()
    return out.detach(), h.grad.clone(), None if head.weight.grad is None else head.weight.grad.clone()


def test_frozen_head_values_and_input_gradient_match_full_logits():
    head, h, y, w = _case()
    got, gh, _ = _grads(lambda *a: head_logprobs(*a, chunk_rows=8), head, h, y, w)  # several chunks
    want, wh, _ = _grads(_oracle, head, h, y, w)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(gh, wh, rtol=0, atol=1e-6)


def test_frozen_head_without_bias_matches_full_logits():
    head, h, y, w = _case(bias=False)
    got, gh, _ = _grads(head_logprobs, head, h, y, w)
    want, wh, _ = _grads(_oracle, head, h, y, w)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(gh, wh, rtol=0, atol=1e-6)


def test_trainable_head_gets_its_weight_gradient():
    head, h, y, w = _case(trainable=True)
    got, gh, gw = _grads(lambda *a: head_logprobs(*a, chunk_rows=8), head, h, y, w)
    want, wh, ww = _grads(_oracle, head, h, y, w)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(gh, wh, rtol=0, atol=1e-6)
    torch.testing.assert_close(gw, ww, rtol=0, atol=1e-5)  # summed over chunks in another order


def test_bf16_autocast_stays_within_bf16_error():
    head, h, y, w = _case()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, gh, _ = _grads(head_logprobs, head, h, y, w)
    want, wh, _ = _grads(_oracle, head, h, y, w)
    assert got.dtype == torch.float32 and gh.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=5e-2)
    torch.testing.assert_close(gh, wh, rtol=0, atol=2e-2)


def test_no_grad_mode_returns_plain_values():
    head, h, y, _ = _case()
    with torch.no_grad():
        got = head_logprobs(head, h, y, chunk_rows=5)
    assert not got.requires_grad
    torch.testing.assert_close(got, _oracle(head, h, y).detach(), rtol=0, atol=1e-5)


def test_no_rows_gives_an_empty_attached_result():
    head, h, y, _ = _case(n=0)
    out = head_logprobs(head, h, y)
    assert out.shape == (0,) and out.requires_grad
    out.sum().backward()  # nothing to learn, but no error
