"""From a validated config to a finished run: check inputs, build the task, call ``train()``.

Everything that can be checked without a model is checked first (config, output folder,
data, which keys apply), so a mistake is reported in a second, not after a model has loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmtune import allocator
from lmtune.config import KEYS, RunConfig
from lmtune.data.formats import detect_format
from lmtune.data.readers import Record, read_records
from lmtune.distributed import pick_device
from lmtune.engine import check_strategy
from lmtune.errors import InputError
from lmtune.footprint import current_rss_bytes, longest_sequence, predicted_peak_mb
from lmtune.methods.registry import METHODS, Method
from lmtune.models.encoders import refuse_encoder
from lmtune.models.loading import (
    check_tokenizer,
    context_length,
    load_tokenizer,
    param_counts,
    resolve_model_dir,
)
from lmtune.objectives.registry import DEFAULT_OBJECTIVE, OBJECTIVES, Objective
from lmtune.objectives.task import RunContext, Task
from lmtune.recompute import enable_gradient_checkpointing
from lmtune.regularize import Guards
from lmtune.rundir import lock_output_dir, refuse_model_folder
from lmtune.runlog import RunLog
from lmtune.runrecord import record_run
from lmtune.train import train

IN_MEMORY = Path("in-memory model")  # what a run records as its base when the API was handed a model object


@dataclass
class RunResult:
    """What a finished run gives back to Python: the trained model, its tokenizer, the summary, the folder."""

    model: torch.nn.Module
    tokenizer: Any
    summary: dict[str, Any]
    output_dir: Path


def check_output_dir(output_dir: str | None, resume: bool) -> Path:
    """The output folder, refusing to write over a finished or checkpointed run unless resuming."""
    if not output_dir:
        raise InputError("output_dir is required: where the run writes its model, metrics and summary")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"output_dir {out} is a file")
    if not resume and ((out / "summary.json").exists() or (out / "checkpoints").exists()):
        raise InputError(f"output_dir {out} already holds a run; choose a new output_dir, delete it, "
                         "or continue it with train.resume=true")
    return out


def check_keys_apply(cfg: RunConfig, method: Method, objective: Objective, eval_rows: bool = False) -> None:
    """Refuse a key that would be accepted and then do nothing (or cannot be honoured) in this run.

    A section or key that a registry entry declares it ``reads`` applies only when that
    method/objective is chosen; ``refuses`` lists what an entry cannot honour. ``eval_rows``:
    the Python API was given held-out rows in memory, which stand in for ``data.eval``.

    Raises:
        InputError: naming the key, who reads it, and what to change.
    """
    readers: dict[str, list[str]] = {}
    for kind, entries in (("method", METHODS), ("objective", OBJECTIVES)):
        for entry in entries.values():
            for name in entry.reads:
                readers.setdefault(name, []).append(f"{kind}={entry.name}")
    chosen = set(method.reads) | set(objective.reads)
    for name, value in cfg.flat().items():
        if value == KEYS[name].default or (isinstance(value, tuple) and list(value) == list(KEYS[name].default)):
            continue
        owner = next((o for o in (name, name.rsplit(".", 1)[0]) if o in readers), None)
        if owner is not None and owner not in chosen:
            raise InputError(f"{name}={value!r} has no effect with method={method.name} objective={objective.name}: "
                             f"only {' or '.join(readers[owner])} reads it; remove it or change method/objective")
        for entry, kind in ((method, "method"), (objective, "objective")):
            if name in entry.refuses:
                raise InputError(f"{name} does not work with {kind}={entry.name}: {entry.refuses[name]}; "
                                 "remove it")
    train, data = cfg.train, cfg.data
    has_eval = data.eval is not None or eval_rows
    if train.steps is not None and train.epochs != KEYS["train.epochs"].default:
        raise InputError(f"train.steps={train.steps} and train.epochs={train.epochs} both set the run's length; "
                         "set one of them")
    if train.patience and not has_eval:
        raise InputError(f"train.patience={train.patience} stops on the eval loss, which needs data.eval "
                         "(a held-out file); set data.eval or remove train.patience")
    if train.eval_every and not has_eval and data.retain is None:
        raise InputError(f"train.eval_every={train.eval_every} evaluates data.eval (and data.retain), and neither "
                         "is set; set one or remove train.eval_every")


def resolve(cfg: RunConfig, records: list[Record] | None,
            eval_rows: bool = False) -> tuple[RunConfig, Method, Objective]:
    """Fill in the data format and objective from the data; check the method/objective pair and the keys."""
    if isinstance(cfg.data.train, list):  # several files (multi-task classification): the objective reads them
        fmt = cfg.data.format if cfg.data.format != "auto" else "classification"
    else:
        fmt = cfg.data.format if cfg.data.format != "auto" else detect_format(records)
    objective_name = cfg.objective or DEFAULT_OBJECTIVE.get(fmt)
    if objective_name is None:
        raise InputError(f"data.format={fmt} does not imply an objective; set objective "
                         f"({', '.join(OBJECTIVES)})")
    cfg = cfg.replace({"data.format": fmt, "objective": objective_name})
    method, objective = METHODS[cfg.method], OBJECTIVES[objective_name]
    if isinstance(cfg.data.train, list) and objective.name != "classify":
        raise InputError(f"data.train lists {len(cfg.data.train)} files, which only objective=classify (one task per "
                         f"file) takes; objective={objective.name} trains on one file")
    if objective.methods is not None and method.name not in objective.methods:
        allowed = " or ".join(f"method={m}" for m in objective.methods)
        raise InputError(f"objective={objective.name} trains with {allowed}; got method={method.name}")
    check_keys_apply(cfg, method, objective, eval_rows)
    check_strategy(cfg)
    return cfg, method, objective


def prepare(cfg: RunConfig, log: RunLog | None = None, model: torch.nn.Module | None = None, tokenizer: Any = None,
            train_records: list[Record] | None = None,
            eval_records: list[Record] | None = None, show_example: bool = False) -> tuple[Task, RunContext]:
    """Check everything, then build the task (which loads the model).

    ``model``/``tokenizer`` and ``train_records``/``eval_records`` are the Python API's in-memory
    model and data, used instead of the ``model`` and ``data.*`` files.
    """
    out = check_output_dir(cfg.output_dir, cfg.train.resume)
    if cfg.data.train is None and train_records is None:
        raise InputError("data.train is required: the training data file")
    if model is not None:
        if tokenizer is None:
            raise InputError("an in-memory model needs its tokenizer: pass tokenizer=")
        if cfg.model is not None:
            raise InputError("give the model either as an object or as config key 'model', not both")
        folder = IN_MEMORY
        context = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    else:
        folder = resolve_model_dir(cfg.model)
        refuse_model_folder(out, folder)
        tokenizer = load_tokenizer(folder, cfg.trust_remote_code)
        check_tokenizer(folder, tokenizer)
        context = context_length(folder)
    given = {"data.train": train_records, "data.eval": eval_records}
    preset = {k: v for k, v in given.items() if v is not None}
    records = preset.get("data.train")
    if records is None and not isinstance(cfg.data.train, list):
        records = read_records(cfg.data.train)
        preset["data.train"] = records
    cfg, method, objective = resolve(cfg, records, eval_records is not None)
    if model is not None and not objective.generative:
        raise InputError(f"objective={objective.name} loads its model from a folder (it adds a head); "
                         "pass model= as a folder path")
    if log is None:  # under torchrun only rank 0 prints and writes; the others check the same inputs silently
        main = int(os.environ.get("RANK", "0")) == 0
        log = RunLog(out) if main else RunLog(out, quiet=True, tensorboard=False, active=False)
    if context is not None and cfg.train.max_length > context:
        # Positions past the model's context have no embedding; longer examples are truncated.
        log.say(f"train.max_length={cfg.train.max_length} exceeds the model's context of {context} tokens; "
                f"using {context}")
        cfg = cfg.replace({"train.max_length": context})
    if objective.generative and model is None:
        refuse_encoder(folder)
    ctx = RunContext(cfg, method, folder, tokenizer, out, log, base_model=model, _records=preset,
                     show_example=show_example)
    record_run(out, cfg.flat(), log)  # run.json: a resume that would not continue the same run is refused here
    guards = Guards.from_context(ctx)  # data.retain, replay, L2: read and checked before the model loads
    task = objective.build(ctx)
    guards.attach(task, cfg, tokenizer.pad_token_id)
    task.summary = {"method": method.name, "objective": objective.name, **task.summary}
    return task, ctx


def run_training(cfg: RunConfig, *, model: torch.nn.Module | None = None, tokenizer: Any = None,
                 train_records: list[Record] | None = None, eval_records: list[Record] | None = None,
                 log: RunLog | None = None, show_example: bool = False) -> RunResult:
    """Run ``lmtune train`` for a validated config (``show_example``: print the first example by mask).

    Returns:
        The trained model (adapter attached where there is one), tokenizer, summary and output folder.

    Raises:
        InputError: bad input, found before any model loads where it can be.
        Interrupted: SIGINT/SIGTERM; a checkpoint was saved first.
    """
    from transformers import PreTrainedModel  # noqa: F401  (~150 MB every run holds: inside the baseline)

    if cfg.method in allocator.FREEING_METHODS:  # a small resident set is its point: glibc must not keep frees
        allocator.return_large_frees()
    baseline = current_rss_bytes()  # before the model loads: Python, torch, transformers, lmtune
    with lock_output_dir(check_output_dir(cfg.output_dir, cfg.train.resume)):  # one process per output_dir
        task, ctx = prepare(cfg, log, model, tokenizer, train_records, eval_records, show_example)
        cfg = ctx.cfg
        if cfg.train.gradient_checkpointing:
            enable_gradient_checkpointing(task.model)
        if model is None:  # a model passed in as an object has no config folder to inspect
            longest = longest_sequence(getattr(task.batches, "examples", None), cfg.train.max_length)
            task.summary["predicted_peak_mb"] = predicted_peak_mb(ctx.model_folder, cfg, baseline, longest)
        ctx.log.say(f"model: {ctx.model_folder} | method: {cfg.method} | objective: {cfg.objective} | "
                    f"format: {cfg.data.format}")
        total, trainable = param_counts(task.model)
        ctx.log.say(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / max(total, 1):.2f}%)")
        try:
            summary = train(task, cfg.train, ctx.output_dir, device=pick_device(), log=ctx.log)
        except OSError as e:  # disk full, permissions: say so, not a traceback; checkpoints are written atomically
            raise InputError(f"training stopped: a write in {ctx.output_dir} failed: {e}. Checkpoints already "
                             "written are intact; free space (or fix permissions) and continue with "
                             "train.resume=true") from None
    ctx.log.say(f"saved to {ctx.output_dir}")
    return RunResult(model=task.model, tokenizer=ctx.tokenizer, summary=summary, output_dir=ctx.output_dir)
