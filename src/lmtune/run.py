"""From a validated config to a finished run: check inputs, build the task, call ``train()``.

Everything that can be checked without a model is checked first (config, output folder,
data files), so a mistake is reported in a second, not after a model has loaded.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmtune.data.readers import Record, read_records
from lmtune.errors import InputError
from lmtune.methods import Prepared, apply_method
from lmtune.models.encoders import refuse_encoder
from lmtune.models.loading import (
    check_tokenizer,
    context_length,
    load_causal_lm,
    load_tokenizer,
    resolve_model_dir,
)
from lmtune.regularize import Guards
from lmtune.runlog import RunLog

# objective -> module with ``build_task(ctx) -> Task``; imported only when used.
OBJECTIVES = {
    "lm": "lmtune.objectives.lm_task",
    "sft": "lmtune.objectives.sft_task",
    "dpo": "lmtune.objectives.dpo_task",
    "reward": "lmtune.objectives.reward_task",
    "ppo": "lmtune.objectives.ppo_task",
    "classify": "lmtune.objectives.classify_task",
}

# data format -> the objective it implies when ``objective`` is unset.
DEFAULT_OBJECTIVE = {
    "text": "lm", "prompt_completion": "sft", "alpaca": "sft", "messages": "sft",
    "preference": "dpo", "classification": "classify", "prompts": "ppo",
}


@dataclass
class RunContext:
    """What an objective needs to build its task: config, tokenizer, records, model loading."""

    cfg: dict[str, Any]
    model_folder: Path
    tokenizer: Any
    output_dir: Path
    log: RunLog
    _records: dict[str, list[Record]] = field(default_factory=dict)

    def records(self, key: str) -> list[Record] | None:
        """The records of the data file named by config key ``key`` (``None`` if unset)."""
        if self.cfg.get(key) is None:
            return None
        if key not in self._records:
            self._records[key] = read_records(self.cfg[key])
        return self._records[key]

    def load_causal_lm(self) -> Any:
        if self.cfg["method"] == "qlora":  # stream weights into 4 bits: never the whole fp32 model in memory
            from lmtune.methods.qlora import load_quantized

            return load_quantized(self.model_folder, self.cfg)
        return load_causal_lm(self.model_folder, self.cfg["trust_remote_code"])

    def apply_method(self, model: Any) -> Prepared:
        return apply_method(model, self.tokenizer, self.cfg, self.model_folder)


def detect_format(records: list[Record]) -> str:
    """The data format implied by the first record's fields."""
    fields = set(records[0].fields)
    if {"chosen", "rejected"} <= fields:
        return "preference"
    if "messages" in fields or "conversations" in fields:
        return "messages"
    if "instruction" in fields and "output" in fields:
        return "alpaca"
    if {"prompt", "completion"} <= fields:
        return "prompt_completion"
    if "label" in fields and ("text" in fields or "text_pair" in fields):
        return "classification"
    if "text" in fields:
        return "text"
    if "prompt" in fields:
        return "prompts"
    raise InputError(f"{records[0].where}: cannot tell the data format from the fields {sorted(fields)}; "
                     "expected text, prompt+completion, instruction+output, messages, prompt+chosen+rejected, "
                     "or text+label — or set data.format")


def check_output_dir(cfg: dict[str, Any]) -> Path:
    """The output folder, refusing to write over a finished or checkpointed run unless resuming."""
    if not cfg["output_dir"]:
        raise InputError("output_dir is required: where the run writes its model, metrics and summary")
    out = Path(cfg["output_dir"])
    if out.exists() and not out.is_dir():
        raise InputError(f"output_dir {out} is a file")
    if not cfg["train.resume"] and ((out / "summary.json").exists() or (out / "checkpoints").exists()):
        raise InputError(f"output_dir {out} already holds a run; choose a new output_dir, delete it, "
                         "or continue it with train.resume=true")
    return out


def prepare(cfg: dict[str, Any], log: RunLog | None = None) -> tuple[Any, RunContext]:
    """Check everything, then build the task (which loads the model)."""
    out = check_output_dir(cfg)
    if cfg["data.train"] is None:
        raise InputError("data.train is required: the training data file")
    folder = resolve_model_dir(cfg["model"])
    tokenizer = load_tokenizer(folder, cfg["trust_remote_code"])
    check_tokenizer(folder, tokenizer)
    ctx = RunContext(cfg, folder, tokenizer, out, log or RunLog(out))
    context = context_length(folder)
    if context is not None and cfg["train.max_length"] > context:
        # Positions past the model's context have no embedding; longer examples are truncated.
        ctx.log.say(f"train.max_length={cfg['train.max_length']} exceeds the model's context of {context} "
                    f"tokens; using {context}")
        cfg["train.max_length"] = context
    train_key = "data.train"
    if isinstance(cfg["data.train"], list):  # several files (multi-task): the objective reads them
        fmt = cfg["data.format"] if cfg["data.format"] != "auto" else "classification"
    else:
        records = ctx.records(train_key)
        fmt = cfg["data.format"] if cfg["data.format"] != "auto" else detect_format(records)
    cfg["data.format"] = fmt
    if cfg["objective"] is None:
        cfg["objective"] = DEFAULT_OBJECTIVE[fmt]
    if cfg["objective"] != "classify":  # lm, sft, dpo, ppo and reward all load a causal LM
        refuse_encoder(folder)
    guards = Guards.from_context(ctx)  # data.retain, replay, L2: read and checked before the model loads
    module = importlib.import_module(OBJECTIVES[cfg["objective"]])
    task = module.build_task(ctx)
    guards.attach(task, cfg, tokenizer.pad_token_id)
    return task, ctx


def run_training(cfg: dict[str, Any], log: RunLog | None = None) -> dict[str, Any]:
    """Run ``lmtune train`` for a validated config and return the summary."""
    from lmtune.train import param_counts, train

    task, ctx = prepare(cfg, log)
    ctx.log.say(f"model: {ctx.model_folder} | method: {cfg['method']} | objective: {cfg['objective']} | "
                f"format: {cfg['data.format']}")
    total, trainable = param_counts(task.model)
    ctx.log.say(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / max(total, 1):.2f}%)")
    try:
        summary = train(task, cfg, ctx.output_dir, device=pick_device(), log=ctx.log)
    except OSError as e:  # disk full, permissions: say so, not a traceback; checkpoints are written atomically
        raise InputError(f"training stopped: a write in {ctx.output_dir} failed: {e}. Checkpoints already "
                         "written are intact; free space (or fix permissions) and continue with "
                         "train.resume=true") from None
    ctx.log.say(f"saved to {ctx.output_dir}")
    return summary


def pick_device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
