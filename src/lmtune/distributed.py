"""This process's place in a ``torchrun`` job: joining, sharding, reducing, leaving.

``torchrun --nproc_per_node N -m lmtune train ...`` starts N copies of the same run. Every
optimizer step the global micro-batch (``train.batch_size × N`` examples, in the order one
process would see them) is split across the ranks with ``shard``; a rank whose share of a short
last batch is empty still runs a zero-weight stand-in batch, so every rank joins every
collective. The gradients themselves are reduced by PyTorch (``lmtune.engine``: DDP or FSDP2);
this module reduces the numbers the loop logs (loss, tokens, metrics) and turns a dead or hung
peer into an error that names this rank instead of a wait without end.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from lmtune.config import DistributedConfig
from lmtune.errors import InputError

T = TypeVar("T")
RANK_SEED_STRIDE = 1_000_003  # rank r draws dropout noise from seed + r·stride (rank 0: the seed)


class DistributedError(InputError):
    """A collective failed: another rank died, hung past the timeout, or the group broke (exit code 2)."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int
    world: int
    device: torch.device
    strategy: str = "ddp"
    timeout: float = 300.0
    owns_group: bool = True  # lmtune joined the process group itself, so it is the one to destroy it

    @property
    def main(self) -> bool:
        return self.rank == 0

    def guard(self, what: str, fn: Callable[[], T]) -> T:
        """Run a collective; a failure becomes a ``DistributedError`` naming this rank and the cause."""
        try:
            return fn()
        except (RuntimeError, dist.DistError) as e:  # gloo/nccl: peer closed, timed out, aborted
            raise DistributedError(
                f"rank {self.rank} of {self.world}: {what} failed ({str(e).splitlines()[0][:300]}). Another rank "
                f"died or did not answer within train.distributed.timeout={self.timeout:g}s; torchrun's failure "
                "summary names the rank that stopped first. Checkpoints already written are intact: restart all "
                "ranks with train.resume=true") from None

    def sum(self, *values: float) -> list[float]:
        """The sums of some numbers over all ranks (one collective)."""
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        self.guard("summing the step's counts", lambda: dist.all_reduce(t))
        return t.tolist()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        out: list[Any] = [None] * self.world
        self.guard("gathering values from all ranks", lambda: dist.all_gather_object(out, obj))
        return out

    def barrier(self) -> None:
        self.guard("waiting for all ranks", dist.barrier)


def pick_device() -> torch.device:
    """The device of a single-process run: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rank_seed(seed: int, d: Dist | None) -> int:
    """The global-RNG seed of this rank (its dropout): ``seed`` on rank 0, offset on the others.

    PPO/GRPO sampling does not use it: each rollout row has its own seed (``rollouts.row_seeds``).
    """
    return seed + (d.rank * RANK_SEED_STRIDE if d else 0)


def from_env(settings: DistributedConfig) -> Dist | None:
    """Join the process group when started by torchrun (``WORLD_SIZE`` > 1), else ``None``.

    Raises:
        InputError: nccl asked for without a GPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    backend = settings.backend or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise InputError("train.distributed.backend=nccl needs GPUs and none is visible; use gloo (the default "
                         "on CPU)")
    # A caller (a script running several trainings in one job) may have joined the group already:
    # then lmtune uses it, with the caller's timeout, and leaves it to the caller to destroy.
    owns = not dist.is_initialized()
    d = Dist(rank=rank, world=world, device=device, strategy=settings.strategy, timeout=settings.timeout,
             owns_group=owns)
    if owns:
        d.guard("joining the process group", lambda: dist.init_process_group(
            backend=backend, timeout=datetime.timedelta(seconds=settings.timeout),
            device_id=device if device.type == "cuda" else None))
    return d


def shutdown(d: Dist | None, wait: bool = True) -> None:
    """Leave the process group lmtune joined.

    ``wait``: every rank is leaving here (a finished or interrupted run), so they first meet in a
    barrier: a rank that destroys the group while a peer is still inside a collective (FSDP2's
    last gathers, rank 0 writing the result) makes gloo abort that peer. A rank leaving on an error
    of its own does not wait (its peers would not come); destroying the group tells them at once.
    A group the caller created before calling lmtune stays up (a script may train several times).
    """
    if d is None or not d.owns_group or not dist.is_initialized():
        return
    if wait:
        try:
            d.barrier()
        except DistributedError:  # a peer is gone already: leave anyway, the error that stopped it is reported
            pass
    dist.destroy_process_group()


def shard(indices: list[T], d: Dist | None) -> list[T]:
    """This rank's contiguous share of a global micro-batch (the last ranks may get fewer, or none)."""
    if d is None:
        return indices
    per = -(-len(indices) // d.world)  # ceil
    return indices[d.rank * per:(d.rank + 1) * per]


def reduce_metrics(parts: list[tuple[dict[str, float], float]]) -> dict[str, float]:
    """Combine ``(metrics, weight)`` parts (micro-batches, ranks) into one record.

    A ``min_``/``max_`` metric (the part's own extreme) combines by min/max; every other metric
    becomes the weighted mean, as over one big batch.
    """
    weight = sum(w for _, w in parts)
    if not weight:
        return {}
    extremes: dict[str, float] = {}
    sums: dict[str, float] = {}
    for metrics, w in parts:
        for k, v in metrics.items():
            if k.startswith(("min_", "max_")):
                pick = min if k.startswith("min_") else max
                extremes[k] = pick(extremes[k], v) if k in extremes else v
            else:
                sums[k] = sums.get(k, 0.0) + v * w
    return {**{k: v / weight for k, v in sums.items()}, **extremes}


def gather_rows(rows: dict[str, torch.Tensor], d: Dist | None, pad: dict[str, float] | None = None
                ) -> dict[str, torch.Tensor]:
    """Every rank's rows of a batch, concatenated in rank order (collective; ``rows`` may be empty).

    2-D tensors are right-padded to the widest rank's width (``pad[key]``, default 0), so the
    result is laid out as one process would lay out the whole batch. Each tensor goes back to
    the device it came from.
    """
    if d is None:
        return rows
    device = next((v.device for v in rows.values()), d.device)
    every = [r for r in d.gather({k: v.cpu() for k, v in rows.items()}) if r]
    out = {}
    for key in every[0]:
        parts = [r[key] for r in every]
        if parts[0].dim() == 2:
            width = max(p.shape[1] for p in parts)
            value = (pad or {}).get(key, 0)
            parts = [torch.nn.functional.pad(p, (0, width - p.shape[1]), value=value) for p in parts]
        out[key] = torch.cat(parts).to(device)
    return out


def check_data_size(examples: int, d: Dist | None, what: str) -> None:
    """Refuse a job with more ranks than examples: some rank would never see data.

    Raises:
        InputError: naming the data and both numbers.
    """
    if d is not None and examples < d.world:
        raise InputError(f"{what} has {examples} examples for {d.world} ranks; every rank needs at least one. "
                         f"Use fewer processes (--nproc_per_node) or more data")
