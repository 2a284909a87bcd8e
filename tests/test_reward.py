"""Reward modelling: the Bradley–Terry loss against TRL's RewardTrainer, scoring, saving, the objective."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from lmtune.objectives.reward import bradley_terry_loss, last_token_index

B = 5


def _trl_reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None,
                     center_coef: float | None):
    """TRL 1.16's ``RewardTrainer.compute_loss`` on given scores (the model is a stand-in)."""
    from trl import RewardTrainer

    scores = torch.cat([chosen, rejected]).unsqueeze(-1)  # (2B, 1) as a sequence-classification head returns

    def model(**kwargs):
        return SimpleNamespace(logits=scores)

    accelerator = SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=accelerator,
                              args=SimpleNamespace(center_rewards_coefficient=center_coef),
                              _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * B, 3, dtype=torch.long), "attention_mask": torch.ones(2 * B, 3)}
    if margin is not None:
        inputs["margin"] = margin
    loss = RewardTrainer.compute_loss(trainer, model, inputs)
    return loss, {k: v[0] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("use_margin", [False, True])
@pytest.mark.parametrize("center_coef", [0.0, 0.01])
def test_bradley_terry_matches_trl_reward_trainer(use_margin, center_coef):
    g = torch.Generator().manual_seed(3)
    chosen = torch.randn(B, generator=g, dtype=torch.float64)
    rejected = torch.randn(B, generator=g, dtype=torch.float64)
    margin = torch.rand(B, generator=g, dtype=torch.float64) if use_margin else None
    trl_loss, trl_metrics = _trl_reward_loss(chosen, rejected, margin, center_coef or None)
    loss, metrics = bradley_terry_loss(chosen, rejected, margin, center_coef)
    assert abs(loss.item() - trl_loss.item()) < 1e-6
    for key in ("accuracy", "margin", "mean_reward", "min_reward", "max_reward"):
        assert abs(metrics[key] - trl_metrics[key]) < 1e-6, key


def test_last_token_index_handles_right_and_left_padding():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 3, 0]
    assert last_token_index(left).tolist() == [3, 3, 3]
