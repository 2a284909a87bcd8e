"""Checkpoints that survive being killed at any moment, and that never unpickle anything.

A checkpoint is a folder ``checkpoints/step-000120/`` with:

- ``state.safetensors`` — trainable weights (``model.<name>``), optimizer tensors
  (``optim.<param index>.<name>``) and the torch RNG state;
- ``state.json`` — the step, the data position, the Python/NumPy RNG states, the
  optimizer's non-tensor state, and whatever the loop keeps (best eval loss, ...);
- ``manifest.json`` — SHA-256 of the two files above, written last.

It is written into a temporary folder, each file fsynced, then renamed into place, so a
reader sees either a whole checkpoint or none. A checkpoint whose manifest is missing or
whose checksums fail is skipped with a warning and the previous good one is used. A write
that fails (disk full, no permission) removes its temporary folder, leaves every earlier
checkpoint as it was, and raises ``CheckpointError`` saying so.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmtune.errors import InputError

PREFIX = "step-"
FILES = ("state.safetensors", "state.json")  # what the manifest must cover, nothing else
_NAME = re.compile(rf"{PREFIX}(\d+)")
_SCRATCH = (".tmp-", ".old-")  # half-written folders and folders being replaced


class CheckpointError(InputError):
    """A checkpoint could not be written or read; the message says what is still intact."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with path.open("rb+") as f:
        os.fsync(f.fileno())


