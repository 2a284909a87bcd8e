"""Evaluation inside the loop: the held-out loss (sharded over ranks), the evaluators, early stopping's best weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmtune import checkpoint as ckpt
from lmtune import distributed
from lmtune.config import TrainConfig
from lmtune.engine import Engine, autocast, to_device
from lmtune.models.loading import trainable_state
from lmtune.objectives.task import Task
from lmtune.progress import TrainState


def measure(evaluators: dict[str, Any], model: torch.nn.Module) -> dict[str, float]:
    """Every evaluator's metrics: one that returns a number is named by its key, a dict by its own keys."""
    out: dict[str, float] = {}
    for name, fn in evaluators.items():
        value = fn(model)
        out.update(value if isinstance(value, dict) else {name: value})
    return out


@torch.no_grad()
def held_out(task: Task, settings: TrainConfig, device: torch.device, engine: Engine | None = None) -> dict[str, float]:
    """One pass over the task's eval examples: ``eval_loss`` and the task's ``eval_metrics``.

    ``eval_loss`` is the mean loss per loss unit (token-weighted for LM objectives); each eval
    metric is the loss's own batch mean weighted by the batch's loss units (a DPO batch's reward
    accuracy by its pairs), i.e. the mean over every held-out unit.

    Under torchrun each eval batch of ``batch_size × world`` examples is split across the ranks
    (through ``engine``, so FSDP2 gathers weights) and the sums are reduced: no example is
    evaluated twice. A rank with no share of a batch runs a zero-weight stand-in, so every rank
    makes the same forward calls.
    """
    ddp = engine.dist if engine is not None else None
    was_training = task.model.training
    task.model.eval()
    world = ddp.world if ddp else 1
    total, units, bs, examples = 0.0, 0.0, settings.batch_size * world, task.eval_examples
    named = list(task.eval_metrics.items())  # (the loss's metric, its name in the record)
    sums = [0.0] * len(named)
    with autocast(settings.precision, device):
        for start in range(0, len(examples), bs):
            mine = distributed.shard(examples[start:start + bs], ddp)
            batch = to_device(task.batches.collate(mine or examples[start:start + 1]), device)
            if engine:
                loss_sum, _, metrics = engine(batch, False)
            else:
                loss_sum, metrics = task.loss(task.model, batch)
            if mine:
                n = float(batch["num_loss_tokens"])
                total += float(loss_sum)
                units += n
                sums = [acc + float(metrics[key]) * n for acc, (key, _) in zip(sums, named)]
    if ddp:
        total, units, *sums = ddp.sum(total, units, *sums)
    task.model.train(was_training)
    out = {"eval_loss": total / max(units, 1)}
    out.update({name: acc / max(units, 1) for acc, (_, name) in zip(sums, named)})
    return out


def evaluate_loss(task: Task, settings: TrainConfig, device: torch.device, engine: Engine | None = None) -> float:
    """Mean loss per loss unit over the task's eval examples (:func:`held_out`'s ``eval_loss``)."""
    return held_out(task, settings, device, engine)["eval_loss"]


def measure_task(task: Task, settings: TrainConfig, device: torch.device, engine: Engine | None = None,
                 measured: dict[str, Any] | None = None) -> dict[str, float]:
    """What summary.json compares before and after training: the evaluators and the eval metrics.

    ``measured``: the record of an eval made on these very weights (the last step's); its eval
    metrics are taken as they are instead of a second pass over the held-out examples.
    """
    out = measure(task.evaluators, task.model)
    if task.eval_metrics and task.eval_examples:
        names = list(task.eval_metrics.values())
        if measured is not None and all(name in measured for name in names):
            out.update({name: measured[name] for name in names})
        else:
            out.update({k: v for k, v in held_out(task, settings, device, engine).items() if k != "eval_loss"})
    return out


def eval_and_keep_best(task: Task, settings: TrainConfig, device: torch.device, state: TrainState,
                       record: dict[str, Any], best: dict[str, torch.Tensor] | None, output_dir: Path | None,
                       engine: Engine | None = None) -> tuple[bool, dict[str, torch.Tensor] | None]:
    """Eval loss and evaluators into ``record``; keep the best weights for early stopping.

    Returns:
        (stop now, the best weights so far).
    """
    record.update(measure(task.evaluators, task.model))
    if not task.eval_examples:
        return False, best
    results = held_out(task, settings, device, engine)  # eval_loss and the eval metrics, one pass
    record.update(results)
    state.eval_loss = results["eval_loss"]
    if settings.patience <= 0:
        return False, best
    if state.best_eval is None or state.eval_loss < state.best_eval:
        state.best_eval, state.bad_evals = state.eval_loss, 0
        best = {k: v.detach().cpu().clone() for k, v in trainable_state(task.model).items()}
        if output_dir is not None:  # kept on disk too, so a resumed run can still restore them
            ckpt.save_tensors_atomic(output_dir / "best.safetensors", best)
        return False, best
    state.bad_evals += 1
    return state.bad_evals >= settings.patience, best
