"""The contract between an objective and the loop: a ``Task``, and the context it is built from.

An objective turns a ``RunContext`` (the validated config, the tokenizer, the data records, the
method) into a ``Task``: the model to train, a source of micro-batches, a loss, and how to save
the result. The loop in ``lmtune.train`` knows nothing else about objectives.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from lmtune.config import RunConfig, TrainConfig
from lmtune.data.batching import epoch_order
from lmtune.data.readers import Record, read_records
from lmtune.distributed import Dist, shard
from lmtune.errors import InputError
from lmtune.methods.prepared import Prepared
from lmtune.methods.registry import Method

LossFn = Callable[[torch.nn.Module, dict[str, Any]], tuple[torch.Tensor, dict[str, float]]]


class TrainingError(InputError):
    """Training cannot go on (non-finite loss, nothing to train); exit code 2 with the reason."""


class Batches(Protocol):
    """Where the loop's micro-batches come from, and what a checkpoint must keep of it."""

    def next(self, step: int, ddp: Dist | None) -> dict[str, Any] | None:
        """This rank's share of the next micro-batch.

        Under torchrun a rank with no share of a short last batch gets a stand-in batch marked
        ``filler`` (the loop weighs its loss by 0): every rank must join every gradient reduction.
        """

    def total_steps(self, train: TrainConfig, world: int) -> int:
        """Optimizer steps of the run when ``train.steps`` is unset."""

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-able metadata) that let a resumed run continue exactly."""

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Continue from a ``state_dict``."""


class ExampleBatches:
    """Micro-batches of a fixed example list: epoch ``e`` visits them in ``epoch_order(n, seed, e)``.

    The global micro-batch is ``batch_size × world`` examples, the order one process would see;
    each rank collates its ``shard``. Its position (epoch, batch) is all a checkpoint needs.
    A rank whose share is empty collates the global batch's first example as a ``filler``.
    """

    def __init__(self, examples: list[Any], collate: Callable[[list[Any]], dict[str, Any]], batch_size: int,
                 seed: int):
        self.examples, self.collate, self.batch_size, self.seed = examples, collate, batch_size, seed
        self.epoch, self.index = 0, 0
        self._order = epoch_order(len(examples), seed, 0)

    def next_examples(self, step: int, ddp: Dist | None) -> list[Any]:
        """This rank's examples of the next global micro-batch."""
        size = self.batch_size * (ddp.world if ddp else 1)
        if self.index * size >= len(self.examples):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = epoch_order(len(self.examples), self.seed, self.epoch)
        start = self.index * size
        self.index += 1
        self._first = self.examples[self._order[start]]
        return [self.examples[i] for i in shard(self._order[start:start + size], ddp)]

    def filler(self) -> dict[str, Any]:
        """A stand-in for an empty share: the current global batch's first example, to be weighed by 0."""
        return {**self.collate([self._first]), "filler": True}

    def next(self, step: int, ddp: Dist | None) -> dict[str, Any]:
        examples = self.next_examples(step, ddp)
        return self.collate(examples) if examples else self.filler()

    def total_steps(self, train: TrainConfig, world: int) -> int:
        # Steps come from the *global* batch: each step consumes batch_size × world examples.
        per_epoch = math.ceil(len(self.examples) / (train.batch_size * world))
        return max(1, math.ceil(train.epochs * per_epoch / train.grad_accum))

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.epoch, self.index = meta["epoch"], meta["index"]
        self._order = epoch_order(len(self.examples), self.seed, self.epoch)


@dataclass
class Task:
    """What one run trains: the model, its batches, its loss, and how to save the result.

    ``loss`` returns the *sum* of the loss over the batch's loss units (tokens for LM
    objectives, pairs for DPO) and the batch names that count as ``num_loss_tokens``. Where a
    unit is not a token, the batch also says how many tokens it trained on (``num_tokens``).
    ``eval_examples`` (collated like training examples) give ``eval_loss`` and early stopping;
    ``evaluators`` are measured before training, at every eval, and after (``<name>_before``,
    ``<name>_after`` in summary.json); one may return a dict of metrics, each then named by its
    own key; ``eval_metrics`` names metrics of the loss itself (``{"rewards/accuracies":
    "eval_reward_accuracy"}``) that the eval pass averages over the eval examples, reported like
    evaluators without a second pass; ``regularizers`` add a penalty to every step's loss.
    """

    model: torch.nn.Module
    batches: Any  # a ``Batches``
    loss: LossFn
    save: Callable[[Path], None]
    eval_examples: list[Any] | None = None
    evaluators: dict[str, Callable[[torch.nn.Module], float | dict[str, float]]] = field(default_factory=dict)
    eval_metrics: dict[str, str] = field(default_factory=dict)  # the loss's metric -> its eval name
    regularizers: list[Callable[[torch.nn.Module], torch.Tensor]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)  # method/objective facts for summary.json


@dataclass
class RunContext:
    """What an objective builds its task from: config, tokenizer, records, the method, the base."""

    cfg: RunConfig
    method: Method
    model_folder: Path
    tokenizer: Any
    output_dir: Path
    log: Any  # a ``RunLog``
    base_model: torch.nn.Module | None = None  # an in-memory model given to the Python API
    show_example: bool = False  # print the first training example coloured by its loss mask (--show-example)
    _records: dict[str, list[Record]] = field(default_factory=dict)

    def records(self, key: str) -> list[Record] | None:
        """The records of the data under config key ``key`` (``None`` if unset)."""
        if key not in self._records:
            path = self.cfg.get(key)
            if path is None:
                return None
            self._records[key] = read_records(path)
        return self._records[key]

    def source(self, key: str) -> str:
        """How to name the data under ``key`` in a message: its file, or the in-memory rows."""
        return str(self.cfg.get(key) or f"{key} (in-memory rows)")

    def load_causal_lm(self) -> torch.nn.Module:
        """The base model, loaded the way the method needs it (QLoRA: straight into 4 bits)."""
        if self.base_model is not None:
            return self.base_model
        return self.method.load_base(self.model_folder, self.cfg)

    def apply_method(self, model: torch.nn.Module) -> Prepared:
        return self.method.prepare(model, self.tokenizer, self.model_folder, self.cfg)

    def batches(self, examples: list[Any], collate: Callable[[list[Any]], dict[str, Any]]) -> ExampleBatches:
        """The standard batch source over ``examples``."""
        return ExampleBatches(examples, collate, self.cfg.train.batch_size, self.cfg.train.seed)
