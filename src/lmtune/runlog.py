"""What a run tells the user and writes down: console lines, metrics.jsonl, TensorBoard, summary.json."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB: Linux's ``VmHWM``, else ``ru_maxrss``.

    ``ru_maxrss`` is not this program's alone on Linux: a process started by ``fork``/``exec``
    inherits its parent's high-water mark as a floor (a benchmark driver that built a 1 GB model
    made every run it started report a peak of at least 1 GB). ``VmHWM`` belongs to the process's
    own address space, which ``exec`` starts afresh.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary file and rename it, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# Metrics the console line shows when a step's record has them (label, format): what a
# practitioner watches for each objective. metrics.jsonl holds them all.
CONSOLE_METRICS = {
    "rewards/accuracies": ("acc", ".2f"), "rewards/margins": ("margin", ".3f"),  # DPO family, KTO
    "score": ("score", ".3f"), "kl": ("kl", ".3f"),  # PPO (KTO: its KL reference point)
    "reward": ("reward", ".3f"),  # GRPO
    "eval_loss": ("eval_loss", ".4f"), "eval_reward_accuracy": ("eval_acc", ".2f"),
    "eval_reward_margin": ("eval_margin", ".3f"), "eval_score": ("eval_score", ".3f"),
    "eval_reward": ("eval_reward", ".3f"),
}


def clock_time(seconds: float) -> str:
    """``H:MM:SS`` (hours run past 24 rather than turning into days)."""
    s = max(0, round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def console_line(record: dict[str, Any], total: int, since: dict[str, Any] | None) -> str:
    """``step 20/200 | loss 2.3100 | lr 1.0e-04 | 1,234 tok/s | 0:00:41 | ETA 0:06:10`` plus the objective's metrics.

    Throughput (input tokens per second) and the ETA are measured from ``since``, an earlier
    record of this process (so a first step's warm-up, or a resume, does not skew them); from
    the run's start when there is none.
    """
    step = record["step"]
    parts = [f"step {step}/{total}", f"loss {record['loss']:.4f}"]
    if "lr" in record:
        parts.append(f"lr {record['lr']:.1e}")
    elapsed = record.get("elapsed_s")
    if elapsed is not None:
        base = since if since is not None and since["step"] < step else {"step": 0, "elapsed_s": 0.0, "input_tokens": 0}
        seconds = elapsed - base["elapsed_s"]
        if "input_tokens" in record and seconds > 0:
            parts.append(f"{(record['input_tokens'] - base.get('input_tokens', 0)) / seconds:,.0f} tok/s")
        parts.append(clock_time(elapsed))
        parts.append(f"ETA {clock_time(seconds / (step - base['step']) * (total - step))}")
    for key, (label, fmt) in CONSOLE_METRICS.items():
        if isinstance(record.get(key), (int, float)):
            parts.append(f"{label} {record[key]:{fmt}}")
    return " | ".join(parts)


class _NoBar:
    def update(self, n: int) -> None:
        pass


class RunLog:
    """Console + ``metrics.jsonl`` + TensorBoard for one run.

    Nothing is written to ``output_dir`` until the first step is logged, so a run that
    fails during setup leaves no file that could be taken for a result.
    """

    def __init__(self, output_dir: Path, quiet: bool = False,
                 tensorboard: bool = True, console_every: int | None = None, active: bool = True):
        self.output_dir = Path(output_dir)
        self.active = active  # False on ranks other than 0: they write nothing
        self.quiet = quiet
        self.console_every = console_every  # print fewer lines than metrics.jsonl records
        self._tensorboard = tensorboard
        self._writer: Any = None
        self._bar_active = False
        self._with_first_step: dict[str, Any] = {}  # JSON files to write once the run has a first step
        self._since: dict[str, Any] | None = None  # this process's first record: rates and ETA count from it

    def say(self, message: str) -> None:
        if not self.quiet:
            print(message, flush=True)

    @contextlib.contextmanager
    def progress(self, total: int, initial: int) -> Iterator[Any]:
        """A progress bar on interactive terminals only; logs stay clean in files and CI."""
        if self.quiet or not sys.stderr.isatty():
            yield _NoBar()
            return
        from tqdm import tqdm

        with tqdm(total=total, initial=initial, unit="step", leave=False, dynamic_ncols=True) as bar:
            self._bar_active = True
            try:
                yield bar
            finally:
                self._bar_active = False

    def write_with_first_step(self, name: str, obj: Any) -> None:
        """Write JSON file ``name`` into the output folder with the first logged step (not before)."""
        self._with_first_step[name] = obj

    def step(self, record: dict[str, Any], total: int) -> None:
        if not self.active:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for name, obj in self._with_first_step.items():
            write_json_atomic(self.output_dir / name, obj)
        self._with_first_step.clear()
        with (self.output_dir / "metrics.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        every = self.console_every
        if every is None or record["step"] in (1, total) or record["step"] % every == 0:
            self._console(console_line(record, total, self._since))
        if self._since is None:
            self._since = dict(record)
        writer = self._tb()
        if writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    writer.add_scalar(k, v, record["step"])

    def _console(self, line: str) -> None:
        if self.quiet:
            return
        if self._bar_active:
            from tqdm import tqdm

            tqdm.write(line)
        else:
            print(line, flush=True)

    def _tb(self) -> Any:
        if not self._tensorboard:
            return None
        if self._writer is None:
            try:  # a dependency, but a large one that trimmed installs leave out: say so and go on without
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                self._tensorboard = False
                self.say(f"TensorBoard logging is off ({e}); pip install tensorboard to get it")
                return None
            self._writer = SummaryWriter(log_dir=str(self.output_dir))
        return self._writer

    def truncate_after(self, step: int) -> None:
        """Drop records logged after ``step`` (a resumed run logs them again, identically)."""
        path = self.output_dir / "metrics.jsonl"
        if not self.active or not path.is_file():
            return
        kept = []
        # Read as bytes, line by line: one damaged line (a torn write, a stray non-UTF-8 byte)
        # is dropped and must not stop the run from reading the others.
        for raw in path.read_bytes().splitlines():
            try:
                line = raw.decode("utf-8")
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut short by a kill, or damaged; the resumed run rewrites it
        # Replaced, not rewritten in place: a kill mid-write must not lose the records kept.
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)

    def finish(self, summary: dict[str, Any]) -> None:
        if not self.active:
            return
        write_json_atomic(self.output_dir / "summary.json", summary)
        if self._writer is not None:
            self._writer.close()
            self._writer = None
