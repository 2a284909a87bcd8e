"""PPO: the pure pieces against their published definitions, and the ppo objective end to end.

TRL 1.16 no longer ships a PPO trainer, so the oracle is the textbook form of each formula
written independently here (sums over future steps, per-element loops), not a copy of the
recursions in ``lmtune.objectives.ppo``.
"""

from __future__ import annotations

import math

import pytest
import torch

from lmtune.objectives.ppo import gae, masked_whiten, per_token_rewards, policy_loss, value_loss


def _rollout(seed: int = 0, b: int = 3, t: int = 5):
    g = torch.Generator().manual_seed(seed)
    lengths = [t, 2, 1][:b]
    mask = torch.zeros(b, t, dtype=torch.float64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    rand = lambda: torch.randn(b, t, generator=g, dtype=torch.float64)  # noqa: E731
    return mask, lengths, rand


def test_gae_matches_the_discounted_sum_of_td_errors():
    mask, lengths, rand = _rollout()
    rewards, values = rand(), rand()
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for i, n in enumerate(lengths):
        v = values[i, :n].tolist() + [0.0]  # the value after the last token is 0
        deltas = [rewards[i, s].item() + gamma * v[s + 1] - v[s] for s in range(n)]
        for s in range(n):
            expected = sum((gamma * lam) ** k * deltas[s + k] for k in range(n - s))
            assert adv[i, s].item() == pytest.approx(expected, abs=1e-12)
            assert ret[i, s].item() == pytest.approx(expected + v[s], abs=1e-12)
        assert adv[i, n:].abs().sum() == 0 and ret[i, n:].abs().sum() == 0


def test_gae_with_lambda_one_and_gamma_one_gives_reward_to_go_minus_value():
    mask, lengths, rand = _rollout(1)
    rewards, values = rand(), rand()
    adv, _ = gae(rewards, values, mask, 1.0, 1.0)
    for i, n in enumerate(lengths):
        for s in range(n):
            assert adv[i, s].item() == pytest.approx(rewards[i, s:n].sum().item() - values[i, s].item(), abs=1e-12)


def test_per_token_rewards_put_the_score_on_the_last_token_and_penalise_kl():
    mask, lengths, rand = _rollout(2)
    logp, ref = rand(), rand()
    scores = torch.tensor([1.5, -2.0, 0.25], dtype=torch.float64)
    rewards, kl = per_token_rewards(scores, logp, ref, mask, kl_coef=0.3)
    for i, n in enumerate(lengths):
        for s in range(n):
            expected = -0.3 * (logp[i, s] - ref[i, s]).item() + (scores[i].item() if s == n - 1 else 0.0)
            assert rewards[i, s].item() == pytest.approx(expected, abs=1e-12)
            assert kl[i, s].item() == pytest.approx((logp[i, s] - ref[i, s]).item(), abs=1e-12)
        assert rewards[i, n:].abs().sum() == 0 and kl[i, n:].abs().sum() == 0


def test_whitening_gives_zero_mean_unit_unbiased_variance_on_the_mask():
    mask, _, rand = _rollout(3)
    x = rand() * 5 + 3
    w = masked_whiten(x, mask)
    kept = w[mask.bool()]
    assert kept.mean().item() == pytest.approx(0.0, abs=1e-9)
    assert kept.var(unbiased=True).item() == pytest.approx(1.0, abs=1e-6)
    assert w[~mask.bool()].abs().sum() == 0
    raw = x[mask.bool()]
    assert torch.allclose(kept, (raw - raw.mean()) / torch.sqrt(raw.var(unbiased=True) + 1e-8))


def test_policy_loss_matches_the_clipped_surrogate_elementwise():
    mask, _, rand = _rollout(4)
    new, old, adv = rand() * 0.5, rand() * 0.5, rand()
    eps = 0.2
    loss, metrics = policy_loss(new, old, adv, mask, eps)
    terms, clipped = [], []
    for i, j in mask.nonzero().tolist():
        ratio = math.exp(new[i, j].item() - old[i, j].item())
        a = adv[i, j].item()
        unclipped_term, clipped_term = -a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)
        terms.append(max(unclipped_term, clipped_term))
        clipped.append(clipped_term > unclipped_term)
    assert loss.item() == pytest.approx(sum(terms) / len(terms), abs=1e-12)
    assert metrics["clip_fraction"] == pytest.approx(sum(clipped) / len(clipped), abs=1e-12)
    assert 0 < metrics["clip_fraction"] < 1  # the inputs exercise both branches


def test_value_loss_matches_the_clipped_squared_error_elementwise():
    mask, _, rand = _rollout(5)
    v_new, v_old, ret = rand(), rand(), rand()
    eps = 0.2
    loss, metrics = value_loss(v_new, v_old, ret, mask, eps)
    terms, clipped = [], []
    for i, j in mask.nonzero().tolist():
        v, vo, r = v_new[i, j].item(), v_old[i, j].item(), ret[i, j].item()
        vc = min(max(v, vo - eps), vo + eps)
        terms.append(max((v - r) ** 2, (vc - r) ** 2))
        clipped.append((vc - r) ** 2 > (v - r) ** 2)
    assert loss.item() == pytest.approx(0.5 * sum(terms) / len(terms), abs=1e-12)
    assert metrics["value_clip_fraction"] == pytest.approx(sum(clipped) / len(clipped), abs=1e-12)


def test_policy_loss_at_the_rollout_policy_is_minus_mean_advantage():
    mask, _, rand = _rollout(6)
    logp, adv = rand(), rand()
    loss, metrics = policy_loss(logp, logp, adv, mask, 0.2)
    assert loss.item() == pytest.approx(-(adv * mask).sum().item() / mask.sum().item(), abs=1e-12)
    assert metrics["clip_fraction"] == 0.0 and metrics["approx_kl"] == 0.0
