"""The forward the loss runs, as one module, so PyTorch's DDP and FSDP2 see it.

lmtune's losses call the model body and the output head separately (``final_hidden``,
``output_head``, PPO's value head), so ``model.forward`` is not what runs and wrapping the
model itself in ``DistributedDataParallel`` would reduce nothing (DDP prepares its reducer in
*its* forward) and FSDP2 would leave the root's weights sharded. ``LossModule`` makes the whole
loss — objective plus regularizers — the ``forward`` of one module; that module is what gets
wrapped:

- ``ddp``: ``DistributedDataParallel(LossModule)``. Gradients are bucketed and all-reduced
  while backward still runs (``train.distributed.bucket_mb``); ``find_unused_parameters``
  because an objective may leave a trainable weight out of a step's graph. The comm hook
  *sums* instead of averaging: each rank's loss is already its share of the global mean.
- ``fsdp``: FSDP2 ``fully_shard`` on every transformer block, then on ``LossModule`` as the
  root (embeddings, final norm, head). Each rank keeps 1/N of every weight, gradient and
  Adam moment; frozen bases (LoRA) are sharded too, adapters train. ``train.precision=bf16``
  becomes the mixed-precision policy (bf16 compute, fp32 gradient reduction and master weights).

``to_device`` and ``autocast`` are how a batch reaches that forward, in training steps and in evaluation alike.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lmtune import fsdp
from lmtune.distributed import Dist


def check_strategy(cfg: Any) -> None:
    """Refuse, before any model loads, what ``train.distributed.strategy=fsdp`` cannot do (``lmtune.fsdp``).

    Raises:
        InputError: naming the method or key and the fix.
    """
    if cfg.train.distributed.strategy == "fsdp":
        fsdp.check_config(cfg)


class LossModule(nn.Module):
    """``forward(batch, regularize)`` = the task's loss on ``model`` (plus the regularizers when asked)."""

    def __init__(self, model: nn.Module, loss: Any, regularizers: list[Any]):
        super().__init__()
        self.model = model
        self.loss_fn, self.regularizers = loss, regularizers

    def forward(self, batch: dict[str, Any], regularize: bool) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        loss_sum, metrics = self.loss_fn(self.model, batch)
        reg = None
        if regularize and self.regularizers:
            reg = sum(r(self.model) for r in self.regularizers)
        return loss_sum, reg, metrics


def _sum_hook(state, bucket):  # noqa: ANN001, ANN202 - DDP checks the annotations, which would be strings here
    """All-reduce a bucket as a sum (DDP's own hook divides by the world size)."""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])


class Engine:
    """Runs the loss through DDP, FSDP2 or nothing (one process) and hands out the parameters that train."""

    def __init__(self, model: nn.Module, loss: Any, regularizers: list[Any], d: Dist | None, bucket_mb: float,
                 precision: str):
        self.dist = d
        self.module = LossModule(model, loss, regularizers)
        self.wrapped: nn.Module = self.module
        if d is None:
            return
        if d.strategy == "fsdp":
            fsdp.shard(self.module, model, precision)
            return
        from torch.nn.parallel import DistributedDataParallel

        self.wrapped = d.guard("wrapping the model in DDP", lambda: DistributedDataParallel(
            self.module, device_ids=[d.device.index] if d.device.type == "cuda" else None,
            forward_sync_buffers=False,  # buffers never train; DDP's constructor already copied rank 0's
            bucket_cap_mb=bucket_mb, find_unused_parameters=True))
        self.wrapped.register_comm_hook(None, _sum_hook)

    def trainable(self) -> list[nn.Parameter]:
        """The parameters the optimizer steps (under FSDP2: this rank's shards)."""
        return [p for p in self.module.model.parameters() if p.requires_grad]

    def sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Within an accumulation window only the last backward reduces gradients."""
        if last or self.dist is None:
            return contextlib.nullcontext()
        if self.dist.strategy == "fsdp":
            return fsdp.no_sync(self.module)
        return self.wrapped.no_sync()

    def __call__(self, batch: dict[str, Any], regularize: bool) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        return self.wrapped(batch, regularize)

    @property
    def sharded(self) -> bool:
        """Whether the weights are FSDP2 shards (checkpoints then gather and scatter them)."""
        return self.dist is not None and self.dist.strategy == "fsdp"

    def gather_full(self) -> None:
        """FSDP2: gather every weight and make the model plain again (collective), so saving sees it whole."""
        if self.sharded:
            fsdp.unwrap(self.module)
            self.wrapped = self.module


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast (fast on avx512_bf16 CPUs and GPUs) or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on ``device`` (counts and flags stay as they are)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
