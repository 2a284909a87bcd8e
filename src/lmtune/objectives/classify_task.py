"""Objective ``classify``: sequence classification, one task or several sharing one body.

Tasks come from one file per task (``data.train: [a.jsonl, b.jsonl]``, named by
``classify.tasks`` or the file stems) or from a ``task`` field in one file. Examples of all
tasks are shuffled together, so batches mix tasks; each row's loss comes from its own task's
head and every task's eval accuracy is logged. The loss unit is an example.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmtune.data.classification import (
    TASK_FIELD,
    build_examples,
    check_classes,
    check_known,
    collate,
    label_key,
    label_names,
)
from lmtune.data.examples import BuildStats
from lmtune.data.readers import Record, read_records
from lmtune.errors import InputError
from lmtune.models.encoders import is_encoder, load_for_classification
from lmtune.models.heads import Classifier, add_head_to_adapter, pool_warning, save_heads
from lmtune.objectives.task import RunContext, Task


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy and the number of correct predictions.

    Args:
        logits: (N, C) class scores.
        labels: (N,) class indices.

    Returns:
        ``(loss_sum, n_correct)``, both 0-dim tensors.
    """
    logits = logits.float()  # float32 softmax even under bf16 autocast
    return F.cross_entropy(logits, labels, reduction="sum"), (logits.argmax(-1) == labels).sum()


