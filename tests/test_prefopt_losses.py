"""GRPO, ORPO, SimPO and KTO losses against TRL 1.16's own code on fixed inputs (within 1e-6).

TRL's loss code lives inside trainer methods; each oracle calls that method on a stand-in
``self`` holding only the attributes the method reads, with a stand-in model returning the
given log-probs, so every number TRL reports comes from its code, not a copy of it.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from lmtune.objectives.dpo import orpo_loss, simpo_loss
from lmtune.objectives.grpo import group_advantages, grpo_loss
from lmtune.objectives.kto import kl_reference_point, kto_loss

B, T, G = 6, 5, 3


def _accelerator():
    return SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0, gather=lambda x: x,
                           gather_for_metrics=lambda x: x, reduce=lambda x, reduction="sum": x)


def _completions(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 1, 3, 4, 2, 5])  # (B,)
    mask = (torch.arange(T) < lengths[:, None]).double()  # (B, T)
    logps = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3  # (B, T)
    old = logps + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3  # ratios on both sides of the clip
    ref = logps + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5
    advantages = torch.randn(B, generator=g, dtype=torch.float64)
    return logps, old, ref, advantages, mask


def _trl_grpo(logps, old, ref, advantages, mask, loss_type, beta, eps, eps_high, max_len):
    """``GRPOTrainer._compute_loss`` with the model's log-probs given and no vLLM or entropy terms."""
    from trl import GRPOTrainer

    n = logps.shape[0]
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        loss_type=loss_type, epsilon_low=eps, epsilon_high=eps_high, use_vllm=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, max_completion_length=max_len,
        accelerator=_accelerator(), _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)))
    inputs = {"prompt_ids": torch.zeros(n, 2, dtype=torch.long), "prompt_mask": torch.ones(n, 2, dtype=torch.long),
              "completion_ids": torch.zeros(n, T, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, {k: v[0] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta,eps_high", [(0.0, 0.2), (0.04, 0.28)])
def test_grpo_loss_matches_trl(loss_type, beta, eps_high):
    logps, old, ref, adv, mask = _completions()
    trl_loss, trl_metrics = _trl_grpo(logps, old, ref, adv, mask, loss_type, beta, 0.2, eps_high, max_len=8)
    loss, metrics = grpo_loss(logps, old, ref, adv, mask, epsilon=0.2, epsilon_high=eps_high, beta=beta,
                              loss_type=loss_type, max_completion_length=8)
    assert abs(loss.item() - trl_loss.item()) < 1e-6
    keys = ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"] + (["kl"] if beta else [])
    for key in keys:
        assert abs(metrics[key] - trl_metrics[key]) < 1e-6, key
    assert 0 < metrics["clip_ratio/region_mean"] < 1  # the inputs exercise the clip


def test_grpo_loss_gradient_matches_trl():
    logps, old, ref, adv, mask = _completions(1)
    ours = logps.clone().requires_grad_(True)
    theirs = logps.clone().requires_grad_(True)
    grpo_loss(ours, old, ref, adv, mask, 0.2, 0.28, 0.04, "grpo")[0].backward()
    _trl_grpo(theirs, old, ref, adv, mask, "grpo", 0.04, 0.2, 0.28, 8)[0].backward()
    assert torch.allclose(ours.grad, theirs.grad, atol=1e-9)


def _trl_advantages(rewards, num_generations, scale_rewards):
    """TRL's ``sum_then_normalize`` path of ``_generate_and_score_completions``, one reward function.

    That method samples and scores too, so the lines that turn rewards into advantages run
    here on the given rewards, with TRL's own ``nanstd``.
    """
    from trl.trainer.utils import nanstd

    mean_grouped = torch.nanmean(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations, dim=0)
    if scale_rewards in ("group", "none"):
        std = nanstd(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations, dim=0)
    else:
        std = nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean_grouped
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    return advantages


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_trl(scale):
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, 2.0, -1.0, 3.0, 0.0], dtype=torch.float64)
    advantages, tied = group_advantages(rewards, G, scale)
    assert torch.allclose(advantages, _trl_advantages(rewards, G, scale), atol=1e-9)
    assert tied.tolist() == [False, True, False]  # the middle group ties: no signal
    assert advantages[3:6].abs().max() == 0


def test_group_advantages_refuse_groups_that_do_not_divide():
    with pytest.raises(ValueError, match="num_generations"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="num_generations"):
        group_advantages(torch.zeros(4), 1)


def _avg_logps(seed: int):
    g = torch.Generator().manual_seed(seed)
    return (-torch.rand(4, generator=g, dtype=torch.float64) * 3 - 0.01,
            -torch.rand(4, generator=g, dtype=torch.float64) * 3 - 0.01)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_loss_matches_trl(beta):
    from trl.experimental.orpo import ORPOTrainer

    chosen, rejected = _avg_logps(2)
    chosen[0] = -0.2  # one value on each side of log1mexp's branch at −ln 2
    nll = torch.tensor(1.37, dtype=torch.float64)
    trainer = SimpleNamespace(beta=beta, accelerator=_accelerator())
    losses, chosen_r, rejected_r, ratio, log_odds = ORPOTrainer.odds_ratio_loss(trainer, chosen, rejected)
    trl_loss = nll - losses.mean()  # get_batch_loss_metrics' "full ORPO loss"
    loss, metrics = orpo_loss(chosen, rejected, nll, beta)
    assert abs(loss.item() - trl_loss.item()) < 1e-6
    assert abs(metrics["log_odds_ratio"] - ratio.item()) < 1e-6
    assert abs(metrics["log_odds_chosen"] - log_odds.item()) < 1e-6
    assert abs(metrics["rewards/chosen"] - chosen_r.mean().item()) < 1e-6
    assert abs(metrics["rewards/margins"] - (chosen_r - rejected_r).mean().item()) < 1e-6


@pytest.mark.parametrize("beta,gamma,smoothing", [(2.0, 0.5, 0.0), (0.1, 1.0, 0.1)])
def test_simpo_loss_matches_trl_cpo_trainer(beta, gamma, smoothing):
    from trl.experimental.cpo import CPOTrainer

    chosen, rejected = _avg_logps(3)
    trainer = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta,
                              label_smoothing=smoothing, accelerator=_accelerator())
    losses, chosen_r, rejected_r = CPOTrainer.cpo_loss(trainer, chosen, rejected)
    loss, metrics = simpo_loss(chosen, rejected, beta, gamma, smoothing)
    assert abs(loss.item() - losses.mean().item()) < 1e-6  # cpo_alpha=0: SimPO has no NLL term
    assert abs(metrics["rewards/accuracies"] - (chosen_r > rejected_r).double().mean().item()) < 1e-6


