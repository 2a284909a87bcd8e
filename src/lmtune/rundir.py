"""A run owns its output folder: one process at a time, never the model folder itself.

Two ``lmtune train`` processes on the same ``output_dir`` would interleave their metrics and
checkpoints, each resuming from the other's state. The first takes an exclusive ``flock`` on
``output_dir/.lmtune.lock`` and holds it for the run's life; a second is refused with the first's
pid. The kernel drops the lock when the process ends, however it ends (SIGKILL included), so a
killed run never leaves a stale lock behind (the file may stay; the lock does not).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from lmtune.errors import InputError

LOCK_FILE = ".lmtune.lock"


class RunLock:
    """An exclusive lock on ``output_dir`` held until :meth:`release` (or the process ends)."""

    def __init__(self, path: Path | None, handle: IO[str] | None, created: bool = False):
        self.path = path
        self._handle = handle
        self._created = created  # the folder did not exist before the lock: remove it if still empty

    def release(self) -> None:
        """Remove the lock file, then drop the lock (in that order: see :func:`lock_output_dir`)."""
        if self._handle is None:
            return
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            if self._created and not any(self.path.parent.iterdir()):
                self.path.parent.rmdir()
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()
        self._handle = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_output_dir(output_dir: Path) -> RunLock:
    """Take the exclusive lock on ``output_dir`` (created if needed) and write this process's pid in it.

    Ranks other than 0 of a ``torchrun`` job share rank 0's lock (they write nothing there).
    The lock file (and the folder, if the lock created it and it is still empty) is removed on
    release, so a run that fails before writing anything leaves the disk as it found it.

    Raises:
        InputError: another process holds it, naming that process's pid.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        return RunLock(None, None)
    output_dir = Path(output_dir)
    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_FILE
    while True:
        # Opened without truncating: the holder's pid must stay readable until we own the lock.
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the run's life
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise InputError(f"output_dir {output_dir} is in use by another lmtune run (pid {holder}); wait for it "
                             "to finish or stop it, or choose another output_dir") from None
        # The holder may have released (and removed the file) between our open and our lock:
        # then we hold a lock on a removed file, and must lock the one now at ``path`` instead.
        try:
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return RunLock(path, handle, created)


def refuse_model_folder(output_dir: Path, model_folder: Path) -> None:
    """Refuse an ``output_dir`` that is the model folder or inside it: the run would overwrite the base model.

    Raises:
        InputError: naming both folders.
    """
    out, model = Path(output_dir).resolve(), Path(model_folder).resolve()
    if out == model or model in out.parents:
        where = "the model folder" if out == model else "inside the model folder"
        raise InputError(f"output_dir {output_dir} is {where} {model_folder}; the run would write over the base "
                         "model's files. Choose an output_dir "
                         "outside it")
