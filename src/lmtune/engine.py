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
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lmtune.distributed import Dist
from lmtune.errors import InputError

# Methods FSDP2 can shard: their weights are plain floating-point tensors.
FSDP_METHODS = ("full", "freeze", "lora")


def check_strategy(cfg: Any) -> None:
    """Refuse, before any model loads, what ``train.distributed.strategy=fsdp`` cannot do yet.

    Raises:
        InputError: naming the method or key and the fix.
    """
    if cfg.train.distributed.strategy != "fsdp":
        return
    if cfg.method not in FSDP_METHODS:
        raise InputError(f"train.distributed.strategy=fsdp shards plain weights ({', '.join(FSDP_METHODS)}); "
                         f"method={cfg.method} is not supported with it: use train.distributed.strategy=ddp")
    blocked = {"train.save_every": cfg.train.save_every, "train.resume": cfg.train.resume,
               "train.patience": cfg.train.patience, "data.retain": cfg.data.retain,
               "regularize.l2_init": cfg.regularize.l2_init, "train.compile": cfg.train.compile}
    for name, value in blocked.items():
        if value:
            raise InputError(f"{name} is not supported with train.distributed.strategy=fsdp yet (its weights are "
                             "sharded DTensors); remove it or use train.distributed.strategy=ddp")
    # The FSDP2 path below shards and trains, but gathering an unevenly sharded weight (an embedding
    # whose rows do not divide by the world size) fails on gloo and it is untested on nccl: refuse
    # it with the reason rather than crash mid-run.
    raise InputError("train.distributed.strategy=fsdp is not finished: FSDP2 shards and trains, but gathering an "
                     "unevenly sharded weight (e.g. an embedding whose rows do not divide by the number of ranks) "
                     "fails; use train.distributed.strategy=ddp")


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


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformer: the longest ``nn.ModuleList`` of same-typed modules."""
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best) and len({type(m) for m in module}) == 1:
            best = list(module)
    return best


class Engine:
    """Runs the loss through DDP, FSDP2 or nothing (one process) and hands out the parameters that train."""

    def __init__(self, model: nn.Module, loss: Any, regularizers: list[Any], d: Dist | None, bucket_mb: float,
                 precision: str, method: str | None = None):
        self.dist = d
        self.module = LossModule(model, loss, regularizers)
        self.wrapped: nn.Module = self.module
        if d is None:
            return
        if d.strategy == "fsdp":
            self._shard(precision, method)
            return
        from torch.nn.parallel import DistributedDataParallel

        self.wrapped = d.guard("wrapping the model in DDP", lambda: DistributedDataParallel(
            self.module, device_ids=[d.device.index] if d.device.type == "cuda" else None,
            forward_sync_buffers=False,  # buffers never train; DDP's constructor already copied rank 0's
            bucket_cap_mb=bucket_mb, find_unused_parameters=True))
        self.wrapped.register_comm_hook(None, _sum_hook)

    def _shard(self, precision: str, method: str | None) -> None:
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        if method is not None and method not in FSDP_METHODS:
            raise InputError(f"train.distributed.strategy=fsdp shards plain weights ({', '.join(FSDP_METHODS)}); "
                             f"method={method} is not supported with it: use train.distributed.strategy=ddp")
        blocks = transformer_blocks(self.module.model)
        if not blocks:
            raise InputError("train.distributed.strategy=fsdp shards per transformer block and found none in this "
                             "model; use train.distributed.strategy=ddp")
        with torch.no_grad():  # every rank must shard the same weights: rank 0's (adapters/heads start random)
            for t in [*self.module.parameters(), *self.module.buffers()]:
                dist.broadcast(t.data, 0)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if precision == "bf16" else MixedPrecisionPolicy()
        for block in blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(self.module, mp_policy=mp)
        for m in self.module.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)  # sum: each rank's loss is its share of the global mean
                m.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM

    def trainable(self) -> list[nn.Parameter]:
        """The parameters the optimizer steps (under FSDP2: this rank's shards)."""
        return [p for p in self.module.model.parameters() if p.requires_grad]

    def sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Within an accumulation window only the last backward reduces gradients."""
        if last or self.dist is None:
            return contextlib.nullcontext()
        if self.dist.strategy == "fsdp":
            return _fsdp_no_sync(self.module)
        return self.wrapped.no_sync()

    def __call__(self, batch: dict[str, Any], regularize: bool) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        return self.wrapped(batch, regularize)

    def gather_full(self) -> None:
        """FSDP2: put every full weight back into the model (collective), so saving and evaluating see it."""
        if self.dist is None or self.dist.strategy != "fsdp":
            return
        from torch.distributed.fsdp import FSDPModule

        full = {n: p.full_tensor().detach() for n, p in self.module.model.named_parameters()}
        fsdp = [m for m in self.module.modules() if isinstance(m, FSDPModule)]
        for m in fsdp:
            m.unshard()  # FSDP now holds nothing sharded: its forward hooks have nothing left to gather
            m.set_reshard_after_forward(False)
        params = dict(self.module.model.named_parameters())
        with torch.no_grad():
            for name, value in full.items():
                params[name].data = value.to(params[name].device)  # fp32 master values, not the bf16 copies


@contextlib.contextmanager
def _fsdp_no_sync(module: nn.Module):
    from torch.distributed.fsdp import FSDPModule

    mods = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for m in mods:
        m.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        for m in mods:
            m.set_requires_gradient_sync(True)
