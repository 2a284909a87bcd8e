"""Group-relative policy optimisation (GRPO), as pure functions over per-token tensors.

GRPO (Shao et al., 2024, DeepSeekMath) drops PPO's value model: each prompt is answered
``G`` times, and a completion's advantage is its reward relative to the others of its group.
The formulas follow TRL's ``GRPOTrainer`` (tests check them within 1e-6):

    A_i         = (r_i − mean_group r) / (std r + 1e-4)    std over the group (``group``), the whole
                                                           batch (``batch``), or no division (``none``,
                                                           Dr. GRPO, Liu et al., 2025)
    ρ_t         = exp(log π(a_t) − log π_old(a_t))
    ℓ_t         = −min(ρ_t A, clip(ρ_t, 1 − ε, 1 + ε_high) A) + β · (e^{q_t} − q_t − 1),  q_t = log π_ref − log π
    grpo        mean over sequences of (mean over the sequence's tokens of ℓ_t)
    dapo        mean over all tokens of the batch (DAPO, Yu et al., 2025: long answers weigh more)
    dr_grpo     sum of ℓ_t / (sequences × max_completion_length)  (a constant: no length bias)

Every per-token tensor is (B, T) over completion positions; ``mask`` is 1 on real completion
tokens (EOS included) and 0 on padding after it.
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")


def group_advantages(rewards: torch.Tensor, num_generations: int,
                     scale_rewards: str = "group") -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative advantages of a generation batch.

    Args:
        rewards: (N,) total reward of each completion; the ``num_generations`` completions of one
            prompt are consecutive (N = prompts × G).
        num_generations: G, completions per prompt (at least 2: one completion has no group).
        scale_rewards: ``group`` (divide by the group's std), ``batch`` (by the std of all N)
            or ``none`` (only centre on the group mean).

    Returns:
        ``(advantages, tied)``: (N,) advantages, and (N / G,) booleans marking groups whose
        rewards all tie (std 0: their advantages are 0 and they teach nothing).

    Raises:
        ValueError: N not a multiple of G, G < 2, or an unknown ``scale_rewards``.
    """
    if num_generations < 2 or rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of num_generations={num_generations} (>= 2)")
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"unknown scale_rewards '{scale_rewards}'; expected one of {', '.join(SCALE_REWARDS)}")
    grouped = rewards.view(-1, num_generations)  # (P, G)
    group_std = grouped.std(dim=1)  # (P,) unbiased, as TRL's nanstd
    mean = grouped.mean(dim=1).repeat_interleave(num_generations)  # (N,)
    advantages = rewards - mean  # (N,)
    if scale_rewards == "group":
        advantages = advantages / (group_std.repeat_interleave(num_generations) + 1e-4)
    elif scale_rewards == "batch":
        advantages = advantages / (rewards.std() + 1e-4)
    return advantages, torch.isclose(group_std, torch.zeros_like(group_std))


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, epsilon: float = 0.2,
              epsilon_high: float | None = None, beta: float = 0.0, loss_type: str = "grpo",
              max_completion_length: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO's clipped surrogate (plus the optional KL term) over one micro-batch.

    Args:
        logps: (B, T) log π of the sampled completion tokens under the policy being trained.
        old_logps: (B, T) the same under the policy that sampled them (the generation batch's).
        ref_logps: (B, T) the same under the reference; needed only when ``beta > 0``.
        advantages: (B,) group-relative advantages (``group_advantages``).
        mask: (B, T) 1 on completion tokens.
        epsilon: lower clip ε (ratio ≥ 1 − ε).
        epsilon_high: upper clip (ratio ≤ 1 + ε_high; DAPO's clip-higher); ``None``: ε.
        beta: weight of the per-token KL estimate e^q − q − 1 to the reference (k3 of Schulman).
        loss_type: ``grpo``, ``dapo`` or ``dr_grpo`` (the normalisation; see the module doc).
        max_completion_length: the constant of ``dr_grpo``'s normaliser.

    Returns:
        ``(loss, metrics)``: the scalar loss as TRL computes it for one batch, and
        ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean`` (shares of
        tokens whose clipped term was taken) and ``kl`` (mean per-token estimate, when β > 0).

    Raises:
        ValueError: an unknown ``loss_type``, ``dr_grpo`` without ``max_completion_length``,
            or ``beta > 0`` without ``ref_logps``.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown GRPO loss '{loss_type}'; expected one of {', '.join(LOSS_TYPES)}")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("loss_type=dr_grpo needs max_completion_length (its constant normaliser)")
    if beta != 0.0 and ref_logps is None:
        raise ValueError("beta > 0 needs the reference log-probs")
    high = epsilon if epsilon_high is None else epsilon_high
    adv = advantages.unsqueeze(1)  # (B, 1): one advantage for every token of a completion
    # Masked to 0 outside the completions: padding's log-probs are arbitrary, exp() of them must stay finite.
    ratio = torch.exp((logps - old_logps) * mask)  # (B, T)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + high)  # (B, T)
    per_token = -torch.min(ratio * adv, clipped * adv)  # (B, T)
    if beta != 0.0:
        q = (ref_logps - logps) * mask  # (B, T)
        per_token_kl = torch.exp(q) - q - 1  # (B, T) ≥ 0, unbiased for KL(π‖π_ref) under samples of π
        per_token = per_token + beta * per_token_kl
    masked = per_token * mask  # (B, T)
    if loss_type == "grpo":
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "dapo":
        loss = masked.sum() / mask.sum().clamp(min=1.0)
    else:
        loss = masked.sum() / (per_token.shape[0] * max_completion_length)

    with torch.no_grad():
        tokens = mask.sum().clamp(min=1.0)
        low = ((ratio < 1 - epsilon) & (adv < 0)).float()  # (B, T)
        high_clip = ((ratio > 1 + high) & (adv > 0)).float()  # (B, T)
        metrics = {"clip_ratio/low_mean": ((low * mask).sum() / tokens).item(),
                   "clip_ratio/high_mean": ((high_clip * mask).sum() / tokens).item(),
                   "clip_ratio/region_mean": ((torch.max(low, high_clip) * mask).sum() / tokens).item()}
        if beta != 0.0:
            metrics["kl"] = ((per_token_kl * mask).sum() / tokens).item()
    return loss, metrics
