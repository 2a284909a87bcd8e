"""bf16 autocast on a frozen base: same numbers as autocast's own linear, no weight copy saved."""

from __future__ import annotations

import torch
from torch import nn

from lmtune.frozen_matmul import frozen_linear
from lmtune.methods.lora_layer import LoRALinear, LoRASpec


def _saved(fn):
    """Storages autograd saves while ``fn`` runs, as (shape, dtype)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = (tuple(t.shape), t.dtype)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, list(seen.values())


def test_lora_layer_under_bf16_autocast_equals_plain_autocast_and_saves_no_weight_copy():
    torch.manual_seed(0)
    base = nn.Linear(96, 160)
    layer = LoRALinear(base)
    layer.add_adapter("default", LoRASpec(r=4))
    nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(3, 5, 96, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(3, 5, 160)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, saved = _saved(lambda: layer(x))
        # the same layer through autocast's own F.linear: the reference numbers
        y_ref = base(x_ref) + layer.specs["default"].scaling * layer.lora_B["default"](layer.lora_A["default"](x_ref))
    y.backward(g)
    grads = [p.grad.clone() for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight)]
    layer.zero_grad()
    y_ref.to(y.dtype).backward(g)
    torch.testing.assert_close(y, y_ref.to(y.dtype), atol=0, rtol=0)
    # Backward's bf16 matmul may block its sums differently: one bf16 rounding step (2^-8) apart at most.
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=2**-8)
    for got, p in zip(grads, (layer.lora_A["default"].weight, layer.lora_B["default"].weight), strict=True):
        torch.testing.assert_close(got, p.grad, atol=1e-6, rtol=2**-8)
    assert (160, 96) not in [shape for shape, _ in saved]  # no bf16 copy of the base weight kept


def test_outside_autocast_or_for_a_trained_weight_it_is_plain_linear():
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(2, 3)
    _, saved = _saved(lambda: frozen_linear(x, w, None))
    assert saved  # plain F.linear saves its input for the weight gradient
    torch.testing.assert_close(frozen_linear(x, w.detach(), None), x @ w.detach().t())
