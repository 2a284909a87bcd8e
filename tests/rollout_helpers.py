"""Shared by the PPO and GRPO resume tests: a run that dies right after logging a given step."""

from __future__ import annotations

from collections.abc import Callable

import pytest


class Killed(Exception):
    """Stands in for the process being killed: raised after the step's record is written."""


def run_killed_after(step: int, run: Callable[[], object]) -> None:
    """Call ``run()`` with ``RunLog.step`` patched to die once ``step`` is logged."""
    import lmtune.runlog as runlog

    real = runlog.RunLog.step

    def step_then_die(self, record, total):
        real(self, record, total)
        if record["step"] == step:
            raise Killed

    runlog.RunLog.step = step_then_die
    try:
        with pytest.raises(Killed):
            run()
    finally:
        runlog.RunLog.step = real
