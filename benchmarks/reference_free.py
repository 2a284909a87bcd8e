"""Reference-free preference losses (ORPO, SimPO) vs sigmoid DPO: step time and peak memory.

DPO needs the reference's log-probs every step: a frozen copy of the model for full
fine-tuning (its weights in memory, one more forward per step) or the adapter-disabled model for
LoRA (no copy, one more forward). ORPO and SimPO use none. Each arm runs lmtune's own training path
(``lmtune.run.run_training``) in a fresh subprocess, so ``ru_maxrss`` is that arm's peak alone.
Same model (the 50M Llama rung of benchmarks/common.py: 8 layers, d=512, V=32000, random weights),
the shipped preference pairs, same order, batch, steps and learning rate.

Run (writes benchmarks/REFERENCE_FREE.md and prints it; a few minutes on 2 cores)::

    PYTHONPATH=src python benchmarks/reference_free.py [--steps 3] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import build_model_folder, git_describe, machine_info, peak_rss_mb, set_thread_env, versions

HERE = Path(__file__).resolve().parent
THREADS = 1  # one thread: on a shared, oversubscribed machine OpenMP threads spin-wait on each other
ARMS = [(method, loss) for method in ("full", "lora") for loss in ("sigmoid", "orpo", "simpo")]
BATCH = 8


def run_arm(method: str, loss: str, base: Path, out: Path, steps: int) -> dict:
    """One arm, in this (fresh) process: median step time after the first, and peak RSS."""
    from lmtune.assets.corpora import data_path
    from lmtune.config import load_config
    from lmtune.run import run_training
    from lmtune.runlog import RunLog

    cfg = load_config(overrides={
        "model": str(base), "output_dir": str(out), "method": method, "objective": "dpo", "dpo.loss": loss,
        "data.train": str(data_path("preferences.jsonl")), "train.steps": steps, "train.batch_size": BATCH,
        "train.lr": 1e-4, "train.max_length": 64, "train.log_every": 1, "train.seed": 0})
    times: list[tuple[float, float]] = []
    log = RunLog(out, quiet=True, tensorboard=False)
    real_step, last = log.step, [(time.perf_counter(), time.process_time())]

    def timed(record: dict, total: int) -> None:  # wall and CPU time between consecutive step records
        now = (time.perf_counter(), time.process_time())
        times.append((now[0] - last[0][0], now[1] - last[0][1]))
        last[0] = now
        real_step(record, total)

    log.step = timed
    summary = run_training(cfg, log=log).summary
    return {"method": method, "loss": loss, "step_s": statistics.median(t[0] for t in times[1:]),
            "step_cpu_s": statistics.median(t[1] for t in times[1:]), "peak_rss_mb": peak_rss_mb(),
            "final_loss": summary["final_loss"], "reference_model": summary["dpo"]["reference_model"]}


def spawn(method: str, loss: str, base: Path, out: Path, steps: int) -> dict:
    env = {**set_thread_env(THREADS), "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, __file__, "--arm", f"{method}:{loss}", "--base", str(base), "--out", str(out),
           "--steps", str(steps)]
    proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"method": method, "loss": loss, "failed": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def report(rows: list[dict], steps: int, repeats: int, command: str) -> str:
    info, vers = machine_info(), versions()
    lines = ["# Reference-free preference losses vs sigmoid DPO", "",
             f"Command: `{command}`  ",
             f"Commit: {vers['lmtune']}; torch {vers['torch']}, transformers {vers['transformers']}, "
             f"peft {vers['peft']}  ",
             f"Machine: {info['cpu']}, {info['cores']} cores, {THREADS} thread "
             f"per arm; avx512_bf16: {info['avx512_bf16']}; load average at the end {info['load_avg'][0]:.1f}  ",
             f"Model: random 50M Llama (8 layers, d=512, V=32000), fp32; shipped preference pairs; batch {BATCH} "
             f"pairs; {steps} steps per arm; arms interleaved, {repeats} repeat(s); step time = median of the "
             "steps after the first (per run), then the median over repeats; peak RSS = max over repeats. On a "
             "shared machine wall time per step swings by 2x between identical runs; the arm's CPU seconds per "
             "step (one thread) is the figure to compare.", "",
             "| method | loss | reference | CPU s / step | vs sigmoid | wall s / step | peak RSS (MB) | vs sigmoid |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for method in ("full", "lora"):
        by_loss = {}
        for loss in ("sigmoid", "orpo", "simpo"):
            done = [r for r in rows if r["method"] == method and r["loss"] == loss and "failed" not in r]
            if done:
                by_loss[loss] = (statistics.median(r["step_cpu_s"] for r in done), max(r["peak_rss_mb"] for r in done),
                                 done[0]["reference_model"], statistics.median(r["step_s"] for r in done))
        base = by_loss.get("sigmoid")
        for loss in ("sigmoid", "orpo", "simpo"):
            failed = [r for r in rows if r["method"] == method and r["loss"] == loss and "failed" in r]
            if loss not in by_loss:
                lines.append(f"| {method} | {loss} | | failed: {failed[0]['failed'] if failed else '?'} | | | | |")
                continue
            step, rss, ref, wall = by_loss[loss]
            ref_text = ("frozen copy" if method == "full" else "adapter off") if ref else "none"
            ratio_t = f"{step / base[0]:.2f}x" if base else "n/a"
            ratio_m = f"{rss / base[1]:.2f}x" if base else "n/a"
            lines.append(f"| {method} | {loss} | {ref_text} | {step:.3f} | {ratio_t} | {wall:.3f} | {rss:.0f} | "
                         f"{ratio_m} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--arm")
    parser.add_argument("--base")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.arm:  # child: one arm, the result as the last JSON line
        method, loss = args.arm.split(":")
        print(json.dumps(run_arm(method, loss, Path(args.base), Path(args.out), args.steps)))
        return
    set_thread_env(THREADS)
    from lmtune.models.loading import load_tokenizer, shipped_model_dir

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        build_model_folder("50m", load_tokenizer(shipped_model_dir()), base)
        for repeat in range(args.repeats):
            for method, loss in ARMS:
                rows.append(spawn(method, loss, base, Path(tmp) / f"{method}-{loss}-{repeat}", args.steps))
                print(json.dumps(rows[-1]), flush=True)
    command = f"PYTHONPATH=src python benchmarks/reference_free.py --steps {args.steps} --repeats {args.repeats}"
    text = report(rows, args.steps, args.repeats, command)
    if git_describe().endswith("+dirty"):
        text += "\nThe tree was dirty when this ran: rerun on a committed tree before quoting it.\n"
    (HERE / "REFERENCE_FREE.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
