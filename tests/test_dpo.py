"""DPO: the pure loss against TRL's own DPOTrainer code, and the dpo objective end to end."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lmtune.objectives.dpo import dpo_loss

B, T = 4, 6
METRIC_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected")


def _trl_dpo(per_token: torch.Tensor, completion_mask: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, loss_type: str, beta: float, label_smoothing: float):
    """Run TRL 1.16's ``DPOTrainer._compute_loss`` on given per-token log-probs.

    The model is a stand-in returning ``log_probs`` (what TRL's fused LM head returns); the
    reference log-probs come in precomputed, so every number TRL computes is its own code's.
    """
    from trl import DPOTrainer

    def model(**kwargs):
        zeros = torch.zeros_like(per_token)
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=label_smoothing, use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    n = per_token.shape[0]
    inputs = {"input_ids": torch.zeros(n, T, dtype=torch.long), "attention_mask": torch.ones(n, T, dtype=torch.long),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = DPOTrainer._compute_loss(trainer, model, inputs, False)
    return loss, {k: v[0] for k, v in trainer._metrics["train"].items()}


def _pairs(seed: int = 0):
    """Per-token log-probs for B chosen then B rejected rows with completions of 1..T-1 tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T, (2 * B,), generator=g)  # (2B,)
    completion_mask = (torch.arange(T) >= T - lengths[:, None]).long()  # (2B, T) completion at the end
    per_token = -torch.rand(2 * B, T - 1, generator=g, dtype=torch.float64) * 4 * completion_mask[:, 1:]
    ref_chosen = -torch.rand(B, generator=g, dtype=torch.float64) * 8
    ref_rejected = -torch.rand(B, generator=g, dtype=torch.float64) * 8
    return per_token, completion_mask, ref_chosen, ref_rejected, lengths


@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0),
                                                       ("robust", 0.1), ("robust", 0.0)])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_loss_matches_trl_dpo_trainer(loss_type, label_smoothing, beta):
    per_token, mask, ref_c, ref_r, lengths = _pairs()
    trl_loss, trl_metrics = _trl_dpo(per_token, mask, ref_c, ref_r, loss_type, beta, label_smoothing)
    logps = per_token.sum(-1)  # (2B,)
    loss, metrics = dpo_loss(logps[:B], logps[B:], ref_c, ref_r, beta, loss_type, label_smoothing,
                             chosen_lengths=lengths[:B], rejected_lengths=lengths[B:])
    assert abs(loss.item() - trl_loss.item()) < 1e-6
    for key in METRIC_KEYS:
        assert abs(metrics[key] - trl_metrics[key]) < 1e-6, key


def test_label_smoothed_sigmoid_is_conservative_dpo():
    """cDPO's published form (TRL's sigmoid loss before 1.0): (1-ε)·BCE(label 1) + ε·BCE(label 0)."""
    per_token, _, ref_c, ref_r, _ = _pairs(1)
    logps = per_token.sum(-1)
    beta, eps = 0.2, 0.15
    logits = (logps[:B] - ref_c) - (logps[B:] - ref_r)
    expected = (-F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps).mean()
    loss, _ = dpo_loss(logps[:B], logps[B:], ref_c, ref_r, beta, "sigmoid", eps)
    assert abs(loss.item() - expected.item()) < 1e-12


def test_sigmoid_loss_is_ln2_and_margins_zero_when_policy_is_reference():
    logps = torch.tensor([-3.0, -7.5, -1.25])
    loss, metrics = dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert metrics["rewards/margins"] == 0.0
    assert metrics["rewards/accuracies"] == 0.0  # ties do not count as correct


def test_loss_gradient_raises_chosen_and_lowers_rejected():
    chosen = torch.tensor([-4.0], requires_grad=True)
    rejected = torch.tensor([-4.0], requires_grad=True)
    loss, _ = dpo_loss(chosen, rejected, torch.tensor([-4.0]), torch.tensor([-4.0]), beta=0.5)
    loss.backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()  # descent raises log π_c, lowers log π_r


def test_robust_refuses_label_smoothing_of_one_half():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="0.5"):
        dpo_loss(x, x, x, x, 0.1, "robust", 0.5)


def test_unknown_loss_type_is_refused():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="sigmoid"):
        dpo_loss(x, x, x, x, 0.1, "kto")


def read_metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
