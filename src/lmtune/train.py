"""The one training loop: pre-training, fine-tuning, LoRA, SFT, DPO, reward modelling.

``train(task, cfg)`` reads top to bottom: batch -> loss -> backward -> (accumulate) -> clip ->
step -> log / eval / save. What differs between methods and objectives lives in the
``Task`` (which parameters train, how examples batch, what the loss is, what gets saved).
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmtune import checkpoint as ckpt
from lmtune import distributed
from lmtune.data.batching import epoch_order
from lmtune.errors import InputError
from lmtune.runlog import RunLog, peak_rss_mb

LossFn = Callable[[torch.nn.Module, dict[str, Any]], tuple[torch.Tensor, dict[str, float]]]


class TrainingError(InputError):
    """Training cannot go on (non-finite loss, nothing to train); exit code 2 with the reason."""


@dataclass
class Task:
    """What one run trains: the model, its data, its loss, and how to save the result.

    ``loss`` returns the *sum* of the loss over the batch's loss units (tokens for LM
    objectives, pairs for DPO) and the batch names that count as ``num_loss_tokens``. Where a
    unit is not a token, the batch also says how many tokens it trained on (``num_tokens``:
    completion tokens of a pair, real tokens of a classified text) for ``tokens_trained``.
    """

    model: torch.nn.Module
    train_examples: list[Any]
    collate: Callable[[list[Any]], dict[str, Any]]
    loss: LossFn
    save: Callable[[Path], None]
    eval_examples: list[Any] | None = None
    regularizers: list[Callable[[torch.nn.Module], torch.Tensor]] = field(default_factory=list)
    evaluators: dict[str, Callable[[torch.nn.Module], float]] = field(default_factory=dict)
    batch_transform: Callable[[list[Any], int], list[Any]] | None = None  # e.g. replay mixing
    next_batch: Callable[[int], dict[str, Any]] | None = None  # PPO: micro-batches from its own rollouts
    summary: dict[str, Any] = field(default_factory=dict)  # method/objective facts for summary.json
    # State of the task's own that a checkpoint must carry to resume exactly (PPO's rollout
    # buffer): an object with ``state_dict() -> (tensors, json_meta)`` and ``load_state_dict``.
    resumable: Any = None


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name (what checkpoints and early stopping keep)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def param_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(total, trainable) parameters, counting tied weights once."""
    seen: dict[int, torch.nn.Parameter] = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return total, trainable


def make_optimizer(model: torch.nn.Module, cfg: dict[str, Any]) -> torch.optim.AdamW:
    """AdamW over trainable parameters; matrices decay, biases and norm weights do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("nothing to train: every parameter is frozen (check method and freeze.layers)")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg["train.weight_decay"]},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg["train.lr"], betas=tuple(cfg["train.betas"]), eps=cfg["train.eps"])


def lr_at(step: int, cfg: dict[str, Any], total: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then the schedule."""
    peak, warm = cfg["train.lr"], cfg["train.warmup_steps"]
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    if cfg["train.schedule"] == "linear":
        return peak * (1.0 - progress)
    if cfg["train.schedule"] == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak


def total_steps(cfg: dict[str, Any], n_examples: int) -> int:
    """``train.steps`` or, when unset, the steps that make ``train.epochs`` passes."""
    if cfg["train.steps"] is not None:
        return cfg["train.steps"]
    per_epoch = math.ceil(n_examples / cfg["train.batch_size"])
    return max(1, math.ceil(cfg["train.epochs"] * per_epoch / cfg["train.grad_accum"]))


