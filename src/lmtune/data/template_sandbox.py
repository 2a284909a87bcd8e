"""Time and size bounds for rendering an untrusted chat template.

``transformers`` renders chat templates in Jinja's immutable sandbox, which stops escapes but not
a template that runs for hours (loops nested inside loops, each range within the sandbox's
limit) or builds gigabytes (``tojson(indent=10**9)``, ``'x' * 10**10``). Here the sandbox that
``transformers`` compiles is swapped, for the duration of one render, for a copy that also:

- stops the render after ``MAX_SECONDS``: an interval timer on the main thread (it interrupts
  any Python-level loop), and a clock check on every call the template makes (any thread);
- refuses any string, list or dict over ``MAX_ITEMS`` made by a call, a filter, ``*``, ``**``
  or ``+``, checked *before* the operation where its size is known in advance;
- caps ``tojson``'s indent at ``MAX_INDENT`` and the rendered text at ``MAX_ITEMS`` characters.

Everything else (the variables, filters and globals the template sees) stays ``transformers``' own,
so the text rendered is exactly what ``tokenizer.apply_chat_template`` gives.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

MAX_SECONDS = 5.0  # a real template renders a conversation in milliseconds
MAX_ITEMS = 2_000_000  # characters of text, or items of a list/dict
MAX_INDENT = 64

_state = threading.local()


class TemplateLimit(Exception):
    """A render went over a bound; the message says which."""


def _check_clock() -> None:
    deadline = getattr(_state, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise TemplateLimit(f"it ran longer than {MAX_SECONDS:g} s (a loop too large, or nested too deep)")


def _check_size(value: Any, what: str) -> Any:
    if isinstance(value, (str, list, dict, tuple)) and len(value) > MAX_ITEMS:
        raise TemplateLimit(f"{what} made a value of {len(value):,} items (the limit is {MAX_ITEMS:,})")
    return value


def _predicted_size(op: str, left: Any, right: Any) -> int:
    """Length of ``left op right`` for sequence results, computed without building it (0: not a sequence)."""
    seq, other = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
    if not isinstance(seq, (str, list, tuple)):
        return 0
    if op == "*" and isinstance(other, int):
        return len(seq) * max(other, 0)
    if op == "+" and isinstance(other, (str, list, tuple)):
        return len(seq) + len(other)
    return 0


def _bounded_sandbox(base_env: Any) -> Any:
    """A copy of ``transformers``' sandbox (same filters, globals, extensions) with the bounds above."""
    base_cls = type(base_env)

    class BoundedSandbox(base_cls):  # type: ignore[misc, valid-type]
        intercepted_binops = frozenset({"*", "**", "+"})

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - Jinja's signature
            _check_clock()
            return _check_size(base_cls.call(__self, __context, __obj, *args, **kwargs), "a call")

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            _check_clock()
            if operator == "**" and isinstance(left, (int, float)) and isinstance(right, int) and right > 4096:
                raise TemplateLimit(f"'**' with an exponent of {right} (numbers that large make no chat text)")
            if _predicted_size(operator, left, right) > MAX_ITEMS:
                raise TemplateLimit(f"'{operator}' would make a value of {_predicted_size(operator, left, right):,} "
                                    f"items (the limit is {MAX_ITEMS:,})")
            return base_cls.call_binop(self, context, operator, left, right)

    env = base_env.overlay()
    env.__class__ = BoundedSandbox
    env.filters = dict(base_env.filters)
    tojson = base_env.filters["tojson"]

    def bounded_tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
                       sort_keys: bool = False) -> str:
        if isinstance(indent, int) and indent > MAX_INDENT or isinstance(indent, str) and len(indent) > MAX_INDENT:
            raise TemplateLimit(f"tojson with an indent of {indent if isinstance(indent, int) else len(indent)} "
                                f"(the limit is {MAX_INDENT})")
        _check_clock()
        return _check_size(tojson(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                                  sort_keys=sort_keys), "tojson")

    env.filters["tojson"] = bounded_tojson

    def bounded_concat(chunks: Any) -> str:
        out, size = [], 0
        for chunk in chunks:
            size += len(chunk)
            if size > MAX_ITEMS:
                raise TemplateLimit(f"it rendered more than {MAX_ITEMS:,} characters")
            _check_clock()
            out.append(chunk)
        return "".join(out)

    env.concat = bounded_concat
    return env


_compiled: dict[str, Any] = {}


def _compile_bounded(template: str) -> Any:
    """``transformers``' compiled template, recompiled in the bounded sandbox (cached per template)."""
    from transformers.utils import chat_template_utils

    if template not in _compiled:
        # The sandbox comes from compiling an empty template: compiling the untrusted one in the
        # unbounded sandbox would already fold constants such as 'x' * 10**10 into memory.
        base = _original_compile(chat_template_utils)("")
        _compiled[template] = _bounded_sandbox(base.environment).from_string(template)
    return _compiled[template]


def _original_compile(module: Any) -> Any:
    return getattr(module, "_lmtune_original_compile", module._compile_jinja_template)


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Interrupt Python-level loops after ``seconds``: main thread only, and only if no timer is set already."""
    usable = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    if not usable or signal.getitimer(signal.ITIMER_REAL)[0] > 0:  # someone else's alarm: leave it alone
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise TemplateLimit(f"it ran longer than {seconds:g} s (a loop too large, or nested too deep)")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def bounded_rendering() -> Iterator[None]:
    """Within this block, ``apply_chat_template`` renders in the bounded sandbox; over a bound: ``TemplateLimit``."""
    from transformers.utils import chat_template_utils as ctu

    original = _original_compile(ctu)
    ctu._lmtune_original_compile = original
    ctu._compile_jinja_template = _compile_bounded
    _state.deadline = time.monotonic() + MAX_SECONDS
    try:
        with _alarm(MAX_SECONDS):
            yield
    finally:
        _state.deadline = None
        ctu._compile_jinja_template = original
