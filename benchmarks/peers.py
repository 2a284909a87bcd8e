"""The peer arms: a plain PyTorch loop, ``transformers`` Trainer + PEFT, TRL SFTTrainer / DPOTrainer + PEFT.

Each function runs inside a fresh worker process (``worker.py``) and returns per-step records
(seconds, loss-carrying tokens, loss). Every arm starts from the same base weights and the same
LoRA initialisation (``lora-init-<rung>``, PEFT format) and sees the same batches in lmtune's
order: peers read a pre-ordered dataset with ``train_sampling_strategy="sequential"``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from common import IGNORE, OPTIM, SEED, StepClock, current_rss_mb, ordered, read_json


def device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_peft(work: Path, rung: str) -> tuple[Any, Any]:
    """(PEFT model with the shared trainable LoRA init, tokenizer) on the benchmark device."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = work / f"model-{rung}"
    base = AutoModelForCausalLM.from_pretrained(folder, dtype="float32")
    model = PeftModel.from_pretrained(base, work / f"lora-init-{rung}", is_trainable=True)
    return model.to(device()), AutoTokenizer.from_pretrained(folder)


def load_full(work: Path, rung: str) -> tuple[Any, Any]:
    """(base model, every weight trainable, tokenizer) for the full fine-tuning rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = work / f"model-{rung}"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").requires_grad_(True)
    return model.to(device()), AutoTokenizer.from_pretrained(folder)


def sft_examples(work: Path, rung: str) -> list[dict[str, list[int]]]:
    return read_json(work / f"sft-{rung}.json")["examples"]


def pad(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    """Right padding to the longest example (what lmtune's ``pad_batch`` does)."""
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_tokens(labels: Any) -> int:
    return int((labels[:, 1:] != IGNORE).sum())


def autocast(precision: str) -> Any:
    import torch

    if precision == "bf16":
        return torch.autocast(device().type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run_plain(spec: dict[str, Any]) -> dict[str, Any]:
    """The overhead floor: pad, forward with labels, backward, clip, AdamW. Nothing else."""
    import torch

    work, steps, bs = Path(spec["work"]), spec["steps"], spec["batch_size"]
    model, tok = (load_full if spec.get("full") else load_peft)(work, spec["rung"])
    model.train()
    examples = ordered(sft_examples(work, spec["rung"]), epochs=2)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=OPTIM["lr"], betas=tuple(OPTIM["betas"]), eps=OPTIM["eps"],
                            weight_decay=OPTIM["weight_decay"])
    clock, rss_start = StepClock(), current_rss_mb()
    torch.manual_seed(SEED)
    clock.start()
    for step in range(steps):
        batch = pad(examples[step * bs:(step + 1) * bs], tok.pad_token_id)
        n = loss_tokens(batch["labels"])
        batch = {k: v.to(device()) for k, v in batch.items()}
        with autocast(spec["precision"]):
            loss = model(**batch).loss  # mean over loss-carrying tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, OPTIM["clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        clock.tick(n, loss.item())
    return {"steps": clock.steps, "rss_at_start_mb": rss_start}


class _CountingCollator:
    """Wraps a collator to record each batch's loss-carrying tokens, in the order batches are made."""

    def __init__(self, inner: Any, key: str = "labels"):
        self.inner, self.key, self.tokens = inner, key, []

    def __call__(self, features: list[Any]) -> Any:
        batch = self.inner(features)
        if self.key == "completion_mask":  # DPO: completion tokens of chosen + rejected
            self.tokens.append(int(batch["completion_mask"][:, 1:].sum()))
        else:
            self.tokens.append(loss_tokens(batch["labels"]))
        return batch


def _clock_callback(clock: StepClock) -> Any:
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock.start()

        def on_step_end(self, args, state, control, **kw):
            clock.tick(0, None)  # tokens and loss are filled in afterwards

    return Clock()


def _common_args(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    """TrainingArguments shared by every Trainer-based arm: same optimiser, no eval/saving, per-step log."""
    return dict(output_dir=str(out), per_device_train_batch_size=spec["batch_size"], max_steps=spec["steps"],
                learning_rate=OPTIM["lr"], lr_scheduler_type="constant", warmup_steps=0,
                weight_decay=OPTIM["weight_decay"], adam_beta1=OPTIM["betas"][0], adam_beta2=OPTIM["betas"][1],
                adam_epsilon=OPTIM["eps"], max_grad_norm=OPTIM["clip"], logging_steps=1, save_strategy="no",
                eval_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
                train_sampling_strategy="sequential", seed=SEED, data_seed=SEED,
                bf16=spec["precision"] == "bf16", fp16=False, use_cpu=device().type == "cpu")


def _finish(trainer: Any, clock: StepClock, counter: _CountingCollator, rss_start: float) -> dict[str, Any]:
    """Attach tokens (from the collator) and losses (from the per-step log) to the clock's steps."""
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h and "step" in h}
    for i, s in enumerate(clock.steps):
        s["tokens"] = counter.tokens[i] if i < len(counter.tokens) else 0
        s["loss"] = losses.get(i + 1)
    return {"steps": clock.steps, "rss_at_start_mb": rss_start}


def run_hf_trainer(spec: dict[str, Any]) -> dict[str, Any]:
    """``transformers.Trainer`` on the PEFT model with ``DataCollatorForSeq2Seq`` (pads to the longest)."""
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    work = Path(spec["work"])
    model, tok = load_peft(work, spec["rung"])
    data = Dataset.from_list(ordered(sft_examples(work, spec["rung"]), epochs=2))
    counter = _CountingCollator(DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=IGNORE))
    clock = StepClock()
    args = TrainingArguments(**_common_args(spec, Path(spec["scratch"])))
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=counter,
                      callbacks=[_clock_callback(clock)])
    rss_start = current_rss_mb()
    trainer.train()
    return _finish(trainer, clock, counter, rss_start)


