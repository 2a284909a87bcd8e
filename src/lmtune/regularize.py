"""Catastrophic forgetting: measure it (``data.retain``) and guard against it (L2-to-init, replay).

- ``data.retain``: held-out text from the pre-training distribution. Its token-weighted loss is
  evaluated before training, at every eval and at the end; ``summary.json`` gets
  ``retain_loss_before``, ``retain_loss_after`` and ``retain_loss_change``. A rising retain
  loss is forgetting.
- ``regularize.l2_init``: the penalty λ·Σ‖θ − θ₀‖² over the trainable parameters, θ₀ their
  values before training. It pulls the weights back toward what the model knew.
- ``regularize.replay_data`` + ``regularize.replay_ratio``: pre-training examples added to
  every batch so that they make up ``replay_ratio`` of it; the model keeps practising the old
  distribution while it learns the new one.

Other guards need no code here: ``freeze.layers``, a lower ``train.lr``, ``method=lora`` and
early stopping (``train.patience``) each limit how far the weights move.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lmtune.config import RunConfig, TrainConfig
from lmtune.data.batching import epoch_order
from lmtune.data.examples import text_examples
from lmtune.data.readers import read_records
from lmtune.distributed import Dist, shard
from lmtune.errors import InputError
from lmtune.objectives.lm import perplexity
from lmtune.objectives.task import ExampleBatches, RunContext, Task

# Objectives whose examples are {"input_ids", "labels"} dicts that plain text examples can join.
REPLAY_OBJECTIVES = ("lm", "sft")
RETAIN_BATCH = 16


def l2_init(model: torch.nn.Module, lam: float) -> Callable[[torch.nn.Module], torch.Tensor]:
    """The regularizer λ·Σ‖θ − θ₀‖², θ₀ = the trainable parameters as they are now.

    Args:
        model: the model about to train; only parameters with ``requires_grad`` are held
            (a frozen weight cannot move, so it needs no anchor).
        lam: λ, the strength of the pull toward the initial weights.

    Returns:
        ``penalty(model) -> scalar tensor``, for ``Task.regularizers``; its gradient on θ is
        2λ(θ − θ₀).
    """
    anchors = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def penalty(m: torch.nn.Module) -> torch.Tensor:
        total = None
        for name, p in m.named_parameters():
            if name not in anchors:
                continue
            if anchors[name].device != p.device:  # the loop moves the model after the task is built
                anchors[name] = anchors[name].to(p.device)
            term = (p.float() - anchors[name].float()).pow(2).sum()
            total = term if total is None else total + term
        if total is None:
            raise InputError("regularize.l2_init: the model has no trainable parameters to anchor")
        return lam * total

    return penalty


@dataclass
class Replay:
    """A batch source wrapped so that replay examples make up ``ratio`` of each micro-batch.

    A batch of B task examples gets about B·ratio/(1 − ratio) replay examples, so every task
    example is still seen each epoch. Fractions carry over between micro-batches (error
    diffusion), so the long-run share is exactly ``ratio`` even when B·ratio is not whole.
    Which replay examples come is fixed by the step alone, so a resumed run replays the same.
    """

    inner: ExampleBatches
    examples: list[dict[str, list[int]]]
    ratio: float
    grad_accum: int
    _step: int = -1
    _micro: int = 0

    def count(self, index: int, world: int = 1) -> int:
        """Replay examples owed after ``index`` global task micro-batches (cumulative) of ``world`` ranks."""
        per_batch = self.inner.batch_size * world * self.ratio / (1.0 - self.ratio)
        return math.floor(per_batch * index + 1e-9)

    def mix(self, batch: list[Any], step: int, ddp: Dist | None = None) -> list[Any]:
        """The task examples of micro-batch ``batch`` plus this rank's share of the replay examples owed by now.

        Under torchrun the replay examples of the global micro-batch are sharded like its task
        examples, so together the ranks add what one process would, and none twice.
        """
        if step != self._step:
            self._step, self._micro = step, 0
        index = step * self.grad_accum + self._micro  # global micro-batch number
        self._micro += 1
        world = ddp.world if ddp else 1
        start, stop = self.count(index, world), self.count(index + 1, world)
        return list(batch) + [self._replay_at(k) for k in shard(list(range(start, stop)), ddp)]

    def next(self, step: int, ddp: Dist | None) -> dict[str, Any]:
        examples = self.mix(self.inner.next_examples(step, ddp), step, ddp)
        return self.inner.collate(examples) if examples else self.inner.filler()

    def total_steps(self, train: TrainConfig, world: int) -> int:
        return self.inner.total_steps(train, world)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return self.inner.state_dict()  # which replay examples come is fixed by the step alone

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.inner.load_state_dict(tensors, meta)

    @property
    def collate(self) -> Any:
        return self.inner.collate

    def _replay_at(self, k: int) -> dict[str, list[int]]:
        """The k-th replay example of an endless sequence of shuffled passes."""
        n = len(self.examples)
        epoch, offset = divmod(k, n)
        return self.examples[epoch_order(n, self.inner.seed + 7919, epoch)[offset]]


def retain_evaluator(examples: list[dict[str, list[int]]], pad_id: int,
                     batch_size: int = RETAIN_BATCH) -> Callable[[torch.nn.Module], float]:
    """``Task.evaluators`` entry: mean next-token loss per token on the retain text.

    Whatever the objective, this is the language-model loss of the model's LM head, so
    before and after are comparable across methods.
    """
    def retain_loss(model: torch.nn.Module) -> float:
        return perplexity(model, examples, pad_id, batch_size)["loss"]

    return retain_loss


@dataclass
class Guards:
    """The forgetting keys of one run, read and checked before the model loads."""

    l2: float = 0.0
    replay: list[dict[str, list[int]]] | None = None
    replay_ratio: float = 0.0
    retain: list[dict[str, list[int]]] | None = None

    @classmethod
    def from_context(cls, ctx: RunContext) -> Guards:
        """Read and tokenize ``data.retain`` and ``regularize.replay_data`` and check the keys.

        Raises:
            InputError: an empty or unreadable file, replay_data without a ratio (or the
                reverse), or replay with an objective whose examples are not token sequences.
        """
        cfg = ctx.cfg
        guards = cls(l2=float(cfg.regularize.l2_init), replay_ratio=float(cfg.regularize.replay_ratio))
        if cfg.data.retain is not None:
            guards.retain = _text_file_examples("data.retain", cfg.data.retain, ctx.tokenizer, cfg.train.max_length)
        replay_file = cfg.regularize.replay_data
        if (replay_file is None) != (guards.replay_ratio == 0.0):
            raise InputError("regularize.replay_data and regularize.replay_ratio go together: set both "
                             "(e.g. regularize.replay_data=pretrain.txt regularize.replay_ratio=0.25) or neither")
        if replay_file is not None:
            if cfg.objective not in REPLAY_OBJECTIVES:
                raise InputError(f"regularize.replay_data mixes text into {'/'.join(REPLAY_OBJECTIVES)} batches; "
                                 f"objective {cfg.objective} does not take text examples")
            if cfg.train.packing:
                raise InputError("regularize.replay_data adds whole examples to each batch, which packed rows "
                                 "(train.packing=true) cannot take; turn packing off to use replay")
            guards.replay = _text_file_examples("regularize.replay_data", replay_file, ctx.tokenizer,
                                                cfg.train.max_length)
        return guards

    def attach(self, task: Task, cfg: RunConfig, pad_id: int) -> None:
        """Add the configured regularizer, batch transform and retain evaluator to ``task``."""
        if self.l2 > 0:
            task.regularizers.append(l2_init(task.model, self.l2))
        if self.replay is not None:  # objectives lm and sft only (checked above): their batches are examples
            task.batches = Replay(task.batches, self.replay, self.replay_ratio, cfg.train.grad_accum)
            task.summary["replay_examples"] = len(self.replay)
        if self.retain is not None:
            if getattr(task.model, "get_output_embeddings", lambda: None)() is None:
                raise InputError(f"data.retain measures the language-model loss, but objective {cfg.objective} "
                                 "trains a model without an LM head")
            task.evaluators["retain_loss"] = retain_evaluator(self.retain, pad_id)


def _text_file_examples(key: str, path: str, tokenizer: Any, max_length: int) -> list[dict[str, list[int]]]:
    try:
        records = read_records(path)
    except InputError as e:
        raise InputError(f"{key}: {e}") from None
    examples, _ = text_examples(records, tokenizer, max_length)
    if not examples:
        raise InputError(f"{key}: {path} has no usable text lines")
    return examples
