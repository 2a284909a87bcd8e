"""The one training loop: pre-training, fine-tuning, LoRA, SFT, DPO, reward modelling, PPO.

``train(task, settings, output_dir)`` reads top to bottom: batch -> loss -> backward ->
(accumulate) -> clip -> step -> log / eval / save. What differs between methods and objectives
lives in the ``Task`` (which parameters train, where batches come from, what the loss is, what
gets saved); ``settings`` is the run's ``train`` section.
"""

from __future__ import annotations

import datetime
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch

from lmtune import checkpoint as ckpt
from lmtune import distributed, fsdp
from lmtune.config import TrainConfig
from lmtune.engine import Engine, autocast, to_device
from lmtune.errors import Interrupted
from lmtune.evaluation_loop import eval_and_keep_best, measure_task
from lmtune.models.loading import param_counts
from lmtune.objectives.task import Task, TrainingError
from lmtune.progress import Clock, TrainState, throughput_line
from lmtune.resume import load_trainable, save_loop_checkpoint, start_or_resume
from lmtune.runlog import RunLog, peak_rss_mb


def make_optimizer(model: torch.nn.Module, settings: TrainConfig,
                   params: list[torch.nn.Parameter] | None = None) -> torch.optim.AdamW:
    """AdamW over trainable parameters (``params``: FSDP2's shards); matrices decay, biases and norms do not."""
    params = [p for p in model.parameters() if p.requires_grad] if params is None else params
    if not params:
        raise TrainingError("nothing to train: every parameter is frozen (check method and freeze.layers)")
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": settings.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps)