def _fsync_write(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """All RNG states: torch's as tensors, Python's and NumPy's as JSON."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, plain = {}, {"param_groups": state["param_groups"], "state": {}}
    for idx, pstate in state["state"].items():
        plain["state"][str(idx)] = {}
        for name, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain["state"][str(idx)][name] = value
    return tensors, plain


def _join_optimizer(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in plain["state"].items()}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def save_checkpoint(root: Path, step: int, weights: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer | dict[str, Any], loop_state: dict[str, Any], keep: int,
                    task_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Atomically write the checkpoint for ``step`` and keep only the newest ``keep``.

    ``optimizer`` is the optimizer or its state dict (FSDP2: gathered to full size, lmtune.fsdp).

    Raises:
        CheckpointError: the write failed (disk full, permissions); earlier checkpoints are intact.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{final.name}"
    try:
        _remove(tmp)
        tmp.mkdir()
        _write_files(tmp, step, weights, optimizer, loop_state, task_tensors or {})
        _publish(tmp, final)
    except OSError as e:
        _remove(tmp)
        good = latest_good(root, warn=lambda _: None)
        intact = f"the previous checkpoint {good} is intact" if good else "there is no earlier checkpoint"
        raise CheckpointError(f"could not write checkpoint {final}: {e}. Nothing was replaced: {intact}. "
                              "Free disk space (or fix permissions) and continue with train.resume=true") from None
    except BaseException:
        _remove(tmp)
        raise
    _prune(root, step, keep)
    return final


def _write_files(tmp: Path, step: int, weights: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | dict,
                 loop_state: dict[str, Any], task_tensors: dict[str, torch.Tensor]) -> None:
    """Tensors, then JSON state, then the manifest of both: a manifest means the rest is whole."""
    opt_tensors, opt_plain = _split_optimizer(optimizer if isinstance(optimizer, dict) else optimizer.state_dict())
    rng_tensors, rng_meta = rng_state()
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in weights.items()}
    tensors.update(opt_tensors)
    tensors.update(rng_tensors)
    tensors.update({f"task.{k}": v.detach().cpu().contiguous() for k, v in task_tensors.items()})
    save_file(tensors, tmp / FILES[0])
    _fsync_file(tmp / FILES[0])
    meta = {"step": step, "optimizer": opt_plain, "rng": rng_meta, "loop": loop_state}
    _fsync_write(tmp / FILES[1], json.dumps(meta).encode())
    manifest = {name: _sha256(tmp / name) for name in FILES}
    _fsync_write(tmp / "manifest.json", json.dumps({"step": step, "sha256": manifest}).encode())
    _fsync_dir(tmp)


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished folder into place; a same-named (broken) folder is moved aside first."""
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        _remove(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def _prune(root: Path, step: int, keep: int) -> None:
    """Drop scratch folders, checkpoints newer than ``step`` and all but the newest ``keep``.

    A checkpoint newer than the one just written can only be one that resuming skipped as
    broken; left in place it would take a ``keep`` slot from a good one.
    """
    for p in root.iterdir():
        if p.name.startswith(_SCRATCH):
            _remove(p)
    found = list_checkpoints(root)
    newer = [p for p in found if step_of(p) > step]
    older = [p for p in found if step_of(p) <= step]
    for p in newer + older[:-keep]:
        _remove(p)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def step_of(folder: Path) -> int:
    """The step a checkpoint folder is named for (``step-000120`` -> 120)."""
    return int(_NAME.fullmatch(folder.name).group(1))


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under ``root``, oldest first.

    Temporary folders, symbolic links (which could point anywhere) and other names are ignored.
    """
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=step_of)


def verify(folder: Path) -> str | None:
    """Why ``folder`` is not a usable checkpoint, or ``None`` if it is whole."""
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return "no manifest (the write did not finish)"
    try:
        sums = json.loads(manifest.read_bytes())["sha256"]
        ok = isinstance(sums, dict) and set(sums) == set(FILES) and all(isinstance(v, str) for v in sums.values())
    except (ValueError, KeyError, TypeError, RecursionError):  # JSON and Unicode errors are ValueErrors
        ok = False
    if not ok:
        return "unreadable manifest"
    for name in FILES:
        path = folder / name
        if path.is_symlink() or not path.is_file():
            return f"{name} is missing"
        if _sha256(path) != sums[name]:
            return f"{name} fails its checksum"
    return None


def latest_good(root: Path, warn: Callable[[str], None] | None = None) -> Path | None:
    """The newest checkpoint that passes ``verify``; broken ones are skipped with a warning.

    Args:
        root: the ``checkpoints/`` folder.
        warn: where the warning goes (default: ``warnings.warn``); a run passes its console.
    """
    for folder in reversed(list_checkpoints(root)):
        problem = verify(folder)
        if problem is None:
            return folder
        message = f"skipping checkpoint {folder}: {problem}; using the previous one"
        if warn is None:
            warnings.warn(message, stacklevel=2)
        else:
            warn(message)
    return None


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Read a verified checkpoint.

    Returns:
        ``(weights, optimizer_state_dict, meta)``; ``meta`` has ``step``, ``loop`` and the RNG
        states (``rng`` and ``rng_tensors``), restored with ``set_rng_state``.

    Raises:
        CheckpointError: the files parse as something other than what lmtune writes.
    """
    try:
        tensors = load_file(folder / FILES[0])
        meta = json.loads((folder / FILES[1]).read_bytes())
        weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        optim = _join_optimizer(tensors, meta["optimizer"])
        if not isinstance(meta["step"], int) or not {"state", "batches"} <= set(meta["loop"]):
            raise ValueError("state.json lacks the step or the loop state")
        meta["rng_tensors"] = {k: v for k, v in tensors.items() if k.startswith("rng.")}
        meta["task_tensors"] = {k[len("task."):]: v for k, v in tensors.items() if k.startswith("task.")}
        if "rng.torch" not in meta["rng_tensors"] or not {"python", "numpy"} <= set(meta["rng"]):
            raise ValueError("the RNG states are missing")
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise CheckpointError(f"{folder}: not a checkpoint lmtune can continue from ({e}); move it away to "
                              "resume from the one before it") from None
    return weights, optim, meta


def check_fits(folder: Path, params: dict[str, torch.Tensor], weights: dict[str, torch.Tensor],
               optimizer: torch.optim.Optimizer, optim_state: dict[str, Any]) -> None:
    """Refuse a checkpoint whose tensors do not match the trainable parameters, before any is copied.

    Args:
        folder: the checkpoint (named in the message).
        params: the model's trainable parameters by name.
        weights: the checkpoint's weights by name.
        optimizer: the freshly built optimizer over ``params``.
        optim_state: the checkpoint's optimizer state dict.

    Raises:
        CheckpointError: missing, extra or mis-shaped tensors, or optimizer state for other parameters.
    """
    missing = sorted(set(params) - set(weights))
    extra = sorted(set(weights) - set(params))
    shaped = sorted(n for n in set(params) & set(weights) if params[n].shape != weights[n].shape)
    problems = []
    if missing:
        problems.append(f"missing {_few(missing)}")
    if extra:
        problems.append(f"tensors this model does not train: {_few(extra)}")
    if shaped:
        problems.extend(f"'{n}' is {tuple(weights[n].shape)} but the model's is {tuple(params[n].shape)}"
                        for n in shaped[:3])
    if not problems:
        problems = _optimizer_problems(optimizer, optim_state)
    if problems:
        raise CheckpointError(f"{folder} does not fit this model and method: {'; '.join(problems)}. It was saved "
                              "by a run with another model, method or freeze.layers; resume with that "
                              "configuration, or start a new output_dir")


def _optimizer_problems(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> list[str]:
    try:
        saved = state["param_groups"]
        sizes = [len(g["params"]) for g in saved]
        ids = [i for g in saved for i in g["params"]]
    except (KeyError, TypeError) as e:
        return [f"unreadable optimizer state ({e})"]
    if sizes != [len(g["params"]) for g in optimizer.param_groups]:
        return [f"optimizer state for parameter groups of sizes {sizes}, the optimizer has "
                f"{[len(g['params']) for g in optimizer.param_groups]}"]
    by_id = dict(zip(ids, [p for g in optimizer.param_groups for p in g["params"]]))
    for idx, pstate in state["state"].items():
        p = by_id.get(idx)
        if p is None:
            return [f"optimizer state for unknown parameter {idx}"]
        for name, value in pstate.items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != p.shape:
                return [f"optimizer '{name}' of parameter {idx} is {tuple(value.shape)}, "
                        f"the parameter is {tuple(p.shape)}"]
    return []


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write a safetensors file through a temporary name, so a kill never leaves half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