def run_trl_sft(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL ``SFTTrainer`` on the PEFT model; pre-tokenized ``input_ids``/``labels``; optional BFD packing.

    TRL's own defaults (bf16, gradient checkpointing) are set explicitly per arm: the
    benchmark compares against its fastest setting on this machine, and says which it was.
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    work = Path(spec["work"])
    model, tok = load_peft(work, spec["rung"])
    data = Dataset.from_list(ordered(sft_examples(work, spec["rung"]), epochs=2))
    clock = StepClock()
    args = SFTConfig(**_common_args(spec, Path(spec["scratch"])), max_length=512, packing=spec["packing"],
                     packing_strategy="bfd", gradient_checkpointing=spec.get("grad_ckpt", False),
                     shuffle_dataset=False, dataset_num_proc=None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                         callbacks=[_clock_callback(clock)])
    counter = _CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    rss_start = current_rss_mb()
    trainer.train()
    return _finish(trainer, clock, counter, rss_start)


def run_trl_dpo(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL ``DPOTrainer`` on the PEFT model; the reference is the adapter-disabled model (TRL's default).

    TRL tokenizes text itself; the records are written so that its ids equal the
    pre-tokenized ones every other arm uses (checked: ``tokens_match``).
    """
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    work = Path(spec["work"])
    model, tok = load_peft(work, spec["rung"])
    fixture = read_json(work / f"pref-{spec['rung']}.json")
    # TRL frames text its own way: give it BOS in the prompt and the leading space in the completions;
    # it appends the EOS text itself.
    records = [{"prompt": "<s>" + r["prompt"], "chosen": " " + r["chosen"], "rejected": " " + r["rejected"]}
               for r in fixture["records"]]
    data = Dataset.from_list(ordered(records, epochs=2))
    clock = StepClock()
    args = DPOConfig(**_common_args(spec, Path(spec["scratch"])), beta=0.1, loss_type=["sigmoid"],
                     max_length=None, gradient_checkpointing=False,
                     precompute_ref_log_probs=spec.get("precompute_ref", False), dataset_num_proc=None)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                         callbacks=[_clock_callback(clock)])
    want = ordered(fixture["examples"], epochs=2)
    got = trainer.train_dataset
    n = min(len(want), spec["steps"] * spec["batch_size"])
    match = all(got[i]["prompt_ids"] == want[i]["prompt_ids"] and got[i]["chosen_ids"] == want[i]["chosen_ids"]
                and got[i]["rejected_ids"] == want[i]["rejected_ids"] for i in range(n))
    counter = _CountingCollator(trainer.data_collator, key="completion_mask")
    trainer.data_collator = counter
    rss_start = current_rss_mb()
    trainer.train()
    result = _finish(trainer, clock, counter, rss_start)
    result["tokens_match"] = match
    return result
