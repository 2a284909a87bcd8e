"""Run one benchmark arm in this (fresh) process: ``python benchmarks/worker.py SPEC.json``.

Writes ``spec["result"]``: per-step records, peak RSS of this process, setup time, and the
error (last lines of the traceback) if the arm failed, so that failed rows stay in the table.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ARMS = {
    "plain": ("peers", "run_plain"),
    "hf_trainer": ("peers", "run_hf_trainer"),
    "trl_sft": ("peers", "run_trl_sft"),
    "trl_dpo": ("peers", "run_trl_dpo"),
    "lmtune_sft": ("lmtune_arms", "run_lmtune_sft"),
    "lmtune_dpo": ("lmtune_arms", "run_lmtune_dpo"),
    "lmtune_full": ("lmtune_arms", "run_lmtune_full"),
    "matmul_peak": ("probes", "run_matmul_peak"),
    "ce_memory": ("probes", "run_ce_memory"),
}


def main(spec_path: str) -> int:
    t_start = time.perf_counter()
    spec = json.loads(Path(spec_path).read_text())
    from common import ROOT, peak_rss_mb, quick_mm_peak, set_thread_env

    set_thread_env(spec["threads"])
    sys.path.insert(0, str(ROOT / "src"))  # this checkout's lmtune, not an installed one
    import torch

    torch.set_num_threads(spec["threads"])
    module, fn = ARMS[spec["kind"]]
    result: dict = {"name": spec["name"]}
    training = spec["kind"] not in ("matmul_peak", "ce_memory")
    try:
        peaks = [quick_mm_peak(spec["precision"])] if training else []
        result.update(getattr(__import__(module), fn)(spec))
        result["ok"] = True
        if training:
            result["mm_peak"] = max(peaks + [quick_mm_peak(spec["precision"])])
    except BaseException as e:  # noqa: BLE001 - every failure becomes a row, never a crash of the run
        result["ok"] = False
        result["error"] = f"{type(e).__name__}: {e}"[:400]
        result["traceback"] = traceback.format_exc()[-3000:]
    result["peak_rss_mb"] = peak_rss_mb()
    if torch.cuda.is_available():
        result["cuda_peak_mb"] = result.get("cuda_peak_mb", torch.cuda.max_memory_allocated() / 2**20)
    result["process_seconds"] = time.perf_counter() - t_start
    Path(spec["result"]).write_text(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
