"""summary.json's peak_rss_mb is the run's own peak, not the peak of the process that started it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# A parent that peaked at 300 MB starts a child; the child reports both measures of its own peak.
_PARENT = """
import subprocess, sys
big = b"x" * (300 * 2**20)  # touched: the parent's high-water mark passes 300 MB
del big
child = "import resource; from lmtune.runlog import peak_rss_mb; "
child += "print(peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
print(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM is Linux's")
def test_a_child_reports_its_own_peak_not_its_parents():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    out = subprocess.run([sys.executable, "-c", _PARENT], capture_output=True, text=True, env=env, check=True)
    ours, maxrss = (float(v) for v in out.stdout.split())
    assert maxrss > 300  # the premise: Linux's ru_maxrss carries the parent's peak across fork and exec
    assert ours < 100  # a Python that imported lmtune.runlog: tens of MB
