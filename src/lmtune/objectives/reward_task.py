"""Objective ``reward``: train a scalar reward model on preference pairs (Bradley–Terry).

The model is the base LM's body with a fresh one-output head (``*ForSequenceClassification``),
fully or partially fine-tuned; the saved folder loads with
``transformers.AutoModelForSequenceClassification`` and serves as ``ppo.reward_model``. With LoRA
(or QLoRA) the body gets the adapter and the head trains in full, as for classification: the
adapter folder carries it as PEFT's ``modules_to_save`` with ``task_type`` ``SEQ_CLS``, so
``PeftModel.from_pretrained(AutoModelForSequenceClassification...(base), folder)`` loads it, and
so does ``ppo.reward_model``.
Held-out pairs (``data.eval``) give ``eval_loss`` and ``pairwise_accuracy`` before/after.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmtune.data.preference import collate_pairs
from lmtune.methods.adapter_files import save_heads_in_adapter
from lmtune.objectives.dpo_task import load_pairs
from lmtune.objectives.reference import disable_dropout
from lmtune.objectives.reward import bradley_terry_loss, new_reward_model, reward_scores
from lmtune.objectives.task import RunContext, Task


def build_task(ctx: RunContext) -> Task:
    """Reward-model task: one forward over chosen+rejected, Bradley–Terry loss per pair."""
    cfg, tok = ctx.cfg, ctx.tokenizer
    margin, center = cfg.reward.margin, cfg.reward.center_coef
    # No EOS: the score is read at the last real token, where transformers reads it too.
    train_pairs, stats = load_pairs(ctx, "data.train", add_eos=False, margin=margin)
    eval_pairs, _ = load_pairs(ctx, "data.eval", add_eos=False, margin=margin)
    with torch.random.fork_rng(devices=[]):  # the new score head follows train.seed, not what ran before
        torch.manual_seed(cfg.train.seed)  # (every rank of a torchrun job, and one process, start equal)
        model = new_reward_model(ctx.model_folder, tok.pad_token_id, cfg.trust_remote_code)
    disable_dropout(model)
    prepared = ctx.apply_method(model)
    save = prepared.save
    if ctx.method.adapter:  # the fresh head trains in full; the adapter folder carries it (modules_to_save)
        model.score.requires_grad_(True)

        def save(out: Path) -> None:
            prepared.save(out)
            save_heads_in_adapter(Path(out), {"score": model.score})
    pad_id = tok.pad_token_id

    def loss(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected = reward_scores(model, batch).chunk(2)  # (B,), (B,) one forward for both
        mean, metrics = bradley_terry_loss(chosen, rejected, batch.get("margin"), center)
        return mean * batch["num_loss_tokens"], metrics  # the loop divides by the window's pair count

    # Held-out pairwise accuracy (chosen scored above rejected): the loss's own batch accuracy,
    # averaged over the eval pairs in the eval_loss pass (sharded under torchrun, FSDP2 included).
    eval_metrics = {"accuracy": "pairwise_accuracy"} if eval_pairs else {}
    return Task(model=prepared.model, batches=ctx.batches(train_pairs, lambda ps: collate_pairs(ps, pad_id)),
                eval_examples=eval_pairs, loss=loss, save=save, eval_metrics=eval_metrics,
                summary={"data": stats, "reward": {"margin": margin, "center_coef": center}, **prepared.summary})