def _trl_kto(logps, kl_logps, ref_logps, ref_kl_logps, labels, beta, wd, wu):
    """``KTOTrainer._compute_loss`` with precomputed reference log-probs and a stand-in model."""
    from trl import KTOTrainer

    n, width = logps.shape[0], 4
    main_ids, kl_ids = torch.ones(n, width, dtype=torch.long), torch.full((n, width), 2, dtype=torch.long)

    def per_token(summed):  # the sum on the last position: TRL sums over positions itself
        out = torch.zeros(n, width - 1, dtype=summed.dtype)
        out[:, -1] = summed
        return out

    def model(input_ids, **kwargs):
        summed = logps if input_ids is main_ids else kl_logps
        zeros = torch.zeros(n, width - 1, dtype=summed.dtype)
        return SimpleNamespace(log_probs=per_token(summed), entropy=zeros, mean_logits=zeros)

    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_accelerator(), calculate_KL=True,
        precompute_ref_logps=True, loss_type="kto", beta=beta, desirable_weight=wd, undesirable_weight=wu,
        aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    mask = torch.ones(n, width, dtype=torch.long)
    inputs = {"input_ids": main_ids, "attention_mask": mask, "completion_mask": mask, "KL_input_ids": kl_ids,
              "KL_attention_mask": mask, "KL_completion_mask": mask, "label": labels, "ref_logps": ref_logps,
              "ref_KL_logps": ref_kl_logps}
    trainer._compute_kl_logps = lambda m, batch: KTOTrainer._compute_kl_logps(trainer, m, batch)
    loss = KTOTrainer._compute_loss(trainer, model, inputs, False)
    return loss, {k: v[0] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.7)])
@pytest.mark.parametrize("kl_shift", [0.0, -5.0])  # -5: the KL estimate is negative and clamps to 0
def test_kto_loss_matches_trl(weights, kl_shift):
    g = torch.Generator().manual_seed(4)
    logps = -torch.rand(6, generator=g, dtype=torch.float64) * 10
    ref = logps + torch.randn(6, generator=g, dtype=torch.float64)
    kl_logps = -torch.rand(6, generator=g, dtype=torch.float64) * 10
    ref_kl = kl_logps - torch.rand(6, generator=g, dtype=torch.float64) - kl_shift
    labels = torch.tensor([True, False, True, True, False, False])
    trl_loss, trl_metrics = _trl_kto(logps, kl_logps, ref, ref_kl, labels, 0.1, *weights)
    kl = kl_reference_point(kl_logps, ref_kl)
    assert (kl == 0) == (kl_shift != 0)
    loss, metrics = kto_loss(logps, ref, labels, kl, 0.1, *weights)
    assert abs(loss.item() - trl_loss.item()) < 1e-6
    for key in ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "rewards/margins"):
        assert abs(metrics[key] - trl_metrics[key]) < 1e-6, key
