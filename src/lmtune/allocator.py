"""Make glibc's malloc give freed memory back to the OS, for runs whose point is a small resident set.

glibc keeps freed heap memory mapped for reuse, and its mmap threshold is *dynamic*: once a large
block (an activation, a gradient, a dequantized row block) has been freed, blocks up to that size
come from the heap from then on, and the heap never shrinks below its highest live chunk. A QLoRA
run allocates and frees such blocks in every forward and backward (and many more while streaming
the weights into NF4): without this module SmolLM2-135M's QLoRA run held 969 MB steady and peaked
at 1,930 MB, 635 MB above LoRA's peak; with it, 702 MB and 856 MB (benchmarks/QLORA.md).

:func:`return_large_frees` fixes the thresholds instead (``mallopt``): every allocation of
:data:`LARGE` bytes or more is its own ``mmap`` and goes back to the OS when freed, and the heap's
free top is trimmed beyond :data:`LARGE`. The cost is fresh pages (faults) for each large
allocation; on the contended benchmark machine its effect on step time was lost in the noise
(0.5–3.5× across runs). ``malloc_trim`` after every step instead kept more (906 MB steady). It is what setting
``MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072`` in the environment does, applied
by lmtune at the start of a ``method=qlora`` run so users need not know. The setting is
process-wide and stays for the process (glibc cannot be asked for its old thresholds); it changes
where memory comes from, never a result. On other C libraries (musl, macOS, Windows) it is a no-op.

:func:`trim` (``malloc_trim(0)``) returns what is free right now, once: QLoRA's loader calls it
after quantizing (the distances to the 16 levels are large temporaries; without it a 61M model's
process went on holding +150 MB).
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

# Methods whose runs call return_large_frees (run.py). Not every method: on the contended 2-core
# benchmark machine the fresh pages cost full and LoRA runs 1.6-2.7x their step time (one thread,
# 12M-27M Llamas, interleaved arms), so those keep glibc's defaults and lmtune.footprint counts the
# heap that keeps (its "heap" part of the predicted peak).
FREEING_METHODS = frozenset({"qlora"})
LARGE = 128 * 1024  # bytes: glibc's default initial mmap threshold, fixed instead of growing
M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3


@functools.cache
def _glibc() -> Any:
    """The running process's glibc, or None where the C library is another."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it; musl's mallopt is a stub)
    except (OSError, AttributeError):
        return None
    return libc


def return_large_frees(threshold: int = LARGE) -> bool:
    """Fix glibc's mmap and trim thresholds at ``threshold`` bytes; returns whether it applied (glibc)."""
    libc = _glibc()
    if libc is None:
        return False
    # mallopt returns 1 on success; both must take, or the heap still keeps large frees.
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold)) & bool(libc.mallopt(M_TRIM_THRESHOLD, threshold))


def trim() -> bool:
    """Hand the heap's free pages back to the OS now (``malloc_trim(0)``); returns whether it ran (glibc)."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
