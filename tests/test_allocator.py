"""lmtune.allocator: with the thresholds fixed, freed large blocks leave the resident set (glibc)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmtune import allocator

# Dead heap the way a training step leaves it: one large block freed (glibc's dynamic threshold
# then rises to its size), blocks below that size come from the heap, every other one dies. The
# heap cannot give back a hole between live blocks.
_SCRIPT = """
import re, sys, torch
from lmtune import allocator
if sys.argv[1] == "fixed":
    assert allocator.return_large_frees()
def rss_mb():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
big = torch.ones(2**20)  # 4 MB: mmapped, and once freed the threshold grows past 2 MB
del big
before = rss_mb()
blocks = [torch.ones(2**19) for _ in range(40)]  # 40 x 2 MB, touched
del blocks[::2]  # 20 die; the 20 live ones around them pin the holes
print(rss_mb() - before - 20 * 2)  # resident beyond the live blocks
"""


def _retained_mb(mode: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("MALLOC_")}  # glibc's own defaults in the child
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(allocator._glibc() is None, reason="mallopt thresholds are glibc's")
def test_fixed_thresholds_give_freed_blocks_back_where_glibc_keeps_them():
    assert _retained_mb("default") > 30  # the premise: glibc's defaults keep the 40 MB of dead blocks
    assert _retained_mb("fixed") < 4


def test_outside_glibc_both_calls_are_no_ops(monkeypatch):
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert allocator.return_large_frees() is False
    assert allocator.trim() is False