class BatchStream:
    """Deterministic micro-batches: epoch ``e`` visits examples in ``epoch_order(n, seed, e)``.

    Its position (epoch, batch) is all a checkpoint needs to continue the same order.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int = 0, index: int = 0):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.index = epoch, index
        self._order = epoch_order(n, seed, epoch)

    def next(self) -> list[int]:
        if self.index * self.batch_size >= self.n:
            self.epoch, self.index = self.epoch + 1, 0
            self._order = epoch_order(self.n, self.seed, self.epoch)
        start = self.index * self.batch_size
        self.index += 1
        return self._order[start:start + self.batch_size]

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast (fast on avx512_bf16 CPUs and GPUs) or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate_loss(task: Task, examples: list[Any], cfg: dict[str, Any], device: torch.device) -> float:
    """Mean loss per loss unit over ``examples`` (token-weighted for LM objectives)."""
    was_training = task.model.training
    task.model.eval()
    total, units = 0.0, 0
    bs = cfg["train.batch_size"]
    with autocast(cfg["train.precision"], device):
        for start in range(0, len(examples), bs):
            batch = to_device(task.collate(examples[start:start + bs]), device)
            loss_sum, _ = task.loss(task.model, batch)
            total += float(loss_sum)
            units += batch["num_loss_tokens"]
    task.model.train(was_training)
    return total / max(units, 1)


class _StopSignal:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the end of the step and exits."""

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


def train(task: Task, cfg: dict[str, Any], output_dir: Path, device: torch.device | None = None,
          log: RunLog | None = None) -> dict[str, Any]:
    """Train ``task`` per ``cfg`` and write metrics, checkpoints, final artifacts and summary.json.

    Returns:
        The summary dict (also written to ``output_dir/summary.json``).

    Raises:
        TrainingError: non-finite loss (the step is named; the last good checkpoint stays)
            or nothing trainable.
    """
    ddp = distributed.from_env(cfg)
    device = ddp.device if ddp else (device or torch.device("cpu"))
    main = ddp is None or ddp.main  # only rank 0 logs and writes files
    model = task.model.to(device)
    model.train()
    steps = total_steps(cfg, len(task.train_examples))
    accum, seed = cfg["train.grad_accum"], cfg["train.seed"]
    task.model = model
    optimizer = make_optimizer(model, cfg)
    global_batch = cfg["train.batch_size"] * (ddp.world if ddp else 1)
    stream = BatchStream(len(task.train_examples), global_batch, seed)
    ckpt_root = output_dir / "checkpoints"
    state = {"step": 0, "tokens": 0, "best_eval": None, "bad_evals": 0, "eval_loss": None, "last_loss": None}
    best_weights: dict[str, torch.Tensor] | None = None
    log = log or RunLog(output_dir)
    if not main:
        log = RunLog(output_dir, quiet=True, tensorboard=False, active=False)
    torch.manual_seed(seed)

    found = ckpt.latest_good(ckpt_root, warn=log.say) if cfg["train.resume"] else None
    if found is None:
        log.truncate_after(0)  # starting at step 0: drop records an earlier killed or failed attempt left
    if cfg["train.resume"] and found is None:
        log.say(f"no usable checkpoint in {ckpt_root}; starting from step 0")
    if found is not None:
        weights, optim_state, meta = ckpt.load_checkpoint(found)
        ckpt.check_fits(found, trainable_state(model), weights, optimizer, optim_state)
        _load_trainable(model, weights, found)
        optimizer.load_state_dict(optim_state)
        state.update(meta["loop"]["state"])
        stream = BatchStream(len(task.train_examples), global_batch, seed, **meta["loop"]["stream"])
        if task.resumable is not None:
            task.resumable.load_state_dict(meta["task_tensors"], meta["loop"].get("task", {}))
        ckpt.set_rng_state(meta["rng_tensors"], meta["rng"])
        if state["best_eval"] is not None and (output_dir / "best.safetensors").exists():
            from safetensors.torch import load_file
            best_weights = load_file(output_dir / "best.safetensors")
        log.truncate_after(state["step"])
        log.say(f"resumed from {found} at step {state['step']}")

    for name, fn in task.evaluators.items():
        if f"{name}_before" not in state:
            state[f"{name}_before"] = fn(model)

    if cfg["train.compile"]:
        # The loss calls the body (base_model) and the head separately: compile the body,
        # where the time goes. Compilation happens during the first step, reported apart.
        body = getattr(model, "base_model", model)
        body.compile()
    start_time, start_tokens, step_time = time.perf_counter(), state["tokens"], 0.0
    first_step_seconds = None
    stop = _StopSignal()
    with stop, log.progress(steps, state["step"]) as bar:
        while state["step"] < steps:
            t0 = time.perf_counter()
            step = state["step"]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg, steps)
            micro = [_next_batch(task, stream, step, ddp) for _ in range(accum)]
            loss, tokens, metrics = accumulate_gradients(task, micro, cfg["train.precision"], device, step, ddp)
            if ddp:
                ddp.sync_gradients([p for p in model.parameters() if p.requires_grad])
            if not math.isfinite(loss):
                optimizer.zero_grad(set_to_none=True)
                good = ckpt.latest_good(ckpt_root)
                raise TrainingError(
                    f"the loss became {loss} at step {step + 1}; training stopped before that step changed "
                    f"any weight. {'The last good checkpoint is ' + str(good) if good else 'No checkpoint was saved'}. "
                    "Try a lower train.lr, train.precision=fp32, or train.clip_grad_norm=1.0.")
            if cfg["train.clip_grad_norm"]:
                metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(
                    [p for p in model.parameters() if p.requires_grad], cfg["train.clip_grad_norm"]))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] = step = step + 1
            state["tokens"] += tokens
            state["last_loss"] = loss
            if first_step_seconds is None:
                # The first step carries compilation and allocator warm-up; keep it out of tokens/s.
                first_step_seconds = time.perf_counter() - t0
                start_tokens = state["tokens"] if steps > 1 else start_tokens
            else:
                step_time += time.perf_counter() - t0

            record = {"step": step, "loss": loss, "lr": optimizer.param_groups[0]["lr"], "tokens": state["tokens"],
                      **metrics}
            stop_early = False
            if _due(step, cfg["train.eval_every"], steps):
                stop_early, best_weights = _evaluate(task, cfg, device, state, record, best_weights, model,
                                                     output_dir if main else None)
            if step % cfg["train.log_every"] == 0 or step in (1, steps) or "eval_loss" in record:
                log.step(record, steps)
            bar.update(1)
            if main and ((cfg["train.save_every"] and step % cfg["train.save_every"] == 0) or stop.received):
                task_tensors, task_meta = task.resumable.state_dict() if task.resumable is not None else ({}, {})
                ckpt.save_checkpoint(ckpt_root, step, trainable_state(model), optimizer,
                                     {"state": state, "stream": stream.position(), "task": task_meta},
                                     cfg["train.keep_checkpoints"], task_tensors)
            if stop.received:
                log.say(f"received signal {stop.received}: checkpoint saved at step {step}; "
                        "continue with train.resume=true")
                sys.exit(128 + stop.received)
            if stop_early:
                log.say(f"early stopping at step {step}: eval loss has not improved for "
                        f"{cfg['train.patience']} evaluations")
                break

    if best_weights is not None:
        _load_trainable(model, best_weights, output_dir / "best.safetensors")
        log.say(f"restored the best weights (eval loss {state['best_eval']:.4f})")
    elapsed = time.perf_counter() - start_time
    if main:
        task.save(output_dir)
    summary = _summary(task, cfg, state, model, tokens_this_run=state["tokens"] - start_tokens,
                       elapsed=elapsed, step_time=step_time or (first_step_seconds or 0.0))
    summary["first_step_seconds"] = first_step_seconds
    for name, fn in task.evaluators.items():
        summary[f"{name}_before"] = state[f"{name}_before"]
        summary[f"{name}_after"] = fn(model)
        summary[f"{name}_change"] = summary[f"{name}_after"] - summary[f"{name}_before"]
    log.finish(summary)
    if main:
        (output_dir / "best.safetensors").unlink(missing_ok=True)
    if ddp:
        ddp.barrier()  # no rank leaves while rank 0 is still writing the result
    return summary


