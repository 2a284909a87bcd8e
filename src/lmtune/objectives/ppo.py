"""PPO for language models, as pure functions over per-token tensors.

One rollout gives, for each response token t of each sequence: the policy's log-prob when it
was sampled, the reference's log-prob, and the value estimate. From them (Ziegler et al.,
2019; Ouyang et al., 2022; the formulas of TRL's PPO trainer):

    reward_t    = −kl_coef · (log π(a_t) − log π_ref(a_t))   [+ score at the last token]
    δ_t         = reward_t + γ · V_{t+1} − V_t                (V after the last token = 0)
    A_t         = δ_t + γλ · A_{t+1}                          (GAE), returns R_t = A_t + V_t
    policy loss = mean_t max(−A_t · ρ_t, −A_t · clip(ρ_t, 1 ± ε)),  ρ_t = π_new / π_old
    value loss  = ½ · mean_t max((V_new − R)², (clip(V_new, V_old ± ε_v) − R)²)

Every tensor is (B, T) over response positions; ``mask`` is 1 on real response tokens (the
EOS included) and 0 on padding after it. Means are over masked positions.
"""

from __future__ import annotations

import torch

from lmtune.data.batching import last_token_index


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1 (a scalar)."""
    return (values * mask).sum() / mask.sum()


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise masked entries to mean 0 and (unbiased) variance 1; outside the mask is 0.

    Whitening advantages per rollout keeps the policy step's size independent of the reward's
    scale. ``shift_mean=False`` only rescales (kept for rewards, whose sign matters).
    """
    mean = masked_mean(values, mask)
    n = mask.sum()
    var = masked_mean((values - mean) ** 2, mask) * n / (n - 1).clamp(min=1)  # Bessel's correction
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def per_token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                      mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The KL-penalised per-token rewards of a rollout.

    Args:
        scores: (B,) sequence scores (reward model or function), added at each last token.
        logprobs: (B, T) log π of the sampled tokens when they were sampled.
        ref_logprobs: (B, T) log π_ref of the same tokens.
        mask: (B, T) 1 on response tokens.
        kl_coef: weight of the per-token KL penalty.

    Returns:
        ``(rewards, kl)``, both (B, T) and zero outside the mask; ``kl`` is the per-token
        estimate log π − log π_ref whose sum over a response estimates KL(π‖π_ref).
    """
    kl = (logprobs - ref_logprobs) * mask  # (B, T)
    rewards = -kl_coef * kl  # (B, T)
    last = last_token_index(mask)  # (B,) index of each last response token
    rows = torch.arange(mask.shape[0], device=mask.device)  # (B,)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns (Schulman et al., 2016).

    Args:
        rewards: (B, T) per-token rewards.
        values: (B, T) value estimates at the rollout.
        mask: (B, T) 1 on response tokens; values and rewards after the end count as 0.
        gamma: discount γ.
        lam: GAE λ (0: one-step TD, 1: Monte Carlo).

    Returns:
        ``(advantages, returns)``, both (B, T), zero outside the mask (not yet whitened).
    """
    rewards, values = rewards * mask, values * mask
    steps = rewards.shape[1]
    advantages = torch.zeros_like(rewards)  # (B, T)
    running = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] if t + 1 < steps else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages * mask, (advantages + values) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_range: float) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate loss (a scalar, mean over masked tokens).

    Returns:
        ``(loss, metrics)`` with ``clip_fraction`` (share of tokens whose clipped term won)
        and ``approx_kl`` (½·mean (log ρ)², how far this update moved from the rollout policy).
    """
    # Masked to 0 outside the responses: padding's log-probs are arbitrary, exp() of them must stay finite.
    log_ratio = (logprobs - old_logprobs) * mask  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped = -advantages * ratio  # (B, T)
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)  # (B, T)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {"clip_fraction": masked_mean((clipped > unclipped).float(), mask).item(),
                   "approx_kl": masked_mean(0.5 * log_ratio.float() ** 2, mask).item()}
    return loss, metrics


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss ½·max((V−R)², (clip(V, V_old ± ε)−R)²), mean over masked tokens.

    Returns:
        ``(loss, metrics)`` with ``value_clip_fraction``.
    """
    clipped_values = torch.clamp(values, old_values - clip_range, old_values + clip_range)  # (B, T)
    unclipped_loss = (values - returns) ** 2  # (B, T)
    clipped_loss = (clipped_values - returns) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.max(unclipped_loss, clipped_loss), mask)
    with torch.no_grad():
        metrics = {"value_clip_fraction": masked_mean((clipped_loss > unclipped_loss).float(), mask).item()}
    return loss, metrics
