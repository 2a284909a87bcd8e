"""The one training loop: pre-training, fine-tuning, LoRA, SFT, DPO, reward modelling, PPO.

``train(task, settings, output_dir)`` reads top to bottom: batch -> loss -> backward ->
(accumulate) -> clip -> step -> log / eval / save. What differs between methods and objectives
lives in the ``Task`` (which parameters train, where batches come from, what the loss is, what
gets saved); ``settings`` is the run's ``train`` section.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmtune import checkpoint as ckpt
from lmtune import distributed, fsdp
from lmtune.config import TrainConfig
from lmtune.engine import Engine
from lmtune.errors import Interrupted
from lmtune.models.loading import param_counts
from lmtune.objectives.task import Task, TrainingError
from lmtune.runlog import RunLog, clock_time, peak_rss_mb


@dataclass
class TrainState:
    """Everything about the loop's progress that a checkpoint saves and a resume restores."""

    step: int = 0
    tokens: int = 0  # loss-carrying tokens (the objective's ``num_tokens``)
    input_tokens: int = 0  # every non-padding token the trained model read
    elapsed_s: float = 0.0  # wall time of the loop, summed over the run's processes (a resume continues it)
    last_loss: float | None = None
    eval_loss: float | None = None
    best_eval: float | None = None  # early stopping: the best eval loss so far, and how many since
    bad_evals: int = 0
    stopped_early_at: int | None = None  # a resume of a run early stopping ended is refused (lmtune.runrecord)
    before: dict[str, float] = dataclasses.field(default_factory=dict)  # evaluators' metrics before training


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name (what checkpoints and early stopping keep)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


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


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast (fast on avx512_bf16 CPUs and GPUs) or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def input_tokens(batch: dict[str, Any]) -> int:
    """Non-padding tokens the trained model reads in ``batch`` (prompts included, loss or not).

    A collate that knows better says so in ``num_input_tokens`` (packed rows carry no attention
    mask; KTO also reads mismatched rows); otherwise the attention mask's ones are counted.
    """
    if "num_input_tokens" in batch:
        return int(batch["num_input_tokens"])
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def measure(evaluators: dict[str, Any], model: torch.nn.Module) -> dict[str, float]:
    """Every evaluator's metrics: one that returns a number is named by its key, a dict by its own keys."""
    out: dict[str, float] = {}
    for name, fn in evaluators.items():
        value = fn(model)
        out.update(value if isinstance(value, dict) else {name: value})
    return out


@torch.no_grad()
def evaluate_loss(task: Task, settings: TrainConfig, device: torch.device, engine: Engine | None = None) -> float:
    """Mean loss per loss unit over the task's eval examples (token-weighted for LM objectives).

    Under torchrun each eval batch of ``batch_size × world`` examples is split across the ranks
    (through ``engine``, so FSDP2 gathers weights) and the sums are reduced: no example is
    evaluated twice. A rank with no share of a batch runs a zero-weight stand-in, so every rank
    makes the same forward calls.
    """
    ddp = engine.dist if engine is not None else None
    was_training = task.model.training
    task.model.eval()
    world = ddp.world if ddp else 1
    total, units, bs, examples = 0.0, 0, settings.batch_size * world, task.eval_examples
    with autocast(settings.precision, device):
        for start in range(0, len(examples), bs):
            mine = distributed.shard(examples[start:start + bs], ddp)
            batch = to_device(task.batches.collate(mine or examples[start:start + 1]), device)
            loss_sum = engine(batch, False)[0] if engine else task.loss(task.model, batch)[0]
            if mine:
                total += float(loss_sum)
                units += batch["num_loss_tokens"]
    if ddp:
        total, units = ddp.sum(total, units)
    task.model.train(was_training)
    return total / max(units, 1)


def throughput_line(summary: dict[str, Any]) -> str:
    """The end-of-run line: steps, elapsed time, input tokens per second next to loss-carrying ones."""
    line = f"trained {summary['steps']} steps in {clock_time(summary['elapsed_s'])}"
    if summary["input_tokens_per_second"] is not None:
        line += (f" | {summary['input_tokens_per_second']:,.0f} input tok/s "
                 f"({summary['tokens_per_second']:,.0f} loss-carrying tok/s)")
    return line


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
        state, best = _start(task, settings, optimizer, output_dir, log, ddp, engine)
        if settings.compile:
            # The loss calls the body (base_model) and the head apart: compile the body, where the time goes.
            getattr(model, "base_model", model).compile()
        clock = _Clock(state)
        with _StopSignal() as stop, log.progress(steps, state.step) as bar:
            while state.step < steps:
                clock.start()
                record = _optimizer_step(task, settings, optimizer, state, steps, device, ddp, output_dir, engine)
                clock.stop(state)
                stop_early = False
                if _due(state.step, settings.eval_every, steps):
                    stop_early, best = _evaluate(task, settings, device, state, record, best,
                                                 output_dir if main else None, engine)
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
                    _save_checkpoint(task, settings, optimizer, state, output_dir, ddp, engine)
                if stopping:
                    log.say(f"received signal {stop.received}: checkpoint saved at step {state.step}; "
                            "continue with train.resume=true")
                    raise Interrupted(stop.received)
                if stop_early:
                    state.stopped_early_at = state.step
                    log.say(f"early stopping at step {state.step}: eval loss has not improved for "
                            f"{settings.patience} evaluations")
                    break
        return _finish(task, state, best, clock, output_dir, log, main, ddp, engine)


