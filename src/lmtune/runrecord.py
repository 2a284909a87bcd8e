"""``run.json``: what a run was (its resolved configuration and a hash of each data file), checked on resume.

A checkpoint holds the weights, the optimizer state and the data position, but not what they
mean. Resumed with another data file, the position would be applied to other data; with another
batch size, learning rate, seed or optimizer setting, the run would silently continue as a
different run (Adam's hyper-parameters even come back from the checkpoint). So the first run
records itself, and a resume compares:

- a change in ``SAFE_KEYS`` (more steps, how often to log or save) is allowed, logged, and the
  record updated;
- any other change, or a data file whose content changed, is refused, each one listed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from lmtune.errors import InputError
from lmtune.models.metadata import read_json_object
from lmtune.runlog import write_json_atomic

RECORD_FILE = "run.json"
# Keys that say how long to run or how often to report: changing them continues the same run.
SAFE_KEYS = frozenset({"train.steps", "train.epochs", "train.resume", "train.save_every", "train.keep_checkpoints",
                       "train.log_every", "output_dir"})
# Keys whose value is a file (or a list of files) whose *content* the run depends on.
FILE_KEYS = ("data.train", "data.eval", "data.retain", "regularize.replay_data")


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Iterable) and not isinstance(value, Mapping):
        return [v for v in value if isinstance(v, str)]
    return []


def fingerprints(cfg: Mapping[str, Any]) -> dict[str, str]:
    """``{file: sha256}`` for every file the configuration names in ``FILE_KEYS``."""
    out = {}
    for key in FILE_KEYS:
        for name in _files(cfg.get(key)):
            if Path(name).is_file():
                out[name] = file_sha256(Path(name))
    return out


def make_record(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The record of a run: its resolved configuration (JSON values) and its data files' hashes."""
    config = json.loads(json.dumps(dict(cfg), default=str))  # tuples -> lists, paths -> strings
    # The global batch is train.batch_size × ranks: the number of ranks is part of the run.
    config["torchrun.world_size"] = int(os.environ.get("WORLD_SIZE", "1"))
    return {"config": config, "data_sha256": fingerprints(cfg)}


def _changes(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """``(unsafe, safe)`` differences between two records, each a readable line."""
    unsafe, safe = [], []
    before, after = old.get("config", {}), new["config"]
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key):
            line = f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
            (safe if key in SAFE_KEYS else unsafe).append(line)
    hashes_before, hashes_after = old.get("data_sha256", {}), new["data_sha256"]
    for name in sorted(set(hashes_before) | set(hashes_after)):
        if name in hashes_before and name in hashes_after and hashes_before[name] != hashes_after[name]:
            unsafe.append(f"{name}: its content changed (sha256 {hashes_before[name][:12]}… -> "
                          f"{hashes_after[name][:12]}…)")
    return unsafe, safe


def check_resume(output_dir: Path, cfg: Mapping[str, Any], say: Callable[[str], None]) -> dict[str, Any] | None:
    """Compare a resumed run with ``output_dir/run.json``; refuse changes that break exactness.

    Returns:
        The record to write now (the old one with safe changes applied), or ``None`` when
        there is nothing to write yet (no record: a fresh run writes it with its first step).

    Raises:
        InputError: ``run.json`` is unreadable, the run stopped early (it is finished), or a
            change other than those in ``SAFE_KEYS`` — each change listed.
    """
    summary = Path(output_dir) / "summary.json"
    if summary.is_file():
        stopped = read_json_object(summary).get("stopped_early_at")
        if stopped:
            raise InputError(f"the run in {output_dir} is finished: early stopping ended it at step {stopped} and its "
                             "saved model holds the best weights; resuming would continue from the last checkpoint "
                             "without them. Start a new run (a new output_dir) to train further")
    path = Path(output_dir) / RECORD_FILE
    if not path.is_file():
        return None
    old = read_json_object(path, "; delete it to resume without the check")
    new = make_record(cfg)
    unsafe, safe = _changes(old, new)
    if unsafe:
        raise InputError(f"train.resume=true, but this configuration differs from the run in {output_dir} ({path}) "
                         f"in ways that would not continue the same run: {'; '.join(unsafe)}. Resume with the "
                         "original settings and data, or start a new run in a new output_dir")
    for line in safe:
        say(f"resuming with a changed setting that keeps the run exact: {line}")
    return new


def record_run(output_dir: Path, cfg: Mapping[str, Any], log: Any) -> None:
    """Check a resume against ``run.json`` (see :func:`check_resume`), and have ``log`` write the record.

    A fresh run's record is written with its first logged step, so a run that fails before it
    leaves its folder empty; a resumed run's record (with the safe changes) is written at once.
    """
    if cfg.get("train.resume"):
        record = check_resume(output_dir, cfg, log.say)
        if record is not None:
            if log.active:
                write_json_atomic(Path(output_dir) / RECORD_FILE, record)
            return
    log.write_with_first_step(RECORD_FILE, make_record(cfg))
