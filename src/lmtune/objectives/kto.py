"""Kahneman–Tversky optimisation (KTO, Ethayarajh et al., 2024) on unpaired feedback.

Each example is one completion labelled desirable or undesirable, not a pair. Its implicit
reward ``r = log π(y|x) − log π_ref(y|x)`` is compared with a reference point ``z``: an
estimate of KL(π‖π_ref) from completions paired with *other* examples' prompts (TRL shifts
the completions of a batch by one), clamped at 0 and not differentiated. The formulas
follow TRL's ``KTOTrainer`` (tests check them within 1e-6):

    z            = max(0, mean_i (log π(y_{i−1}|x_i) − log π_ref(y_{i−1}|x_i)))
    desirable    λ_D · (1 − σ(β (r − z)))
    undesirable  λ_U · (1 − σ(β (z − r)))
    loss         mean over the batch's examples
"""

from __future__ import annotations

import torch


def kl_reference_point(policy_kl: torch.Tensor, ref_kl: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z from mismatched (prompt, completion) log-probs.

    Args:
        policy_kl: (B,) summed log π of each prompt's mismatched completion.
        ref_kl: (B,) the same under the reference.

    Returns:
        () the clamped batch-mean log-ratio, detached (z is a baseline, not a target).
    """
    return (policy_kl - ref_kl).mean().detach().clamp(min=0)


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
             beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean KTO loss over a batch of labelled completions and the metrics KTO runs log.

    Args:
        policy_logps: (B,) summed completion log-probs under π.
        ref_logps: (B,) the same under π_ref.
        desirable: (B,) booleans, True for desirable completions.
        kl: () the reference point z (``kl_reference_point``).
        beta: scale of the implicit reward.
        desirable_weight: λ_D, weight of desirable examples' losses.
        undesirable_weight: λ_U, weight of undesirable examples' losses.

    Returns:
        ``(loss, metrics)``: the scalar mean loss, and ``kl``, plus ``rewards/chosen`` and
        ``logps/chosen`` (means over desirable examples), ``rewards/rejected`` and
        ``logps/rejected`` (over undesirable ones) and ``rewards/margins`` when both occur.
    """
    desirable = desirable.bool()
    ratio = policy_logps - ref_logps  # (B,)
    chosen_losses = 1 - torch.sigmoid(beta * (ratio[desirable] - kl))  # (D,)
    rejected_losses = 1 - torch.sigmoid(beta * (kl - ratio[~desirable]))  # (U,)
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses))  # (B,)
    metrics = {"kl": float(kl)}
    with torch.no_grad():
        for side, rows in (("chosen", desirable), ("rejected", ~desirable)):
            if rows.any():
                metrics[f"rewards/{side}"] = (beta * ratio[rows]).float().mean().item()
                metrics[f"logps/{side}"] = policy_logps[rows].float().mean().item()
        if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return losses.mean(), metrics