def _start(task: Task, settings: TrainConfig, optimizer: torch.optim.Optimizer, output_dir: Path,
           log: RunLog, ddp: distributed.Dist | None = None,
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
            _load_trainable(task.model, weights, found)
            optimizer.load_state_dict(optim_state)
        state = TrainState(**meta["loop"]["state"])
        ckpt.set_rng_state(meta["rng_tensors"], meta["rng"])
        tensors, batches = _own_batch_state(meta["task_tensors"], meta["loop"]["batches"], ddp, found)
        task.batches.load_state_dict(tensors, batches)
        if state.best_eval is not None and (output_dir / "best.safetensors").exists():
            from safetensors.torch import load_file

            best = load_file(output_dir / "best.safetensors")
        log.truncate_after(state.step)
        log.say(f"resumed from {found} at step {state.step}")
    if task.evaluators and not state.before:  # a resume keeps the first process's "before"
        state.before = measure(task.evaluators, task.model)
    return state, best


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
        w = batch["num_loss_tokens"]
        parts.append(({k: v if k.startswith(("min_", "max_")) else v * w for k, v in m.items()}, w))
    if ddp:
        every = ddp.gather((loss_total, parts))
        loss_total, parts = sum(e[0] for e in every), [p for e in every for p in e[1]]
    metrics = distributed.reduce_metrics(parts)
    if reg_loss is not None:
        metrics["reg_loss"] = reg_loss
    return loss_total / units, tokens, inputs, metrics


def _due(step: int, every: int, total: int) -> bool:
    return (every > 0 and step % every == 0) or step == total


def _evaluate(task: Task, settings: TrainConfig, device: torch.device, state: TrainState, record: dict[str, Any],
              best: dict[str, torch.Tensor] | None, output_dir: Path | None,
              engine: Engine | None = None) -> tuple[bool, dict[str, torch.Tensor] | None]:
    """Eval loss and evaluators into ``record``; keep the best weights for early stopping.

    Returns:
        (stop now, the best weights so far).
    """
    record.update(measure(task.evaluators, task.model))
    if not task.eval_examples:
        return False, best
    record["eval_loss"] = state.eval_loss = evaluate_loss(task, settings, device, engine)
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


def _save_checkpoint(task: Task, settings: TrainConfig, optimizer: torch.optim.Optimizer, state: TrainState,
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


class _Clock:
    """Wall time of the run and of its steps; the first step (compilation, warm-up) is kept apart.

    Rates count the loss-carrying tokens and the input tokens of the steps after the first
    (the first alone when it is the only one). ``elapsed`` goes on from the checkpoint's.
    """

    def __init__(self, state: TrainState):
        self.begun, self.elapsed_before = time.perf_counter(), state.elapsed_s
        self.first_step: float | None = None
        self.steps_time, self._t0 = 0.0, 0.0
        self._from = self._after_first = (state.tokens, state.input_tokens)

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self, state: TrainState) -> None:
        took = time.perf_counter() - self._t0
        if self.first_step is None:
            self.first_step, self._after_first = took, (state.tokens, state.input_tokens)
        else:
            self.steps_time += took
            self._from = self._after_first

    def rates(self, state: TrainState) -> tuple[float | None, float | None]:
        """(loss-carrying, input) tokens per second of this process's steps."""
        seconds = self.steps_time or self.first_step or 0.0
        if seconds <= 0:
            return None, None
        return (state.tokens - self._from[0]) / seconds, (state.input_tokens - self._from[1]) / seconds

    def elapsed(self) -> float:
        """Seconds of the run so far, over every process that worked on it (downtime between them excluded)."""
        return self.elapsed_before + time.perf_counter() - self.begun


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


def _finish(task: Task, state: TrainState, best: dict[str, torch.Tensor] | None, clock: _Clock, output_dir: Path,
            log: RunLog, main: bool, ddp: distributed.Dist | None, engine: Engine | None = None) -> dict[str, Any]:
    """Restore the best weights (early stopping), save the result, write summary.json."""
    if engine is not None:
        engine.gather_full()
    model = task.model
    eval_loss = state.eval_loss
    if best is not None:
        _load_trainable(model, best, output_dir / "best.safetensors")
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
    for name, after in measure(task.evaluators, model).items():
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


def _load_trainable(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    params = dict(model.named_parameters())
    for name, value in weights.items():
        if name not in params or params[name].shape != value.shape:
            raise TrainingError(f"{source}: tensor '{name}' {tuple(value.shape)} does not fit this model "
                                f"({tuple(params[name].shape) if name in params else 'no such parameter'}); "
                                "the checkpoint belongs to another model or method")
        with torch.no_grad():
            params[name].copy_(value)
