"""What ``lmtune.allocator.return_large_frees()`` would cost and save for full and LoRA runs.

Each arm is a fresh process running ``lmtune.run.run_training`` (one thread) with glibc's default
malloc thresholds or with them fixed at 128 KiB (the setting ``method=qlora`` runs get); arms are
interleaved and repeated, the order flipped every repeat, because the machine is shared. Reports
step time, peak (``VmHWM``) and the resident set after the run (the heap kept after training).
Why it matters: ``lmtune.allocator.FREEING_METHODS`` lists the methods that get the setting, and
``lmtune.footprint`` predicts the heap kept for the others.

Run (prints JSON lines, then a markdown table):

    PYTHONPATH=src python benchmarks/allocator_cost.py [--steps 6] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory_predicted as mp  # noqa: E402  (the same random Llamas and data)

CASES = (("12m", "full", 8, 128), ("12m", "lora", 8, 128), ("27m", "lora", 1, 1024))  # size, method, batch, tokens


def arm(spec: dict) -> dict:
    """One arm in this process: fix the thresholds or keep glibc's defaults, train, read VmRSS."""
    from lmtune import allocator

    if spec["free"]:
        assert allocator.return_large_frees()
    else:
        allocator.return_large_frees = lambda *a: False  # glibc's defaults whatever the method
    result = mp.run_arm(spec)
    status = Path("/proc/self/status").read_text()
    result["end_rss_mb"] = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--arm")
    args = parser.parse_args()
    if args.arm:
        print(json.dumps(arm(json.loads(args.arm))))
        return
    tmp = Path(tempfile.mkdtemp())
    for size in {c[0] for c in CASES}:
        mp.build_base(tmp / size, size, 2048)
    env = {**os.environ, "OMP_NUM_THREADS": mp.THREADS, "MKL_NUM_THREADS": mp.THREADS,
           "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    rows = ["| repeat | model | method | tokens/step | step (s) default / fixed | time ratio "
            "| peak (MB) default / fixed | RSS after (MB) default / fixed |",
            "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for rep in range(args.repeats):
        for size, method, batch, tokens in CASES:
            got = {}
            for free in (False, True) if rep % 2 == 0 else (True, False):
                spec = {"base": str(tmp / size), "out": str(tmp / f"{size}-{method}-{free}-{rep}"),
                        "data": str(mp.long_text(tmp, tokens)), "free": free,
                        "overrides": {"method": method, "train.steps": args.steps, "train.batch_size": batch,
                                      "train.max_length": tokens}}
                proc = subprocess.run([sys.executable, __file__, "--arm", json.dumps(spec)], env=env,
                                      capture_output=True, text=True, check=True)
                got[free] = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
                print(json.dumps({"repeat": rep, "size": size, "method": method, "free": free, **got[free]}),
                      flush=True)
            a, b = got[False], got[True]
            rows.append(f"| {rep} | {size} | {method} | {batch * tokens} | {a['step_s']:.2f} / {b['step_s']:.2f} | "
                        f"{b['step_s'] / a['step_s']:.2f} | {a['peak_rss_mb']:.0f} / {b['peak_rss_mb']:.0f} | "
                        f"{a['end_rss_mb']:.0f} / {b['end_rss_mb']:.0f} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
