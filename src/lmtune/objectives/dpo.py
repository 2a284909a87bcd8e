"""Direct Preference Optimization and its variants, as pure functions of sequence log-probs.

DPO (Rafailov et al., 2023) trains the policy π directly on preference pairs: the implicit
reward of a completion is ``β · (log π(y|x) − log π_ref(y|x))`` and the loss is the
Bradley–Terry negative log-likelihood that the chosen completion out-scores the rejected one.
Every argument is the log-probability of a whole completion, summed over its tokens; the
prompt never counts. The formulas follow TRL's ``DPOTrainer`` (tests check them within 1e-6):

    d = (log π_c − log π_ref,c) − (log π_r − log π_ref,r)
    sigmoid  −(1−ε)·log σ(β d) − ε·log σ(−β d)           (ε > 0: conservative DPO, cDPO)
    robust   (−(1−ε)·log σ(β d) + ε·log σ(−β d)) / (1−2ε)  (rDPO, unbiased under flip rate ε)
    hinge    max(0, 1 − β d)                                (SLiC)
    ipo      (d_c/n_c − d_r/n_r − 1/(2β))²                  (IPO, per-token averaged log-ratios)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean preference loss over a batch of pairs and the metrics DPO runs log.

    Args:
        policy_chosen: (B,) summed completion log-probs of the chosen completions under π.
        policy_rejected: (B,) the same for the rejected completions.
        ref_chosen: (B,) summed completion log-probs of the chosen completions under π_ref.
        ref_rejected: (B,) the same for the rejected completions.
        beta: strength of the pull toward the reference (IPO: its τ).
        loss_type: ``sigmoid``, ``ipo``, ``hinge`` or ``robust``.
        label_smoothing: ε, the assumed share of flipped labels (sigmoid: cDPO; robust: rDPO,
            needs ε < 0.5).
        chosen_lengths: (B,) completion token counts; IPO divides the log-ratios by them (as
            TRL does). Without them IPO uses the summed log-ratios of the paper's equation.
        rejected_lengths: (B,) the same for the rejected completions.

    Returns:
        ``(loss, metrics)``: the scalar mean loss, and ``rewards/chosen``, ``rewards/rejected``
        (β-scaled log-ratios), ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``,
        ``logps/rejected`` averaged over the batch.

    Raises:
        ValueError: an unknown ``loss_type``, or ``robust`` with ε ≥ 0.5.
    """
    chosen_ratio = policy_chosen - ref_chosen  # (B,)
    rejected_ratio = policy_rejected - ref_rejected  # (B,)
    delta = chosen_ratio - rejected_ratio  # (B,)
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)  # (B,)
    elif loss_type == "robust":
        if not 0 <= eps < 0.5:
            raise ValueError(f"robust DPO needs label_smoothing in [0, 0.5), got {eps}")
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)  # (B,)
    elif loss_type == "ipo":
        if chosen_lengths is not None and rejected_lengths is not None:
            # Summed log-ratios grow with length and the squared loss with their square; per-token
            # averages keep β meaningful across lengths (TRL's choice, confirmed by IPO's authors).
            delta = (chosen_ratio / chosen_lengths.clamp(min=1) -
                     rejected_ratio / rejected_lengths.clamp(min=1))  # (B,)
        losses = (delta - 1 / (2 * beta)) ** 2  # (B,)
    else:
        raise ValueError(f"unknown DPO loss '{loss_type}'; expected one of {', '.join(LOSS_TYPES)}")

    with torch.no_grad():
        chosen_rewards = beta * chosen_ratio.float()  # (B,)
        rejected_rewards = beta * rejected_ratio.float()  # (B,)
        metrics = {
            "rewards/chosen": chosen_rewards.mean().item(),
            "rewards/rejected": rejected_rewards.mean().item(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
            "logps/chosen": policy_chosen.float().mean().item(),
            "logps/rejected": policy_rejected.float().mean().item(),
        }
    return losses.mean(), metrics
