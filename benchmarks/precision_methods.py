"""fp32 vs bf16 autocast per method on this CPU: step time (wall and CPU) and peak RSS, one process per arm.

    PYTHONPATH=src python benchmarks/precision_methods.py --work /tmp/lmtune-bench-p512 [--rung 50m]

Uses ``run_bench.py``'s fixtures (build them first, e.g. with ``run_bench.py --quick --models 50m``).
Methods: full, lora, qlora (SFT), lora DPO and lora reward modelling, through ``lmtune.run.prepare`` + ``lmtune.train.train``
as ``lmtune train`` runs them; ``--steps`` steps of ``--batch`` examples cut to ``--max-length``
tokens; the first step is excluded; per arm the median step time and its own peak RSS (``VmHWM``). Arms alternate
fp32/bf16 per method so both see the same load. Prints a Markdown table with the CPU flags.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import LORA, ROOT, StepClock, machine_info, peak_rss_mb, set_thread_env  # noqa: E402

METHODS = ("full", "lora", "qlora", "dpo", "reward")
PREFERENCE = {"dpo", "reward"}  # LoRA on the preference records; the rest SFT on the instruction records


def arm(work: Path, rung: str, method: str, precision: str, steps: int, batch: int, max_length: int) -> dict:
    """One arm in this process: returns median step seconds (wall, CPU) after the first, and peak RSS."""
    import torch
    from fixtures import data_file
    from lmtune_arms import _timed_log

    from lmtune.config import load_config
    from lmtune.run import prepare
    from lmtune.train import train

    pref = method in PREFERENCE
    keys = {"model": str(work / f"model-{rung}"), "method": "lora" if pref else method,
            "objective": method if pref else "sft", "data.train": str(data_file(work, rung, "pref" if pref else "sft")),
            "output_dir": tempfile.mkdtemp() + "/o", "train.steps": steps, "train.batch_size": batch,
            "train.max_length": max_length, "train.precision": precision, "train.log_every": 1,
            "train.eval_every": 0, "train.save_every": 0, "train.lr": 1e-4, "train.seed": 0}
    if method != "full":
        keys.update({"lora.r": LORA["r"], "lora.alpha": float(LORA["alpha"]), "lora.target_modules": LORA["targets"]})
    cfg = load_config(None, keys)
    clock = StepClock()
    prev = {"tokens": 0}

    def tokens_of(record: dict) -> int:
        n, prev["tokens"] = record["tokens"] - prev["tokens"], record["tokens"]
        return n

    log = _timed_log(Path(keys["output_dir"]), clock, tokens_of)
    task, ctx = prepare(cfg, log)
    torch.manual_seed(0)
    train(task, ctx.cfg.train, ctx.output_dir, device=torch.device("cpu"), log=log)
    later = clock.steps[1:]
    return {"wall_s": statistics.median(s["seconds"] for s in later),
            "cpu_s": statistics.median(s["cpu_seconds"] for s in later),
            "peak_rss_mb": peak_rss_mb(),
            "final_loss": clock.steps[-1]["loss"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="run_bench.py's fixture folder")
    ap.add_argument("--rung", default="50m")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--arm", default=None, help=argparse.SUPPRESS)  # internal: run one arm, print JSON
    a = ap.parse_args()
    if a.arm:
        method, precision = a.arm.split(":")
        print(json.dumps(arm(Path(a.work), a.rung, method, precision, a.steps, a.batch, a.max_length)))
        return 0
    m = machine_info()
    flags = ", ".join(f"{k}={m[k]}" for k in ("avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16"))
    print(f"{m['cpu']}, {m['cores']} cores, {flags}; command: PYTHONPATH=src python benchmarks/precision_methods.py "
          + " ".join(sys.argv[1:]), flush=True)
    print("| method | precision | step s (wall) | step CPU-s | bf16 / fp32 CPU-s | peak RSS MB | bf16 / fp32 peak |")
    print("|---|---|---|---|---|---|---|")
    env = {**os.environ, **set_thread_env(m["cores"]), "PYTHONPATH": str(ROOT / "src")}
    for method in a.methods.split(","):
        got = {}
        for precision in ("fp32", "bf16"):
            out = subprocess.run([sys.executable, __file__, "--work", a.work, "--rung", a.rung, "--steps", str(a.steps),
                                  "--batch", str(a.batch), "--max-length", str(a.max_length),
                                  "--arm", f"{method}:{precision}"], capture_output=True, text=True, env=env)
            if out.returncode != 0:
                print(f"| {method} | {precision} | FAILED: {out.stderr.strip().splitlines()[-1][:150]} |||||")
                continue
            r = got[precision] = json.loads(out.stdout.strip().splitlines()[-1])
            base = got.get("fp32") if precision == "bf16" else None
            cpu = f"{r['cpu_s'] / base['cpu_s']:.2f}×" if base else ""
            peak = f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}×" if base else ""
            print(f"| {method} | {precision} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {cpu} | {r['peak_rss_mb']:.0f} "
                  f"| {peak} |", flush=True)
    print(f"load average at the end: {', '.join(f'{x:.1f}' for x in machine_info()['load_avg'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
