"""The lmtune arms, driven through lmtune's public API the way a user's script would.

``lmtune.run.prepare(cfg)`` builds the task exactly as ``lmtune train`` does (reading
``sft-V<V>.jsonl`` / ``pref-V<V>.jsonl``, tokenizing, applying LoRA, packing); the benchmark then loads
the shared LoRA initialisation into the adapters (so the per-step losses can be compared with
the plain loop) and calls ``lmtune.train.train``. A ``RunLog`` subclass timestamps each step.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from common import LORA, OPTIM, SEED, StepClock, current_rss_mb, ordered, read_json
from fixtures import data_file


def _timed_log(out: Path, clock: StepClock, tokens_of: Any) -> Any:
    from lmtune.runlog import RunLog

    class TimedLog(RunLog):
        """lmtune's own log (metrics.jsonl + TensorBoard, as a user gets) plus a step clock."""

        def progress(self, total: int, initial: int) -> Any:
            clock.start()  # the loop starts right after this
            return super().progress(total, initial)

        def step(self, record: dict[str, Any], total: int) -> None:
            clock.tick(tokens_of(record), record["loss"])
            super().step(record, total)

    return TimedLog(out, quiet=True)


def lmtune_config(spec: dict[str, Any], data: Path, objective: str) -> Any:
    from lmtune.config import load_config

    work = Path(spec["work"])
    keys = {"model": str(work / f"model-{spec['rung']}"), "method": "lora", "objective": objective,
            "data.train": str(data), "output_dir": spec["scratch"],
            "lora.r": LORA["r"], "lora.alpha": float(LORA["alpha"]), "lora.dropout": LORA["dropout"],
            "lora.target_modules": LORA["targets"],
            "train.steps": spec["steps"], "train.batch_size": spec["batch_size"], "train.lr": OPTIM["lr"],
            "train.schedule": "constant", "train.warmup_steps": 0, "train.weight_decay": OPTIM["weight_decay"],
            "train.betas": OPTIM["betas"], "train.eps": OPTIM["eps"], "train.clip_grad_norm": OPTIM["clip"],
            "train.max_length": 512, "train.precision": spec["precision"], "train.seed": SEED,
            "train.log_every": 1, "train.eval_every": 0, "train.save_every": 0}
    if spec.get("packing"):
        keys["train.packing"] = True
    if spec.get("compile"):
        keys["train.compile"] = True
    if objective == "dpo":
        keys["dpo.beta"] = 0.1
        if spec.get("precompute_ref"):
            keys["dpo.precompute_ref"] = True
    return load_config(None, keys)


