"""``train.distributed.strategy=fsdp``: FSDP2 (``fully_shard``) per transformer block, then the root.

Each rank keeps 1/N of every weight, gradient and Adam moment (dim 0 split as ``torch.chunk``
splits it, so a vocabulary of 31 rows on 2 ranks is 16 + 15). Frozen bases (LoRA) are
sharded with the adapters in the same groups; QLoRA's NF4 codes are buffers, which FSDP2
keeps whole on every rank (only the full-precision parameters — adapters, embeddings, norms,
head — are sharded). ``train.precision=bf16`` becomes the policy bf16 compute, fp32 reduction,
fp32 master weights.

What a run writes is what one process writes: checkpoints hold every trainable weight and every
optimizer moment gathered to full size (``gather_trainable``, ``gather_optimizer``; rank 0
writes them), and a resume scatters them back (``load_trainable``, ``load_optimizer``), so a
checkpoint does not remember how many ranks sharded it. At the end ``unwrap`` gathers every
weight and turns the model back into a plain module on every rank, so saving, summaries and
the Python API see an ordinary model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from lmtune.errors import InputError

METHODS = ("full", "freeze", "lora", "qlora")  # their trainable weights are plain floating-point tensors
OBJECTIVES = ("lm", "sft", "dpo", "kto", "classify", "reward")  # each proven equal to one process (tests/test_fsdp.py)
_WHY_NOT = {"ppo": "its rollouts generate with the model outside the sharded loss",
            "grpo": "its rollouts generate with the model outside the sharded loss"}
_FIX = "use train.distributed.strategy=ddp"


def check_config(cfg: Any) -> None:
    """Refuse, before any model loads, what FSDP2 sharding cannot do in lmtune.

    Raises:
        InputError: naming the key, the reason and the fix.
    """
    if cfg.method not in METHODS:
        raise InputError(f"method={cfg.method} is not supported with train.distributed.strategy=fsdp (FSDP2 shards "
                         f"the weights of method {', '.join(METHODS)}; the soft prompt is spliced into the "
                         f"embeddings outside the sharded blocks): {_FIX}")
    if cfg.objective is not None and cfg.objective not in OBJECTIVES:
        why = _WHY_NOT.get(cfg.objective, "not tested with it")
        raise InputError(f"objective={cfg.objective} is not supported with train.distributed.strategy=fsdp ({why}; "
                         f"fsdp trains objective {', '.join(OBJECTIVES)}): {_FIX}")
    blocked = {
        "train.compile": (cfg.train.compile, "compiling a body whose weights FSDP2 swaps in and out is untested"),
        "train.patience": (cfg.train.patience, "early stopping keeps a copy of the best (sharded) weights"),
        "data.retain": (cfg.data.retain, "the retain loss runs the model outside the sharded loss"),
        "regularize.l2_init": (cfg.regularize.l2_init, "the penalty compares sharded weights with full ones"),
        "dpo.precompute_ref": (cfg.dpo.precompute_ref, "it runs the policy outside the sharded loss"),
    }
    if cfg.objective == "classify":  # its per-task accuracy evaluators call the model outside the sharded loss
        blocked["data.eval"] = (cfg.data.eval, "eval accuracy runs the model outside the sharded loss")
    for name, (value, why) in blocked.items():
        if value:
            raise InputError(f"{name} is not supported with train.distributed.strategy=fsdp ({why}); remove it or "
                             f"{_FIX}")


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformer: the longest ``nn.ModuleList`` of same-typed modules."""
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best) and len({type(m) for m in module}) == 1:
            best = list(module)
    return best


