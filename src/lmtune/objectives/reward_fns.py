"""Python reward functions for GRPO: ``grpo.reward_fns=[module:function, ...]``.

A reward function scores a whole generation batch at once, as TRL's GRPO reward functions do::

    def exact_answer(prompts, completions, answer, **columns) -> list[float]:
        return [1.0 if c.strip().startswith(a) else 0.0 for c, a in zip(completions, answer)]

It receives the prompt texts, the completion texts and every extra column of the prompts
file as keyword lists of the same length (a function without ``**kwargs`` gets only the
columns it names), and returns one finite number per completion. A function that raises,
returns the wrong count or a non-number stops the run with an error naming it.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lmtune.errors import InputError


def resolve_callable(spec: str, key: str) -> Callable[..., Any]:
    """The function named by ``module:function`` under config ``key``.

    Raises:
        InputError: malformed spec, module not importable, or no such callable.
    """
    if not isinstance(spec, str):
        raise InputError(f"{key}: {spec!r} must be a string module:function, e.g. mypkg.rewards:score")
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise InputError(f"{key}={spec!r} must be module:function, e.g. mypkg.rewards:score")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise InputError(f"{key}: cannot import module '{module_name}' ({e}); is it on PYTHONPATH?") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise InputError(f"{key}: module '{module_name}' has no function '{name}'")
    return fn


class BatchReward:
    """One batch reward function, called with only the keyword arguments it accepts."""

    def __init__(self, spec: str, key: str = "grpo.reward_fns"):
        self.spec, self.key, self.fn = spec, key, resolve_callable(spec, key)
        self.name = spec.rpartition(":")[2]
        try:
            params = inspect.signature(self.fn).parameters.values()
        except (TypeError, ValueError):  # a builtin or C callable: hand it everything
            params = []
        self.takes_all = not params or any(p.kind is p.VAR_KEYWORD for p in params)
        self.accepts = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

    def __call__(self, prompts: list[str], completions: list[str], columns: dict[str, list[Any]]) -> torch.Tensor:
        """(N,) float64 rewards of ``completions``; an error names the function and what it did."""
        kwargs = {"prompts": prompts, "completions": completions, **columns}
        if not self.takes_all:
            kwargs = {k: v for k, v in kwargs.items() if k in self.accepts}
        try:
            values = self.fn(**kwargs)
        except Exception as e:  # the user's code: report it as their error, with where it was called
            raise InputError(f"{self.key}: {self.spec} raised {type(e).__name__}: {e} (on {len(completions)} "
                             f"completions, the first {completions[0]!r} to prompt {prompts[0]!r}); fix the "
                             "function") from None
        if isinstance(values, torch.Tensor):
            values = values.tolist()
        if not isinstance(values, Sequence) or isinstance(values, (str, bytes)):
            raise InputError(f"{self.key}: {self.spec} returned {type(values).__name__}; it must return a list "
                             f"of {len(completions)} numbers, one per completion")
        if len(values) != len(completions):
            raise InputError(f"{self.key}: {self.spec} returned {len(values)} values for {len(completions)} "
                             "completions; it must return one number per completion")
        out = []
        for i, value in enumerate(values):
            number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
            if not math.isfinite(number):
                raise InputError(f"{self.key}: {self.spec} returned {value!r} for completion {i} "
                                 f"({completions[i]!r}); every reward must be a finite number")
            out.append(number)
        return torch.tensor(out, dtype=torch.float64)


def load_reward_fns(specs: str | list[str] | None, weights: list[float] | None,
                    extra: int = 0) -> tuple[list[BatchReward], torch.Tensor]:
    """The reward functions of ``grpo.reward_fns`` and the weight of each reward source.

    Args:
        specs: one ``module:function`` or a list of them.
        weights: ``grpo.reward_weights``, one per source (functions, then ``extra`` more such
            as a reward model); ``None``: all 1.
        extra: reward sources besides the functions.

    Returns:
        ``(functions, weights (K,))``.

    Raises:
        InputError: a spec that does not resolve, duplicate functions, or a weights list of
            the wrong length or with non-numbers.
    """
    specs = [specs] if isinstance(specs, str) else list(specs or [])
    fns = [BatchReward(s) for s in specs]
    names = [f.name for f in fns]
    if len(set(names)) != len(names):
        raise InputError(f"grpo.reward_fns names a function twice ({', '.join(names)}); its metrics would clash")
    count = len(fns) + extra
    if weights is None:
        return fns, torch.ones(count, dtype=torch.float64)
    if len(weights) != count or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
        raise InputError(f"grpo.reward_weights={weights!r} must be {count} numbers, one per reward source "
                         f"({', '.join(names + ['reward_model'] * extra)})")
    return fns, torch.tensor(weights, dtype=torch.float64)
