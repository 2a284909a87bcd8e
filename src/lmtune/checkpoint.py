"""Checkpoints that survive being killed at any moment, and that never unpickle anything.

A checkpoint is a folder ``checkpoints/step-000120/`` with:

- ``state.safetensors`` — trainable weights (``model.<name>``), optimizer tensors
  (``optim.<param index>.<name>``) and the torch RNG state;
- ``state.json`` — the step, the data position, the Python/NumPy RNG states, the
  optimizer's non-tensor state, and whatever the loop keeps (best eval loss, ...);
- ``manifest.json`` — SHA-256 of the two files above, written last.

It is written into a temporary folder, each file fsynced, then renamed into place, so a
reader sees either a whole checkpoint or none. A checkpoint whose manifest is missing or
whose checksums fail is skipped with a warning and the previous good one is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def save_checkpoint(root: Path, step: int, weights: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    loop_state: dict[str, Any], keep: int) -> Path:
    """Atomically write the checkpoint for ``step`` and keep only the newest ``keep``."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{PREFIX}{step:06d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        opt_tensors, opt_plain = _split_optimizer(optimizer.state_dict())
        rng_tensors, rng_meta = rng_state()
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in weights.items()}
        tensors.update(opt_tensors)
        tensors.update(rng_tensors)
        save_file(tensors, tmp / "state.safetensors")
        with (tmp / "state.safetensors").open("rb+") as f:
            os.fsync(f.fileno())
        meta = {"step": step, "optimizer": opt_plain, "rng": rng_meta, "loop": loop_state}
        _fsync_write(tmp / "state.json", json.dumps(meta).encode())
        manifest = {name: _sha256(tmp / name) for name in ("state.safetensors", "state.json")}
        _fsync_write(tmp / "manifest.json", json.dumps({"step": step, "sha256": manifest}).encode())
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under ``root``, oldest first (temporary folders excluded)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def verify(folder: Path) -> str | None:
    """Why ``folder`` is not a usable checkpoint, or ``None`` if it is whole."""
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return "no manifest (the write did not finish)"
    try:
        sums = json.loads(manifest.read_text())["sha256"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
        return "unreadable manifest"
    for name, digest in sums.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if _sha256(path) != digest:
            return f"{name} fails its checksum"
    return None


def latest_good(root: Path) -> Path | None:
    """The newest checkpoint that passes ``verify``; broken ones are skipped with a warning."""
    for folder in reversed(list_checkpoints(root)):
        problem = verify(folder)
        if problem is None:
            return folder
        warnings.warn(f"skipping checkpoint {folder}: {problem}; using the previous one", stacklevel=2)
    return None


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Read a verified checkpoint.

    Returns:
        ``(weights, optimizer_state_dict, meta)``; ``meta`` has ``step``, ``loop`` and RNG
        states, restored with ``restore_rng(tensors, meta)``.
    """
    tensors = load_file(folder / "state.safetensors")
    meta = json.loads((folder / "state.json").read_text())
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    optim = _join_optimizer(tensors, meta["optimizer"])
    meta["rng_tensors"] = {k: v for k, v in tensors.items() if k.startswith("rng.")}
    return weights, optim, meta