def classify_loss(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed loss over the batch, each row scored by its own task's head.

    The body runs once for the whole mixed batch; only the heads split by task.
    """
    pooled = model.pooled(batch)  # (B, H)
    total = pooled.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.long, device=pooled.device)
    for t in batch["task"].unique().tolist():
        rows = batch["task"] == t  # (B,)
        loss_t, correct_t = classification_loss(model.logits(pooled[rows], t), batch["labels"][rows])
        total, correct = total + loss_t, correct + correct_t
    return total, {"accuracy": float(correct) / len(batch["labels"])}


def _task_name(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise InputError(f"{where}: field '{TASK_FIELD}' must be a non-empty task name, got {value!r}")
    return str(value).strip()


def group_by_task(records: list[Record], source: str) -> dict[str, list[Record]] | None:
    """Records grouped by their ``task`` field (first-appearance order), or ``None`` if none has one."""
    tagged = [TASK_FIELD in r.fields for r in records]
    if not any(tagged):
        return None
    if not all(tagged):
        rec = records[tagged.index(False)]
        raise InputError(f"{rec.where}: no '{TASK_FIELD}' field, but other records of {source} have one; "
                         "give every record its task (or none)")
    groups: dict[str, list[Record]] = {}
    for rec in records:
        groups.setdefault(_task_name(rec.fields[TASK_FIELD], rec.where), []).append(rec)
    return groups


def train_tasks(ctx: RunContext) -> dict[str, tuple[str, list[Record]]]:
    """Task name -> (source, training records), from a list of files or one file."""
    files, names = ctx.cfg.data.train, ctx.cfg.classify.tasks
    if isinstance(files, list):
        if not files or not all(isinstance(f, str) for f in files):
            raise InputError(f"data.train must be a file or a non-empty list of files, got {files!r}")
        names = [str(n) for n in names] if names else [Path(f).stem for f in files]
        if len(names) != len(files):
            raise InputError(f"classify.tasks names {len(names)} tasks but data.train lists {len(files)} files")
        if len(set(names)) != len(names):
            raise InputError(f"task names must differ, got {names}; name them with classify.tasks=[a, b, ...]")
        return {n: (f, read_records(f)) for n, f in zip(names, files)}
    records, files = ctx.records("data.train"), ctx.source("data.train")
    groups = group_by_task(records, files)
    if groups is None:
        name = str(names[0]) if names and len(names) == 1 else (Path(files).stem if ctx.cfg.data.train else "task")
        return {name: (files, records)}
    if names and set(map(str, names)) != set(groups):
        raise InputError(f"classify.tasks={names} but {files} holds the tasks {sorted(groups)}")
    order = [str(n) for n in names] if names else list(groups)
    return {n: (f"{files} (task '{n}')", groups[n]) for n in order}


def eval_tasks(ctx: RunContext, tasks: list[str]) -> dict[str, list[Record]]:
    """Task name -> eval records; a multi-task eval file names each record's task."""
    records = ctx.records("data.eval")
    if records is None:
        return {}
    source = ctx.source("data.eval")
    groups = group_by_task(records, source) if len(tasks) > 1 else None
    if groups is None:
        if len(tasks) > 1:
            raise InputError(f"{source}: with several tasks ({', '.join(tasks)}) each eval record "
                             f"needs a '{TASK_FIELD}' field naming its task")
        return {tasks[0]: records}
    unknown = sorted(set(groups) - set(tasks))
    if unknown:
        raise InputError(f"{source}: tasks {unknown} were not trained; the tasks are {', '.join(tasks)}")
    return groups


@torch.no_grad()
def accuracy_on(model: Any, examples: list[dict[str, Any]], pad_id: int, batch_size: int) -> float:
    """Share of ``examples`` (all of one task) whose predicted class is right."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad_id)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        pred = model(batch, examples[start]["task"]).argmax(-1)  # (b,)
        correct += int((pred == batch["labels"]).sum())
    model.train(was_training)
    return correct / len(examples)


def build_task(ctx: RunContext) -> Task:
    """Classification task: check labels and pooling, build examples, then load the model."""
    cfg, tok = ctx.cfg, ctx.tokenizer
    sources = train_tasks(ctx)
    multi = len(sources) > 1
    tasks = {}
    for name, (source, records) in sources.items():
        tasks[name] = label_names(label_key(r.fields.get("label"), r.where) for r in records)
        check_classes(tasks[name], source, name if multi else None)
    evals = eval_tasks(ctx, list(tasks))
    for name, records in evals.items():
        check_known(records, tasks[name], ctx.source("data.eval"), name if multi else None)

    encoder = is_encoder(ctx.model_folder)
    pool = cfg.classify.pool or ("cls" if encoder else "last")
    warning = pool_warning(pool, encoder, tok)
    if warning:
        ctx.log.say(f"warning: {warning}")
    stats, eval_stats = BuildStats(), BuildStats()
    max_len = cfg.train.max_length
    train_ex, eval_ex = [], []
    for t, (name, (_, records)) in enumerate(sources.items()):
        train_ex += build_examples(records, tok, max_len, encoder, tasks[name], t, stats)
        eval_ex += build_examples(evals.get(name, []), tok, max_len, encoder, tasks[name], t, eval_stats)
    if not train_ex:
        raise InputError(f"{ctx.source('data.train')}: no usable examples")
    if stats.truncated:
        ctx.log.say(f"truncated {stats.truncated} of {stats.examples} examples to train.max_length={max_len} tokens")

    first = next(iter(tasks.values()))
    # New heads (and LoRA's A matrices) draw from the global RNG: seed it so that a run's
    # starting point depends on train.seed alone, not on what ran before in the process.
    torch.manual_seed(cfg.train.seed)
    hf = load_for_classification(ctx.model_folder, len(first), tok.pad_token_id, cfg.trust_remote_code,
                                 labels=first)
    clf = Classifier(hf, tasks, pool, encoder)
    prepared = ctx.apply_method(hf)
    clf.train_heads()
    pad_id, bs = tok.pad_token_id, cfg.train.batch_size

    def save(out: Path) -> None:
        prepared.save(out)
        if ctx.method.adapter:  # the head trains in full: the adapter folder carries it (modules_to_save)
            add_head_to_adapter(clf, out)
        save_heads(clf, out, {"max_length": max_len})

    evaluators = {}
    for t, name in enumerate(tasks):
        examples = [e for e in eval_ex if e["task"] == t]
        if examples:
            key = f"eval_accuracy_{name}" if multi else "eval_accuracy"
            evaluators[key] = lambda model, ex=examples: accuracy_on(model, ex, pad_id, bs)
    counts = {name: {"labels": names, "train_examples": sum(e["task"] == t for e in train_ex),
                     "eval_examples": sum(e["task"] == t for e in eval_ex)}
              for t, (name, names) in enumerate(tasks.items())}
    return Task(model=clf, batches=ctx.batches(train_ex, lambda exs: collate(exs, pad_id)),
                eval_examples=eval_ex or None, loss=classify_loss, save=save, evaluators=evaluators,
                summary={"data": stats.as_dict(), "classify": {"pool": pool, "tasks": counts},
                         **prepared.summary})