def accumulate_gradients(task: Task, micro: list[dict[str, Any] | None], precision: str, device: torch.device,
                         step: int = 0, ddp: distributed.Dist | None = None) -> tuple[float, int, dict[str, float]]:
    """Backward over one accumulation window; gradients equal those of one big batch.

    Each micro-batch's summed loss is divided by the loss units of the *whole* window, so
    the accumulated gradient is the gradient of the window's mean loss however it is split.

    Returns:
        ``(mean loss, tokens trained, metrics)`` of the window.
    """
    micro = [b for b in micro if b is not None]  # a rank can get no share of a short last batch
    units = sum(b["num_loss_tokens"] for b in micro)
    tokens = sum(b.get("num_tokens", b["num_loss_tokens"]) for b in micro)
    if ddp:
        units = int(ddp.sum(units))  # every rank divides by the global count
        tokens = int(ddp.sum(tokens))
    if units == 0:
        raise TrainingError(f"step {step + 1}: the batch has no tokens that carry loss (every label is "
                            "masked); check train.loss_on, train.max_length and the data's responses")
    loss_total, metrics = 0.0, {}
    for batch in micro:
        batch = to_device(batch, device)
        with autocast(precision, device):
            loss_sum, m = task.loss(task.model, batch)
        (loss_sum / units).backward()
        loss_total += float(loss_sum.detach())
        for k, v in m.items():
            metrics[k] = metrics.get(k, 0.0) + v / len(micro)
    for reg in task.regularizers:
        reg_loss = reg(task.model)
        # Every rank adds the penalty's gradient; the all-reduce sums them, so each adds 1/world.
        (reg_loss / (ddp.world if ddp else 1)).backward()
        metrics["reg_loss"] = metrics.get("reg_loss", 0.0) + float(reg_loss.detach())
    if ddp:
        loss_total = ddp.sum(loss_total)
    return loss_total / units, tokens, metrics


