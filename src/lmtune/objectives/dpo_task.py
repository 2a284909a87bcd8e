"""Objective ``dpo``: preference pairs -> DPO (or IPO, hinge, robust, ORPO, SimPO) through the one loop.

Each step runs chosen and rejected through the policy in one batched forward; the reference
log-probs come from the frozen reference (adapter-disabled model or frozen copy) on the same
batch, or were computed once before training (``dpo.precompute_ref=true``: no copy is kept,
and each step runs one forward instead of two). ORPO and SimPO need no reference at all: no
copy is made and no reference forward runs.
"""

from __future__ import annotations

from typing import Any

import torch

from lmtune.config import KEYS, DPOConfig
from lmtune.data.preference import IDENTICAL, build_pairs, collate_pairs
from lmtune.distributed import pick_device
from lmtune.errors import InputError
from lmtune.objectives.dpo import REFERENCE_FREE, dpo_loss, orpo_loss, simpo_loss
from lmtune.objectives.lm import completion_logps
from lmtune.objectives.reference import Reference, disable_dropout
from lmtune.objectives.task import LossFn, RunContext, Task


def check_config(dpo: DPOConfig) -> None:
    """Reject settings the loss cannot use, before any model loads."""
    if dpo.loss == "robust" and not dpo.label_smoothing < 0.5:
        raise InputError(f"dpo.loss=robust needs dpo.label_smoothing below 0.5 (the share of flipped labels); "
                         f"got {dpo.label_smoothing}")
    if dpo.label_smoothing and dpo.loss in ("ipo", "hinge", "orpo"):
        raise InputError(f"dpo.label_smoothing applies to dpo.loss=sigmoid (cDPO), robust or simpo, "
                         f"not {dpo.loss}")
    if dpo.precompute_ref and dpo.loss in REFERENCE_FREE:
        raise InputError(f"dpo.precompute_ref has no effect with dpo.loss={dpo.loss}, which uses no "
                         "reference model; leave it unset")
    if dpo.simpo_gamma != KEYS["dpo.simpo_gamma"].default and dpo.loss != "simpo":
        raise InputError(f"dpo.simpo_gamma={dpo.simpo_gamma} has no effect with dpo.loss={dpo.loss}: only "
                         "dpo.loss=simpo reads it; remove it or set dpo.loss=simpo")


def load_pairs(ctx: RunContext, key: str, add_eos: bool = True,
               margin: bool = False) -> tuple[list[dict[str, Any]] | None, dict[str, Any]]:
    """Pairs of the file under config ``key`` (``None`` if unset) and what building them dropped.

    Skipped and truncated pairs are logged; a file with no usable pair is an error.
    """
    records = ctx.records(key)
    if records is None:
        return None, {}
    max_length, source = ctx.cfg.train.max_length, ctx.source(key)
    pairs, stats = build_pairs(records, ctx.tokenizer, max_length, add_eos=add_eos, margin=margin)
    skipped = sum(stats.dropped.values())
    if skipped:
        ctx.log.say(f"{source}: skipped {skipped} of {len(records)} pairs ({', '.join(stats.dropped)})")
    if stats.truncated:
        ctx.log.say(f"{source}: cut {stats.truncated} pairs' completions to train.max_length={max_length}")
    if not pairs:
        raise InputError(f"{source}: no usable preference pairs"
                         f"{' (every pair had ' + IDENTICAL + ')' if stats.dropped else ''}")
    return pairs, stats.as_dict()


@torch.no_grad()
def precompute_reference(pairs: list[dict[str, Any]], reference: Reference, pad_id: int, batch_size: int,
                         device: torch.device) -> None:
    """Store each pair's reference log-probs (``ref_chosen``, ``ref_rejected``) in the pair."""
    with reference.model(device) as ref:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate_pairs(chunk, pad_id).items()}
            chosen, rejected = completion_logps(ref, batch).chunk(2)  # (B,), (B,)
            for pair, c, r in zip(chunk, chosen.tolist(), rejected.tolist(), strict=True):
                pair["ref_chosen"], pair["ref_rejected"] = c, r


