"""Where the loop starts (fresh, or from the newest good checkpoint) and the checkpoints it writes.

A checkpoint holds the trainable weights, the optimizer, the ``TrainState``, the RNG streams and
the batch source's position; under torchrun, every rank's batch source and RNG stream, and under
FSDP2 the weights and moments gathered to full size, so it is the one a single process writes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from lmtune import checkpoint as ckpt
from lmtune import distributed, fsdp
from lmtune.config import TrainConfig
from lmtune.engine import Engine
from lmtune.evaluation_loop import measure_task
from lmtune.models.loading import trainable_state
from lmtune.objectives.task import Task, TrainingError
from lmtune.progress import TrainState
from lmtune.runlog import RunLog


def start_or_resume(task: Task, settings: TrainConfig, optimizer: torch.optim.Optimizer, output_dir: Path,
                    log: RunLog, device: torch.device, ddp: distributed.Dist | None = None,
                    engine: Engine | None = None) -> tuple[TrainState, dict[str, torch.Tensor] | None]:
    """A fresh state, or the newest good checkpoint's when resuming; evaluators measured before training."""
    ckpt_root = output_dir / "checkpoints"
    state, best = TrainState(), None
    found = ckpt.latest_good(ckpt_root, warn=log.say) if settings.resume else None
    if found is None:
        log.truncate_after(0)  # starting at step 0: drop records an earlier killed or failed attempt left
        if settings.resume:
            log.say(f"no usable checkpoint in {ckpt_root}; starting from step 0")
    else:
        weights, optim_state, meta = ckpt.load_checkpoint(found)
        ckpt.check_fits(found, trainable_state(task.model), weights, optimizer, optim_state)
        if engine is not None and engine.sharded:  # full-size tensors in the file, a shard of each on this rank
            fsdp.load_trainable(task.model, weights)
            fsdp.load_optimizer(optimizer, optim_state)
        else:
            load_trainable(task.model, weights, found)
            optimizer.load_state_dict(optim_state)
        state = TrainState(**meta["loop"]["state"])
        ckpt.set_rng_state(meta["rng_tensors"], meta["rng"])
        tensors, batches = _own_batch_state(meta["task_tensors"], meta["loop"]["batches"], ddp, found)
        task.batches.load_state_dict(tensors, batches)
        if state.best_eval is not None and (output_dir / "best.safetensors").exists():
            best = load_file(output_dir / "best.safetensors")
        log.truncate_after(state.step)
        log.say(f"resumed from {found} at step {state.step}")
    if (task.evaluators or task.eval_metrics) and not state.before:  # a resume keeps the first process's "before"
        state.before = measure_task(task, settings, device, engine)
    return state, best


def save_loop_checkpoint(task: Task, settings: TrainConfig, optimizer: torch.optim.Optimizer, state: TrainState,
                         output_dir: Path, ddp: distributed.Dist | None = None, engine: Engine | None = None) -> None:
    """Rank 0 writes the checkpoint; under torchrun it holds every rank's batch source and RNG state.

    Under FSDP2 the weights and optimizer moments are gathered to full size first (every rank
    joins), so the checkpoint is the one a single process would write.
    """
    weights, optim = trainable_state(task.model), optimizer
    if engine is not None and engine.sharded:
        weights = fsdp.gather_trainable(task.model, ddp.main)
        optim = fsdp.gather_optimizer(optimizer, ddp.main)
    tensors, meta = task.batches.state_dict()
    if ddp:  # PPO rollouts and dropout streams differ per rank: keep each rank's
        own = {**{k: v.cpu() for k, v in tensors.items()}, "_rng_torch": torch.get_rng_state()}
        every = ddp.gather((own, meta))
        tensors = {f"rank{r}.{k}": v for r, (t, _) in enumerate(every) for k, v in t.items()}
        meta = {"per_rank": [m for _, m in every]}
        if not ddp.main:
            return
    ckpt.save_checkpoint(output_dir / "checkpoints", state.step, weights, optim,
                         {"state": dataclasses.asdict(state), "batches": meta}, settings.keep_checkpoints, tensors)


def _own_batch_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any], ddp: distributed.Dist | None,
                     found: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This rank's batch-source state in a checkpoint (and its RNG stream, restored here)."""
    world = ddp.world if ddp else 1
    written = len(meta["per_rank"]) if "per_rank" in meta else 1
    if written != world:
        raise TrainingError(f"{found} was written by a run of {written} process(es) and this run has {world}; "
                            f"resume with the same number of processes (torchrun --nproc_per_node {written})")
    if ddp is None:
        return tensors, meta
    prefix = f"rank{ddp.rank}."
    own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    torch.set_rng_state(own.pop("_rng_torch"))
    return own, meta["per_rank"][ddp.rank]


def load_trainable(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Copy saved trainable tensors into ``model``, refusing any that names no parameter or has another shape."""
    params = dict(model.named_parameters())
    for name, value in weights.items():
        if name not in params or params[name].shape != value.shape:
            raise TrainingError(f"{source}: tensor '{name}' {tuple(value.shape)} does not fit this model "
                                f"({tuple(params[name].shape) if name in params else 'no such parameter'}); "
                                "the checkpoint belongs to another model or method")
        with torch.no_grad():
            params[name].copy_(value)