def _next_batch(task: Task, stream: BatchStream, step: int,
                ddp: distributed.Dist | None = None) -> dict[str, Any] | None:
    if task.next_batch is not None:  # the batch depends on the policy (rollouts), not on the data order
        return task.next_batch(step)
    indices = distributed.shard(stream.next(), ddp)
    if not indices:
        return None
    examples = [task.train_examples[i] for i in indices]
    if task.batch_transform is not None:
        examples = task.batch_transform(examples, step)
    return task.collate(examples)


def _due(step: int, every: int, total: int) -> bool:
    return (every > 0 and step % every == 0) or step == total


def _evaluate(task: Task, cfg: dict[str, Any], device: torch.device, state: dict[str, Any], record: dict[str, Any],
              best_weights: dict[str, torch.Tensor] | None, model: torch.nn.Module,
              output_dir: Path | None) -> tuple[bool, dict[str, torch.Tensor] | None]:
    """Eval loss and evaluators; track the best weights for early stopping."""
    for name, fn in task.evaluators.items():
        record[name] = fn(model)
    if not task.eval_examples:
        return False, best_weights
    eval_loss = evaluate_loss(task, task.eval_examples, cfg, device)
    record["eval_loss"] = state["eval_loss"] = eval_loss
    if cfg["train.patience"] <= 0:
        return False, best_weights
    if state["best_eval"] is None or eval_loss < state["best_eval"]:
        state["best_eval"], state["bad_evals"] = eval_loss, 0
        best_weights = {k: v.detach().cpu().clone() for k, v in trainable_state(model).items()}
        if output_dir is not None:  # kept on disk too, so a resumed run can still restore them
            ckpt.save_tensors_atomic(output_dir / "best.safetensors", best_weights)
        return False, best_weights
    state["bad_evals"] += 1
    return state["bad_evals"] >= cfg["train.patience"], best_weights


def _load_trainable(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    params = dict(model.named_parameters())
    for name, value in weights.items():
        if name not in params or params[name].shape != value.shape:
            raise InputError(f"{source}: tensor '{name}' {tuple(value.shape)} does not fit this model "
                             f"({tuple(params[name].shape) if name in params else 'no such parameter'}); "
                             "the checkpoint belongs to another model or method")
        with torch.no_grad():
            params[name].copy_(value)


def _summary(task: Task, cfg: dict[str, Any], state: dict[str, Any], model: torch.nn.Module, tokens_this_run: int,
             elapsed: float, step_time: float) -> dict[str, Any]:
    total, trainable = param_counts(model)
    return {
        "method": cfg["method"], "objective": cfg["objective"],
        "total_params": total, "trainable_params": trainable,
        "trainable_ratio": trainable / max(total, 1),
        "steps": state["step"], "tokens_trained": state["tokens"],
        "final_loss": state["last_loss"], "eval_loss": state["eval_loss"],
        "tokens_per_second": tokens_this_run / step_time if step_time > 0 else None,
        "peak_rss_mb": peak_rss_mb(), "wall_seconds": elapsed,
        **task.summary,
    }