def lr_at(step: int, settings: TrainConfig, total: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then the schedule."""
    peak, warm = settings.lr, settings.warmup_steps
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    if settings.schedule == "linear":
        return peak * (1.0 - progress)
    if settings.schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak


def input_tokens(batch: dict[str, Any]) -> int:
    """Non-padding tokens the trained model reads in ``batch`` (prompts included, loss or not).

    A collate that knows better says so in ``num_input_tokens`` (packed rows carry no attention
    mask; KTO also reads mismatched rows); otherwise the attention mask's ones are counted.
    """
    if "num_input_tokens" in batch:
        return int(batch["num_input_tokens"])
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


class _StopSignal:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the end of the step and stops."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(task: Task, settings: TrainConfig, output_dir: Path, device: torch.device | None = None,
          log: RunLog | None = None) -> dict[str, Any]:
    """Train ``task`` under the ``train`` config section; write metrics, checkpoints, results, summary.json.

    Returns:
        The summary dict (also written to ``output_dir/summary.json``).

    Raises:
        TrainingError: non-finite loss (the step is named; the last good checkpoint stays)
            or nothing trainable.
        Interrupted: SIGINT/SIGTERM arrived; a checkpoint of the finished step was saved.
    """
    ddp = distributed.from_env(settings.distributed)
    together = False  # whether every rank is leaving at this point (then they wait for each other first)
    try:
        summary = _train(task, settings, output_dir, ddp, ddp.device if ddp else (device or torch.device("cpu")), log)
        together = True
        return summary
    except Interrupted:
        together = True  # the stop flag is summed over ranks: all of them stop after the same step
        raise
    finally:
        distributed.shutdown(ddp, wait=together)


def _train(task: Task, settings: TrainConfig, output_dir: Path, ddp: distributed.Dist | None, device: torch.device,
           log: RunLog | None) -> dict[str, Any]:
    main = ddp is None or ddp.main  # only rank 0 logs and writes files
    log = log or RunLog(output_dir)
    if not main:
        log = RunLog(output_dir, quiet=True, tensorboard=False, active=False)
    if ddp is None and settings.distributed.strategy == "fsdp":
        log.say("train.distributed.strategy=fsdp applies under torchrun; this run is one process")
    source = getattr(task.batches, "inner", task.batches)  # Replay wraps the example batches
    if hasattr(source, "examples"):
        distributed.check_data_size(len(source.examples), ddp, "data.train")
    model = task.model = task.model.to(device).train()
    steps = settings.steps or task.batches.total_steps(settings, ddp.world if ddp else 1)
    engine = Engine(model, task.loss, task.regularizers, ddp, settings.distributed.bucket_mb, settings.precision)
    if engine.sharded:
        log.say(f"FSDP2: sharded {len(fsdp.transformer_blocks(model))} transformer blocks and the rest of the model "
                f"over {ddp.world} ranks")
    optimizer = make_optimizer(model, settings, engine.trainable())
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the caller's RNG stays
        # Each rank its own dropout/sampling stream (rank 0: the one-process stream); data order is seeded apart.
        torch.manual_seed(distributed.rank_seed(settings.seed, ddp))
        state, best = start_or_resume(task, settings, optimizer, output_dir, log, device, ddp, engine)
        if settings.compile:
            # The loss calls the body (base_model) and the head apart: compile the body, where the time goes.
            getattr(model, "base_model", model).compile()
        clock = Clock(state)
        last_eval = None  # the record of an eval on the current weights, if the last step made one
        with _StopSignal() as stop, log.progress(steps, state.step) as bar:
            while state.step < steps:
                clock.start()
                record = _optimizer_step(task, settings, optimizer, state, steps, device, ddp, output_dir, engine)
                clock.stop(state)
                stop_early = False
                if _due(state.step, settings.eval_every, steps):
                    stop_early, best = eval_and_keep_best(task, settings, device, state, record, best,
                                                         output_dir if main else None, engine)
                last_eval = record if "eval_loss" in record else None
                state.elapsed_s = record["elapsed_s"] = clock.elapsed()  # saved with the checkpoint below
                record["time"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
                if state.step % settings.log_every == 0 or state.step in (1, steps) or "eval_loss" in record:
                    log.step(record, steps)
                bar.update(1)
                stopping = stop.received is not None
                if ddp:  # a signal reaches ranks at different steps: all stop at the first step any saw it
                    stopping = ddp.sum(stopping)[0] > 0
                    stop.received = stop.received or (signal.SIGTERM if stopping else None)
                if (settings.save_every and state.step % settings.save_every == 0) or stopping:
                    save_loop_checkpoint(task, settings, optimizer, state, output_dir, ddp, engine)
                if stopping:
                    log.say(f"received signal {stop.received}: checkpoint saved at step {state.step}; "
                            "continue with train.resume=true")
                    raise Interrupted(stop.received)
                if stop_early:
                    state.stopped_early_at = state.step
                    log.say(f"early stopping at step {state.step}: eval loss has not improved for "
                            f"{settings.patience} evaluations")
                    break
        return _finish(task, settings, device, state, best, clock, output_dir, log, main, ddp, engine, last_eval)


def _optimizer_step(task: Task, settings: TrainConfig, optimizer: torch.optim.Optimizer, state: TrainState,
                    steps: int, device: torch.device, ddp: distributed.Dist | None,
                    output_dir: Path, engine: Engine) -> dict[str, Any]:
    """One optimizer step over ``grad_accum`` micro-batches; returns the step's metrics record."""
    step = state.step
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, settings, steps)
    micro = [task.batches.next(step, ddp) for _ in range(settings.grad_accum)]
    loss, tokens, inputs, metrics = accumulate_gradients(task, micro, settings.precision, device, step, ddp, engine)
    params = engine.trainable()
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        good = ckpt.latest_good(output_dir / "checkpoints")
        raise TrainingError(
            f"the loss became {loss} at step {step + 1}; training stopped before that step changed any weight. "
            f"{'The last good checkpoint is ' + str(good) if good else 'No checkpoint was saved'}. "
            "Try a lower train.lr, train.precision=fp32, or train.clip_grad_norm=1.0.")
    if settings.clip_grad_norm:
        norm = torch.nn.utils.clip_grad_norm_(params, settings.clip_grad_norm)
        metrics["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: DTensor
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state.step, state.tokens, state.last_loss = step + 1, state.tokens + tokens, loss
    state.input_tokens += inputs
    return {"step": state.step, "loss": loss, "lr": optimizer.param_groups[0]["lr"], "tokens": state.tokens,
            "input_tokens": state.input_tokens, **metrics}


def accumulate_gradients(task: Task, micro: list[dict[str, Any] | None], precision: str, device: torch.device,
                         step: int = 0, ddp: distributed.Dist | None = None,
                         engine: Engine | None = None) -> tuple[float, int, int, dict[str, float]]:
    """Backward over one accumulation window; gradients equal those of one big batch.

    Each micro-batch's summed loss is divided by the loss units of the *whole* window (over all
    ranks), so the accumulated gradient is the gradient of the window's mean loss however it is
    split. A ``filler`` micro-batch (this rank's empty share of a short last batch) runs with
    weight 0 so the rank still joins the gradient reduction. Metrics are means weighted by loss
    units, over every rank's real micro-batches.

    Returns:
        ``(mean loss, tokens trained, input tokens read, metrics)`` of the window: tokens trained
        carry loss; input tokens are every non-padding token of the real micro-batches.
    """
    engine = engine or Engine(task.model, task.loss, task.regularizers, None, 0.0, precision)
    real = [b for b in micro if b is not None and not b.get("filler")]
    units = sum(b["num_loss_tokens"] for b in real)
    tokens = sum(b.get("num_tokens", b["num_loss_tokens"]) for b in real)
    inputs = sum(input_tokens(b) for b in real)
    if ddp:  # every rank divides by the global count
        units, tokens, inputs = (int(v) for v in ddp.sum(units, tokens, inputs))
    if units == 0:
        raise TrainingError(f"step {step + 1}: the batch has no tokens that carry loss (every label is "
                            "masked); check train.loss_on, train.max_length and the data's responses")
    runs = [b for b in micro if b is not None]
    loss_total, parts, reg_loss = 0.0, [], None
    for i, batch in enumerate(runs):
        last, filler = i == len(runs) - 1, bool(batch.get("filler"))
        batch = to_device(batch, device)
        with engine.sync(last):  # DDP/FSDP2 reduce gradients in the window's last backward only
            with autocast(precision, device):
                loss_sum, reg, m = engine(batch, last)
            total = loss_sum * (0.0 if filler else 1.0 / units)
            if reg is not None:
                # Every rank adds the penalty's gradient and the reduction sums them: each adds 1/world.
                total = total + reg / (ddp.world if ddp else 1)
                reg_loss = float(reg.detach())
            if ddp:  # DDP reduces gradients inside backward: a dead peer surfaces here
                ddp.guard("reducing gradients in backward", total.backward)
            else:
                total.backward()
        if filler:
            continue
        loss_total += float(loss_sum.detach())
        parts.append((m, batch["num_loss_tokens"]))  # metrics are weighted by loss units
    if ddp:
        every = ddp.gather((loss_total, parts))
        loss_total, parts = sum(e[0] for e in every), [p for e in every for p in e[1]]
    metrics = distributed.reduce_metrics(parts)
    if reg_loss is not None:
        metrics["reg_loss"] = reg_loss
    return loss_total / units, tokens, inputs, metrics


def _due(step: int, every: int, total: int) -> bool:
    return (every > 0 and step % every == 0) or step == total


def _finish(task: Task, settings: TrainConfig, device: torch.device, state: TrainState,
            best: dict[str, torch.Tensor] | None, clock: Clock, output_dir: Path, log: RunLog, main: bool,
            ddp: distributed.Dist | None, engine: Engine | None = None,
            last_eval: dict[str, Any] | None = None) -> dict[str, Any]:
    """Restore the best weights (early stopping), save the result, write summary.json.

    ``last_eval``: the final step's eval record; unless best weights replace the last ones, its
    eval metrics are the "after" values (no second pass over the held-out examples).
    """
    if engine is not None:
        engine.gather_full()
    model = task.model
    eval_loss = state.eval_loss
    if best is not None:
        load_trainable(model, best, output_dir / "best.safetensors")
        eval_loss = state.best_eval  # the loss of the weights that are saved, not of the last eval
        log.say(f"restored the best weights (eval loss {state.best_eval:.4f})")
    if main:
        task.save(output_dir)
    total, trainable = param_counts(model)
    per_second, inputs_per_second = clock.rates(state)
    summary = {
        "total_params": total, "trainable_params": trainable, "trainable_ratio": trainable / max(total, 1),
        "steps": state.step, "tokens_trained": state.tokens, "final_loss": state.last_loss, "eval_loss": eval_loss,
        "stopped_early_at": state.stopped_early_at,
        "tokens_per_second": per_second, "input_tokens_processed": state.input_tokens,
        "input_tokens_per_second": inputs_per_second, "peak_rss_mb": peak_rss_mb(),
        "wall_seconds": time.perf_counter() - clock.begun, "elapsed_s": clock.elapsed(), **task.summary,
        "first_step_seconds": clock.first_step,
    }
    for name, after in measure_task(task, settings, device, engine, last_eval if best is None else None).items():
        summary[f"{name}_before"] = state.before[name]
        summary[f"{name}_after"] = after
        summary[f"{name}_change"] = after - state.before[name]
    log.say(throughput_line(summary))
    log.finish(summary)
    if main:
        (output_dir / "best.safetensors").unlink(missing_ok=True)
    if ddp:
        ddp.barrier()  # no rank leaves while rank 0 is still writing the result
    return summary