def shard(root: nn.Module, model: nn.Module, precision: str) -> None:
    """``fully_shard`` every transformer block of ``model``, then ``root`` (the loss module around it).

    Raises:
        InputError: the model has no repeated blocks to shard.
    """
    blocks = transformer_blocks(model)
    if not blocks:
        raise InputError(f"train.distributed.strategy=fsdp shards per transformer block and found none in this "
                         f"model; {_FIX}")
    with torch.no_grad():  # every rank must shard the same weights: rank 0's (adapters and heads start random)
        for t in [*root.parameters(), *root.buffers()]:
            dist.broadcast(t.data, 0)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision == "bf16" else MixedPrecisionPolicy()
    for block in blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(root, mp_policy=mp)
    for m in _fsdp_modules(root):
        m.set_gradient_divide_factor(1.0)  # sum: each rank's loss is already its share of the global mean
        m.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM


def _fsdp_modules(root: nn.Module) -> list[FSDPModule]:
    return [m for m in root.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def no_sync(root: nn.Module) -> Iterator[None]:
    """Within an accumulation window: keep gradients local (the window's last backward reduces them)."""
    mods = _fsdp_modules(root)
    for m in mods:
        m.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        for m in mods:
            m.set_requires_gradient_sync(True)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a DTensor: every rank must call it, in the same order)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def gather_trainable(model: nn.Module, main: bool) -> dict[str, torch.Tensor]:
    """Every trainable weight at full size, on CPU, on rank 0 (``main``); an empty dict elsewhere."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = _full(p.detach())
            if main:
                out[name] = full.cpu()
    return out


@torch.no_grad()
def gather_optimizer(optimizer: torch.optim.Optimizer, main: bool) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every moment at full size (rank 0), as one process would save it."""
    sd = optimizer.state_dict()
    state = {}
    for idx in sorted(sd["state"]):
        state[idx] = {k: (_full(v).cpu() if torch.is_tensor(v) else v) for k, v in sorted(sd["state"][idx].items())}
    return {"state": state if main else {}, "param_groups": sd["param_groups"]}


def _like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``full`` split the way ``param`` is sharded (every rank holds ``full``: no communication)."""
    if not isinstance(param, DTensor):
        return full.to(param.device)
    return distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements,
                             src_data_rank=None)


@torch.no_grad()
def load_trainable(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy full-size ``weights`` (a checkpoint's, already checked to fit) into this rank's shards."""
    params = dict(model.named_parameters())
    for name, value in weights.items():
        params[name].copy_(_like(value, params[name]))


def load_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full-size optimizer state dict (a checkpoint's) into an optimizer over sharded parameters."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    by_id = dict(zip([i for g in state["param_groups"] for i in g["params"]], params))
    sharded = {idx: {k: (_like(v, by_id[idx]) if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in s.items()}
               for idx, s in state["state"].items()}
    optimizer.load_state_dict({"state": sharded, "param_groups": state["param_groups"]})


@torch.no_grad()
def unwrap(root: nn.Module) -> None:
    """Gather every weight onto every rank and make ``root`` a plain module again (collective).

    FSDP2 offers no inverse of ``fully_shard``; this removes what it added: its forward and
    state-dict hooks and the ``FSDP<Class>`` classes, and puts full-size fp32 parameters (the
    master values, not bf16 copies) where the sharded ones were, tied weights staying tied.
    Afterwards the model saves, evaluates and counts like one process's.
    """
    named = list(root.named_parameters(remove_duplicate=False))
    full: dict[int, nn.Parameter] = {}
    for _, p in named:
        if id(p) not in full:
            full[id(p)] = nn.Parameter(_full(p.detach()).clone(), requires_grad=p.requires_grad)
    for m in _fsdp_modules(root):
        state = m._get_fsdp_state()
        state._pre_forward_hook_handle.remove()
        state._post_forward_hook_handle.remove()
        for group in state._fsdp_param_groups:
            for handles in (group._module_to_pre_save_state_dict_hook_handle,
                            group._module_to_pre_load_state_dict_hook_handle):
                for h in handles.values():
                    h.remove()
                handles.clear()
        m.__class__ = next(c for c in type(m).__mro__[1:] if not issubclass(c, FSDPModule))
    for name, p in named:
        owner, _, leaf = name.rpartition(".")
        root.get_submodule(owner)._parameters[leaf] = full[id(p)]
