"""Data-parallel training under ``torchrun``: each process takes a slice of every batch.

``torchrun --nproc_per_node N -m lmtune train ...`` starts N copies of the same run. Every
optimizer step, the global micro-batch (``train.batch_size × N`` examples, the same order as a
single process would see) is split across the ranks; the loss-token count is summed over all
ranks first, each rank backpropagates its share of the global mean, and the gradients are
summed with one all-reduce before clipping and the optimizer step. The result equals one
process training on the whole global batch — the same arithmetic as DDP, without wrapping the
model (lmtune's loss calls the model body and head separately, which DDP's forward hooks
would not see). Rank 0 alone logs and writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lmtune.config import DistributedConfig
from lmtune.errors import InputError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, value: int | float) -> float:
        """The sum of a number over all ranks."""
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def sync_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum gradients over ranks (each already divided by the global loss-unit count)."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])  # one collective for all gradients
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def barrier(self) -> None:
        dist.barrier()


def pick_device() -> torch.device:
    """The device of a single-process run: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def from_env(settings: DistributedConfig) -> Dist | None:
    """Join the process group when started by torchrun (``WORLD_SIZE`` > 1), else ``None``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if settings.strategy != "ddp":
        raise InputError("train.distributed.strategy=fsdp is not supported yet; use ddp (the default), which "
                         "keeps a full copy of the model on every rank")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    backend = settings.backend or ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Dist(rank=rank, world=world, device=device)


def shard(indices: list[int], d: Dist | None) -> list[int]:
    """This rank's contiguous share of a global micro-batch."""
    if d is None:
        return indices
    per = -(-len(indices) // d.world)  # ceil: the last rank may get fewer (or none)
    return indices[d.rank * per:(d.rank + 1) * per]
