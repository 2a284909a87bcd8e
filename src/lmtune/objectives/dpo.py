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

Two reference-free variants take per-token *average* log-probs ``a = log π(y|x) / |y|``
(TRL's ``ORPOTrainer`` and ``CPOTrainer(loss_type="simpo")``):

    orpo     NLL(chosen) − β · log σ(log odds(a_c) − log odds(a_r)),  odds(a) = e^a / (1 − e^a)
    simpo    −(1−ε)·log σ(β (a_c − a_r) − γ) − ε·log σ(−β (a_c − a_r) + γ)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "orpo", "simpo")
REFERENCE_FREE = ("orpo", "simpo")  # no reference model, no reference forward


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
        raise ValueError(f"unknown DPO loss '{loss_type}'; expected one of {', '.join(LOSS_TYPES[:4])}")
    return losses.mean(), _reward_metrics(beta * chosen_ratio, beta * rejected_ratio, policy_chosen, policy_rejected)


@torch.no_grad()
def _reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, policy_chosen: torch.Tensor,
                    policy_rejected: torch.Tensor) -> dict[str, float]:
    """Batch means of the implicit rewards (B,) and policy log-probs (B,) that preference runs log."""
    chosen_rewards, rejected_rewards = chosen_rewards.float(), rejected_rewards.float()
    return {"rewards/chosen": chosen_rewards.mean().item(),
            "rewards/rejected": rejected_rewards.mean().item(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
            "logps/chosen": policy_chosen.float().mean().item(),
            "logps/rejected": policy_rejected.float().mean().item()}


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, without cancellation on either side of −ln 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, chosen_nll: torch.Tensor,
              beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    """ORPO (Hong et al., 2024): the SFT loss on the chosen side plus an odds-ratio preference term.

    Args:
        chosen_avg: (B,) per-token average completion log-probs of the chosen completions.
        rejected_avg: (B,) the same for the rejected ones.
        chosen_nll: () the SFT negative log-likelihood of the chosen completions (token mean).
        beta: λ, the weight of the odds-ratio term.

    Returns:
        ``(loss, metrics)``: the scalar loss and the reward metrics of ``dpo_loss`` (rewards are
        β · average log-probs) plus ``nll_loss``, ``log_odds_ratio`` and ``log_odds_chosen``.
    """
    chosen_avg, rejected_avg = chosen_avg.float(), rejected_avg.float()
    log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))  # (B,)
    ratio = F.logsigmoid(log_odds)  # (B,)
    loss = chosen_nll - beta * ratio.mean()
    metrics = _reward_metrics(beta * chosen_avg, beta * rejected_avg, chosen_avg, rejected_avg)
    metrics.update({"nll_loss": float(chosen_nll.detach()), "log_odds_ratio": ratio.mean().item(),
                    "log_odds_chosen": log_odds.mean().item()})
    return loss, metrics


def simpo_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """SimPO (Meng et al., 2024): a length-normalised margin loss with target margin γ, no reference.

    Args:
        chosen_avg: (B,) per-token average completion log-probs of the chosen completions.
        rejected_avg: (B,) the same for the rejected ones.
        beta: scale of the implicit reward β · average log-prob.
        gamma: target reward margin γ.
        label_smoothing: ε, the assumed share of flipped labels (as cDPO).

    Returns:
        ``(loss, metrics)``: the scalar mean loss and the reward metrics of ``dpo_loss``.
    """
    logits = (chosen_avg - rejected_avg) - gamma / beta  # (B,)
    losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
              - F.logsigmoid(-beta * logits) * label_smoothing)  # (B,)
    return losses.mean(), _reward_metrics(beta * chosen_avg, beta * rejected_avg, chosen_avg, rejected_avg)
