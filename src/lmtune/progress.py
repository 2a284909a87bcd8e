"""Where the loop stands: the state a checkpoint saves, the run's clock, and the end-of-run line."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from lmtune.runlog import clock_time


@dataclass
class TrainState:
    """Everything about the loop's progress that a checkpoint saves and a resume restores."""

    step: int = 0
    tokens: int = 0  # loss-carrying tokens (the objective's ``num_tokens``)
    input_tokens: int = 0  # every non-padding token the trained model read
    elapsed_s: float = 0.0  # wall time of the loop, summed over the run's processes (a resume continues it)
    last_loss: float | None = None
    eval_loss: float | None = None
    best_eval: float | None = None  # early stopping: the best eval loss so far, and how many since
    bad_evals: int = 0
    stopped_early_at: int | None = None  # a resume of a run early stopping ended is refused (lmtune.runrecord)
    before: dict[str, float] = dataclasses.field(default_factory=dict)  # evaluators' metrics before training


class Clock:
    """Wall time of the run and of its steps; the first step (compilation, warm-up) is kept apart.

    Rates count the loss-carrying tokens and the input tokens of the steps after the first
    (the first alone when it is the only one). ``elapsed`` goes on from the checkpoint's.
    """

    def __init__(self, state: TrainState):
        self.begun, self.elapsed_before = time.perf_counter(), state.elapsed_s
        self.first_step: float | None = None
        self.steps_time, self._t0 = 0.0, 0.0
        self._from = self._after_first = (state.tokens, state.input_tokens)

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self, state: TrainState) -> None:
        took = time.perf_counter() - self._t0
        if self.first_step is None:
            self.first_step, self._after_first = took, (state.tokens, state.input_tokens)
        else:
            self.steps_time += took
            self._from = self._after_first

    def rates(self, state: TrainState) -> tuple[float | None, float | None]:
        """(loss-carrying, input) tokens per second of this process's steps."""
        seconds = self.steps_time or self.first_step or 0.0
        if seconds <= 0:
            return None, None
        return (state.tokens - self._from[0]) / seconds, (state.input_tokens - self._from[1]) / seconds

    def elapsed(self) -> float:
        """Seconds of the run so far, over every process that worked on it (downtime between them excluded)."""
        return self.elapsed_before + time.perf_counter() - self.begun


def throughput_line(summary: dict[str, Any]) -> str:
    """The end-of-run line: steps, elapsed time, input tokens per second next to loss-carrying ones."""
    line = f"trained {summary['steps']} steps in {clock_time(summary['elapsed_s'])}"
    if summary["input_tokens_per_second"] is not None:
        line += (f" | {summary['input_tokens_per_second']:,.0f} input tok/s "
                 f"({summary['tokens_per_second']:,.0f} loss-carrying tok/s)")
    return line