def reference_loss(reference: Reference, loss_type: str, beta: float, smoothing: float) -> LossFn:
    """The loss of the DPO family that compares the policy with the reference."""

    def loss(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        pairs = batch["num_loss_tokens"]
        # The reference runs first: its forward's temporaries (a block's activations, a head chunk's
        # logits) then come and go before the policy's saved activations exist, instead of on top of
        # them at the step's peak. Same values either way (no dropout, no state).
        if "ref_chosen" in batch:
            ref_chosen, ref_rejected = batch["ref_chosen"], batch["ref_rejected"]
        else:
            with reference.model(batch["input_ids"].device) as ref:
                ref_chosen, ref_rejected = completion_logps(ref, batch).chunk(2)
        chosen, rejected = completion_logps(model, batch).chunk(2)  # (B,), (B,) one forward for both
        lengths = batch["completion_lengths"]
        mean, metrics = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, loss_type, smoothing,
                                 chosen_lengths=lengths[:pairs], rejected_lengths=lengths[pairs:])
        return mean * pairs, metrics  # the loop divides by the window's pair count

    return loss


def reference_free_loss(loss_type: str, beta: float, gamma: float, smoothing: float) -> LossFn:
    """ORPO or SimPO: one policy forward per step, on per-token average completion log-probs."""

    def loss(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        pairs = batch["num_loss_tokens"]
        summed = completion_logps(model, batch)  # (2B,)
        lengths = batch["completion_lengths"].clamp(min=1).to(summed.dtype)  # (2B,)
        chosen, rejected = (summed / lengths).chunk(2)  # (B,), (B,)
        if loss_type == "orpo":
            # The SFT term: mean NLL over the chosen completions' tokens (as train.loss_on=response).
            nll = -summed[:pairs].sum() / lengths[:pairs].sum()
            mean, metrics = orpo_loss(chosen, rejected, nll, beta)
        else:
            mean, metrics = simpo_loss(chosen, rejected, beta, gamma, smoothing)
        return mean * pairs, metrics

    return loss


def build_task(ctx: RunContext) -> Task:
    """DPO task: pairs in, summed DPO loss over the batch's pairs out."""
    cfg, tok = ctx.cfg, ctx.tokenizer
    check_config(cfg.dpo)
    train_pairs, stats = load_pairs(ctx, "data.train")
    eval_pairs, _ = load_pairs(ctx, "data.eval")
    model = ctx.load_causal_lm()
    disable_dropout(model)
    prepared = ctx.apply_method(model)
    policy, pad_id = prepared.model, tok.pad_token_id
    precompute = cfg.dpo.precompute_ref
    beta, loss_type, smoothing = cfg.dpo.beta, cfg.dpo.loss, cfg.dpo.label_smoothing
    if loss_type in REFERENCE_FREE:
        loss = reference_free_loss(loss_type, beta, cfg.dpo.simpo_gamma, smoothing)
    else:
        reference = Reference(policy, ctx.method.adapter, keep_copy=not precompute)
        if precompute:
            device = pick_device()
            policy.to(device)
            for pairs in (train_pairs, eval_pairs or []):
                precompute_reference(pairs, reference, pad_id, cfg.train.batch_size, device)
            ctx.log.say(f"precomputed reference log-probs for {len(train_pairs) + len(eval_pairs or [])} pairs")
        loss = reference_loss(reference, loss_type, beta, smoothing)
    # Held-out implicit-reward accuracy (chosen reward above the rejected one; ties do not count)
    # and margin: the loss's own batch metrics, averaged over the eval pairs in the eval_loss pass.
    eval_metrics = {"rewards/accuracies": "eval_reward_accuracy", "rewards/margins": "eval_reward_margin"}

    return Task(model=policy, batches=ctx.batches(train_pairs, lambda ps: collate_pairs(ps, pad_id)),
                eval_examples=eval_pairs, loss=loss, save=prepared.save,
                eval_metrics=eval_metrics if eval_pairs else {},
                summary={"data": stats, "dpo": {"beta": beta, "loss": loss_type, "precompute_ref": precompute,
                                                 "reference_model": loss_type not in REFERENCE_FREE},
                         **prepared.summary})
