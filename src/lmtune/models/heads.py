"""Classification heads on a shared body: pooling, one linear head per task, save, load, predict.

::

    tokens ─► body (encoder or causal LM) ─► hidden (B, T, H) ─► pool ─► (B, H) ─┬─► head[task 0] ─► logits (B, C0)
                                                                                 └─► head[task 1] ─► logits (B, C1)

``classify.pool``: ``cls`` reads the first token ([CLS]; through the model's pretrained pooler
when it has one, as BERT does), ``mean`` averages the real tokens, ``last`` reads the last real
token — the only one a causal LM lets see the whole text. Defaults: ``cls`` for encoders,
``last`` for causal LMs.

The body is ``transformers``' own ``...ForSequenceClassification`` model, and the first task's
head *is* that model's ``classifier`` / ``score`` layer. So with the default pooling and one
task, the saved folder is exactly what ``AutoModelForSequenceClassification`` loads and runs,
and a LoRA adapter with the head as a module to save is exactly what PEFT loads. More tasks and
other poolings add lmtune's own heads, kept in ``classify_heads.safetensors``; the label names
of every task live in ``lmtune.json`` under ``classify``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmtune.data.batching import last_token_index
from lmtune.data.classification import check_known, collate, encode_input, label_key, record_text
from lmtune.data.examples import BuildStats
from lmtune.data.readers import Record
from lmtune.errors import InputError
from lmtune.methods.adapter_files import save_heads_in_adapter
from lmtune.methods.adapters import load_adapter
from lmtune.models.encoders import is_encoder, load_for_classification, read_config
from lmtune.models.loading import (
    META_FILE,
    check_tokenizer,
    context_length,
    load_tokenizer,
    read_meta,
    resolve_model_dir,
)

HEADS_FILE = "classify_heads.safetensors"
POOLS = ("cls", "mean", "last")


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """Pool hidden states over the sequence.

    Args:
        hidden: (B, T, H) last hidden states.
        attention_mask: (B, T), 1 on real tokens (padding may sit on either side).
        how: ``cls`` (first position), ``mean`` (masked mean) or ``last`` (last real token).

    Returns:
        (B, H).
    """
    if how == "cls":
        return hidden[:, 0]  # (B, H)
    mask = attention_mask.to(hidden.dtype)  # (B, T)
    if how == "mean":
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # (B, H)
    if how == "last":
        last = last_token_index(attention_mask)  # (B,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
    raise ValueError(f"unknown pooling {how!r}; use one of {', '.join(POOLS)}")


def native_pool(hf: nn.Module) -> str | None:
    """The pooling ``transformers``' own classifier of this architecture uses, if lmtune reproduces it.

    Causal LMs (``score``) read the last real token; BERT-style encoders (a linear
    ``classifier`` over the body's ``pooler``) read [CLS] through the pooler. Others (RoBERTa's
    two-layer head, DistilBERT's pre-classifier) still train with lmtune's heads, but
    ``transformers`` would run a different head on the saved folder.
    """
    if isinstance(getattr(hf, "score", None), nn.Linear):
        return "last"
    if isinstance(getattr(hf, "classifier", None), nn.Linear) and getattr(hf.base_model, "pooler", None) is not None:
        return "cls"
    return None


def pool_warning(pool: str, encoder: bool, tokenizer: Any) -> str | None:
    """Why ``pool`` is a poor choice for this model, or ``None``.

    ``cls`` needs a [CLS]-style first token that attends to the whole text: a causal LM's
    first position sees only itself, and an encoder whose tokenizer adds no [CLS] starts with
    an ordinary word.
    """
    if pool != "cls":
        return None
    if not encoder:
        return ("classify.pool=cls on a causal LM: its first token attends only to itself, so the head would see "
                "the same vector for every text. Use classify.pool=last (the default) or classify.pool=mean.")
    cls_id = getattr(tokenizer, "cls_token_id", None)
    first = tokenizer("a")["input_ids"][:1]
    if cls_id is None or first != [cls_id]:
        return ("classify.pool=cls, but this tokenizer puts no [CLS]-style token first, so the first position is an "
                "ordinary word. Use classify.pool=mean.")
    return None


def _new_head(config: Any, num_labels: int, bias: bool) -> nn.Linear:
    head = nn.Linear(config.hidden_size, num_labels, bias=bias)
    # transformers' own init for classifier layers, so every task's head starts alike.
    nn.init.normal_(head.weight, std=getattr(config, "initializer_range", 0.02))
    if bias:
        nn.init.zeros_(head.bias)
    return head


class Classifier(nn.Module):
    """A ``transformers`` sequence classifier with one linear head per task over pooled states.

    Args:
        hf: an ``...ForSequenceClassification`` model; its body is shared by every task and
            its linear head (if it has one) is the first task's head.
        tasks: task name -> class names (index i of a head's output is ``names[i]``).
        pool: ``cls``, ``mean`` or ``last``.
        encoder: a BERT-style encoder (inputs framed by its tokenizer) rather than a causal LM.
    """

    def __init__(self, hf: nn.Module, tasks: dict[str, list[str]], pool: str, encoder: bool):
        super().__init__()
        if pool not in POOLS:
            raise InputError(f"classify.pool must be one of {', '.join(POOLS)}; got {pool!r}")
        self.hf = hf
        self.pool = pool
        self.encoder = encoder
        self.tasks = dict(tasks)
        own = getattr(hf, "score", None) or getattr(hf, "classifier", None)
        own = own if isinstance(own, nn.Linear) else None
        bias = own.bias is not None if own is not None else True
        heads = []
        for i, names in enumerate(self.tasks.values()):
            reuse = i == 0 and own is not None and own.out_features == len(names)
            heads.append(own if reuse else _new_head(hf.config, len(names), bias))
        # The attribute of hf that is the first task's head: PEFT's "module to save".
        self.hf_head_name = next((n for n in ("score", "classifier") if getattr(hf, n, None) is heads[0]), None)
        self.heads = nn.ModuleList(heads)  # by index: task names may clash with nn.Module attributes
        dropout = getattr(hf, "dropout", None)
        self.dropout = dropout if isinstance(dropout, nn.Dropout) else nn.Identity()
        # True when transformers' own forward on hf computes exactly what this module does.
        self.hf_native = len(self.tasks) == 1 and heads[0] is own and native_pool(hf) == pool

    @property
    def config(self) -> Any:
        """The body's config (``freeze.layers`` reads the number of blocks from it)."""
        return self.hf.config

    @property
    def base_model(self) -> nn.Module:
        """The shared body (what ``train.compile`` compiles)."""
        return self.hf.base_model

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def train_heads(self) -> None:
        """Heads always train; parts of ``hf`` outside the body that no task uses never do."""
        for child in self.hf.children():
            if child is not self.hf.base_model:
                child.requires_grad_(False)
        self.heads.requires_grad_(True)

    def pooled(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, H) pooled states of the batch's texts."""
        kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if batch.get(k) is not None}
        out = self.base_model(**kwargs)
        pooler = getattr(out, "pooler_output", None)
        if self.pool == "cls" and pooler is not None:
            return pooler  # (B, H): BERT's pretrained tanh(dense(h_cls)), as BertForSequenceClassification
        return pool_hidden(out.last_hidden_state, batch["attention_mask"], self.pool)  # (B, H)

    def logits(self, pooled: torch.Tensor, task: int) -> torch.Tensor:
        """(N, C_task) logits of task index ``task`` from (N, H) pooled states."""
        return self.heads[task](self.dropout(pooled))

    def forward(self, batch: dict[str, Any], task: int = 0) -> torch.Tensor:
        """(B, C) logits of one task for the whole batch."""
        return self.logits(self.pooled(batch), task)

    def describe(self) -> dict[str, Any]:
        """What ``lmtune.json`` records to rebuild this classifier."""
        return {"pool": self.pool, "tasks": self.tasks, "hf_native": self.hf_native}


def heads_state(clf: Classifier) -> dict[str, torch.Tensor]:
    """Every task's head weights, keyed ``<task>.weight`` / ``<task>.bias``."""
    return {f"{name}.{k}": v.detach().contiguous() for name, head in zip(clf.task_names, clf.heads)
            for k, v in head.state_dict().items()}


def save_heads(clf: Classifier, folder: Path, extra: dict[str, Any] | None = None) -> None:
    """Write ``classify_heads.safetensors`` and add the ``classify`` record (+ ``extra``) to ``lmtune.json``."""
    from safetensors.torch import save_file


    folder.mkdir(parents=True, exist_ok=True)
    save_file(heads_state(clf), str(folder / HEADS_FILE))
    meta = read_meta(folder)
    meta["classify"] = {**meta.get("classify", {}), **clf.describe(), **(extra or {})}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def add_head_to_adapter(clf: Classifier, folder: Path) -> None:
    """Make a saved LoRA adapter folder carry the first task's head PEFT's way (``modules_to_save``).

    With that, ``PeftModel.from_pretrained(AutoModelForSequenceClassification...(base), folder)``
    runs the trained head. (Every head, the first included, is also in ``classify_heads.safetensors``.)
    """
    save_heads_in_adapter(folder, {clf.hf_head_name: clf.heads[0]} if clf.hf_head_name is not None else {})


def classify_meta(model_folder: Path, adapter_folder: Path | None) -> dict[str, Any]:
    """The ``classify`` record of a saved classifier (or of a plain transformers classifier).

    Raises:
        InputError: the folder holds neither an lmtune classifier nor a transformers one.
    """
    where = adapter_folder or model_folder
    meta = read_meta(where).get("classify")
    if meta:
        return meta
    config = read_config(model_folder)
    arch = (config.get("architectures") or [""])[0]
    if adapter_folder is None and arch.endswith("ForSequenceClassification") and config.get("id2label"):
        id2label = config["id2label"]
        names = [id2label[str(i)] for i in range(len(id2label))]
        return {"tasks": {"label": names}, "pool": None}  # pool: the architecture's own
    raise InputError(f"{where} holds no classifier: train one with objective=classify (lmtune.json has no "
                     "'classify' record and the config names no ...ForSequenceClassification)")


def load_classifier(model_folder: str | Path, adapter_folder: str | Path | None = None, tokenizer: Any = None,
                    trust_remote_code: bool = False) -> tuple[Classifier, Any, dict[str, Any]]:
    """Rebuild a saved classifier, in eval mode.

    Args:
        model_folder: what ``lmtune train`` wrote for full/freeze, or the base model of an adapter.
        adapter_folder: a LoRA output folder (adapter + heads), or ``None``.
        tokenizer: defaults to the one saved with ``model_folder`` (checked against the model).
        trust_remote_code: run code shipped in the model folder.

    Returns:
        ``(classifier, tokenizer, classify_record)``.
    """
    from safetensors.torch import load_file

    folder = resolve_model_dir(model_folder)
    adapter = Path(adapter_folder) if adapter_folder else None
    if tokenizer is None:
        tokenizer = load_tokenizer(folder, trust_remote_code)
        check_tokenizer(folder, tokenizer)
    meta = dict(classify_meta(folder, adapter))
    meta["max_length"] = min(meta.get("max_length", 512), context_length(folder) or 512)
    tasks = meta["tasks"]
    first = next(iter(tasks.values()))
    hf = load_for_classification(folder, len(first), tokenizer.pad_token_id, trust_remote_code, labels=first)
    if adapter is not None:

        hf = load_adapter(hf, adapter)
    clf = Classifier(hf, tasks, meta["pool"] or native_pool(hf) or "cls", is_encoder(folder))
    heads_file = (adapter or folder) / HEADS_FILE
    if heads_file.is_file():
        weights = load_file(str(heads_file))
        for name, head in zip(clf.task_names, clf.heads):
            head.load_state_dict({k.rsplit(".", 1)[1]: v for k, v in weights.items() if k.rsplit(".", 1)[0] == name})
    return clf.eval(), tokenizer, meta


def _pick_task(clf: Classifier, records: list[Record], task: str | None) -> int:
    if task is None and len(clf.tasks) > 1:
        seen = {r.fields.get("task") for r in records}
        if len(seen) != 1 or None in seen:
            raise InputError(f"this model has several tasks ({', '.join(clf.task_names)}); evaluate one at a time: "
                             "give every record the same 'task' field, or name the task")
        task = str(seen.pop())
    if task is None:
        return 0
    if task not in clf.tasks:
        raise InputError(f"unknown task {task!r}; this model was trained on: {', '.join(clf.task_names)}")
    return clf.task_names.index(task)


@torch.no_grad()
def class_probs(clf: Classifier, tokenizer: Any, inputs: list[tuple[str, str | None]], task: int,
                max_length: int = 512, batch_size: int = 32) -> torch.Tensor:
    """(N, C) class probabilities of ``(text, text_pair)`` inputs for task index ``task``."""

    device = next(clf.parameters()).device
    stats, out = BuildStats(), []
    for start in range(0, len(inputs), batch_size):
        examples = []
        for text, pair in inputs[start:start + batch_size]:
            ex = encode_input(tokenizer, text, pair, max_length, clf.encoder, stats)
            if ex is None:  # an empty text still gets a prediction: the model reads BOS/[CLS] alone
                ex = {"input_ids": [tokenizer.bos_token_id or tokenizer.pad_token_id]}
            examples.append({**ex, "label": 0, "task": task})
        batch = collate(examples, tokenizer.pad_token_id)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        out.append(torch.softmax(clf(batch, task).float(), dim=-1).cpu())  # (b, C)
    return torch.cat(out)  # (N, C)


def predict(model_folder: str | Path, adapter_folder: str | Path | None, records: list[Record], tokenizer: Any = None,
            task: str | None = None) -> tuple[list[int], list[int], list[list[float]], list[str]]:
    """Classify labelled records with a saved classifier (what ``lmtune eval`` scores).

    Args:
        model_folder: the full/freeze output folder, or the base model of a LoRA run.
        adapter_folder: the LoRA output folder, or ``None``.
        records: records with ``text`` (+ ``text_pair``) and ``label``.
        tokenizer: defaults to the one saved with ``model_folder`` (checked against the model).
        task: which task's head to use for a multi-task model (default: the records' ``task``).

    Returns:
        ``(y_true, y_pred, probs, label_names)``: ``y_true`` and ``y_pred`` are class indices
        into ``label_names`` (sorted class names as in training), ``probs[i][c]`` the
        probability of class ``c`` for record ``i``.

    Raises:
        InputError: labels never seen in training (each named with its first line), missing
            text or label fields, or an ambiguous task.
    """

    clf, tokenizer, meta = load_classifier(model_folder, adapter_folder, tokenizer)
    t = _pick_task(clf, records, task)
    names = clf.tasks[clf.task_names[t]]
    source = records[0].where.rsplit(" ", 2)[0] if records else "data"
    check_known(records, names, source, clf.task_names[t] if len(clf.tasks) > 1 else None)
    index = {n: i for i, n in enumerate(names)}
    y_true = [index[label_key(r.fields.get("label"), r.where)] for r in records]
    probs = class_probs(clf, tokenizer, [record_text(r) for r in records], t, meta["max_length"])
    return y_true, probs.argmax(-1).tolist(), probs.tolist(), list(names)


def classify_text(model_folder: str | Path, adapter_folder: str | Path | None, text: str,
                  text_pair: str | None = None, task: str | None = None) -> list[tuple[str, float]]:
    """Class probabilities of one text under a saved classifier, most likely first (``generate --classify``)."""
    clf, tokenizer, meta = load_classifier(model_folder, adapter_folder)
    if task is not None and task not in clf.tasks:
        raise InputError(f"unknown task {task!r}; this model was trained on: {', '.join(clf.task_names)}")
    t = clf.task_names.index(task) if task is not None else 0
    probs = class_probs(clf, tokenizer, [(text, text_pair)], t, meta["max_length"])[0]  # (C,)
    names = clf.tasks[clf.task_names[t]]
    return sorted(zip(names, probs.tolist()), key=lambda kv: -kv[1])