def load_lora_init(model: Any, folder: Path) -> int:
    """Copy the shared PEFT-format LoRA init into lmtune's adapters; returns tensors copied.

    Matches on the module path (``layers.3.self_attn.q_proj``) and the A/B role; every
    trainable tensor must find its partner of the same shape, or the comparison is void.
    """
    import torch
    from safetensors.torch import load_file

    init = load_file(folder / "adapter_model.safetensors")

    def key(name: str) -> tuple[str, str] | None:
        m = re.search(r"(layers\.\d+\.\w+\.\w+)\.(?:lora_)?([AB])\b", name)
        return (m.group(1), m.group(2)) if m else None

    source = {key(k): v for k, v in init.items() if key(k)}
    copied = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        k = key(name)
        if k is None or k not in source or source[k].shape != p.shape:
            raise RuntimeError(f"no LoRA init for lmtune parameter {name} {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(source[k])
        copied += 1
    if copied != len(source):
        raise RuntimeError(f"copied {copied} LoRA tensors, the init has {len(source)}")
    return copied


def _checkpointed_head(head: Any, h: Any, y: Any, chunk_rows: int = 1024) -> Any:
    """lmtune's head before ``head_logprobs``: each chunk checkpointed, so recomputed in backward."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from lmtune.objectives.head_logprobs import _chunk_logp

    return torch.cat([checkpoint(_chunk_logp, head, h[s:s + chunk_rows], y[s:s + chunk_rows], use_reentrant=False)
                      for s in range(0, h.shape[0], chunk_rows)])


def _run(spec: dict[str, Any], objective: str, data: Path, tokens_of: Any) -> dict[str, Any]:
    import torch

    from lmtune.distributed import pick_device
    from lmtune.run import prepare
    from lmtune.train import train

    out = Path(spec["scratch"])
    cfg = lmtune_config(spec, data, objective)
    clock = StepClock()
    log = _timed_log(out, clock, tokens_of)
    task, ctx = prepare(cfg, log)
    copied = load_lora_init(task.model, Path(spec["work"]) / f"lora-init-{spec['rung']}")
    torch.manual_seed(SEED)
    rss_start = current_rss_mb()
    summary = train(task, ctx.cfg.train, ctx.output_dir, device=pick_device(), log=log)
    return {"steps": clock.steps, "rss_at_start_mb": rss_start, "lora_tensors_loaded": copied,
            "lmtune_summary": {k: summary.get(k) for k in ("tokens_per_second", "first_step_seconds", "final_loss",
                                                              "trainable_params", "total_params")}}


def run_lmtune_sft(spec: dict[str, Any]) -> dict[str, Any]:
    """lmtune LoRA SFT on the prompt/completion records, optionally packed / bf16 / compiled.

    ``spec["head"] == "checkpoint"`` swaps in the earlier checkpointed head (recomputed in
    backward) to measure what the fused head gradient (``head_logprobs``) buys.
    """
    if spec.get("head") == "checkpoint":
        import lmtune.objectives.lm as lm

        lm.head_logprobs = _checkpointed_head
    prev = {"tokens": 0}

    def tokens_of(record: dict[str, Any]) -> int:  # metrics.jsonl's ``tokens`` is cumulative loss tokens
        n, prev["tokens"] = record["tokens"] - prev["tokens"], record["tokens"]
        return n

    result = _run(spec, "sft", data_file(Path(spec["work"]), spec["rung"], "sft"), tokens_of)
    if not spec.get("packing"):  # same batches as the plain loop: the token counts must agree
        want = ordered(read_json(Path(spec["work"]) / f"sft-{spec['rung']}.json")["examples"], epochs=2)
        bs = spec["batch_size"]
        expect = [sum(sum(x != -100 for x in e["labels"][1:]) for e in want[i * bs:(i + 1) * bs])
                  for i in range(len(result["steps"]))]
        result["tokens_match"] = expect == [s["tokens"] for s in result["steps"]]
    return result


def run_lmtune_dpo(spec: dict[str, Any]) -> dict[str, Any]:
    """lmtune LoRA DPO on the preference records; tokens/s counts chosen + rejected completion tokens."""
    pairs = ordered(read_json(Path(spec["work"]) / f"pref-{spec['rung']}.json")["examples"], epochs=2)
    bs = spec["batch_size"]
    # Loss-carrying positions: every completion token (its predecessor is the last prompt token).
    per_step = [sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs[i * bs:(i + 1) * bs])
                for i in range(spec["steps"])]
    seen = {"i": 0}

    def tokens_of(record: dict[str, Any]) -> int:
        n = per_step[seen["i"]]
        seen["i"] += 1
        return n

    return _run(spec, "dpo", data_file(Path(spec["work"]), spec["rung"], "pref"), tokens_of)


def run_lmtune_full(spec: dict[str, Any]) -> dict[str, Any]:
    """Full fine-tuning through ``lmtune.train.train`` with a ``Task`` built from the fixture's examples.

    Uses only what main has (``pad_batch``, ``lm_loss``, ``train``), so lmtune's loop can be
    compared with the plain loop (``plain-full``) step for step before LoRA/SFT land.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmtune.config import load_config
    from lmtune.data.batching import pad_batch
    from lmtune.distributed import pick_device
    from lmtune.objectives.lm import lm_loss
    from lmtune.objectives.task import ExampleBatches, Task
    from lmtune.train import train

    work, out = Path(spec["work"]), Path(spec["scratch"])
    folder = work / f"model-{spec['rung']}"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").requires_grad_(True)
    pad_id = AutoTokenizer.from_pretrained(folder).pad_token_id
    examples = read_json(work / f"sft-{spec['rung']}.json")["examples"]
    cfg = load_config(None, {"method": "full", "objective": "sft", "output_dir": str(out),
                             "train.steps": spec["steps"], "train.batch_size": spec["batch_size"],
                             "train.lr": OPTIM["lr"], "train.schedule": "constant",
                             "train.weight_decay": OPTIM["weight_decay"], "train.betas": OPTIM["betas"],
                             "train.eps": OPTIM["eps"], "train.clip_grad_norm": OPTIM["clip"],
                             "train.precision": spec["precision"], "train.seed": SEED,
                             "train.compile": bool(spec.get("compile"))})
    batches = ExampleBatches(examples, lambda exs: pad_batch(exs, pad_id), cfg.train.batch_size, cfg.train.seed)
    task = Task(model=model, batches=batches, loss=lm_loss, save=lambda path: None)
    prev = {"tokens": 0}

    def tokens_of(record: dict[str, Any]) -> int:
        n, prev["tokens"] = record["tokens"] - prev["tokens"], record["tokens"]
        return n

    clock = StepClock()
    log = _timed_log(out, clock, tokens_of)
    torch.manual_seed(SEED)
    rss_start = current_rss_mb()
    train(task, cfg.train, out, device=pick_device(), log=log)
    return {"steps": clock.steps, "rss_at_start_mb": rss_start}
