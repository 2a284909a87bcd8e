"""lmtune vs TRL / transformers+PEFT / a plain loop: LoRA SFT and DPO, side by side, one invocation.

    PYTHONPATH=src python benchmarks/run_bench.py --quick          # a few minutes, 8M model
    PYTHONPATH=src python benchmarks/run_bench.py                  # the ladder 8M / 50M / 125M

Each arm runs in a fresh subprocess (``worker.py``); arms are interleaved and repeated; every
arm reads the same fixtures (``fixtures.py``). Writes ``benchmarks/results.json`` (raw) and
``benchmarks/RESULTS.md`` (the table, via ``report.py``). Failed or killed arms stay as rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import LADDER, MAX_LEN, ROOT, machine_info, read_json, set_thread_env, versions  # noqa: E402

# name -> (kind, settings). Peers run at their fastest precision here (fp32 without native bf16)
# with gradient checkpointing off; the *-bf16 rows show the bf16 setting anyway, labelled.
SFT_ARMS: dict[str, dict[str, Any]] = {
    "plain": {"kind": "plain", "precision": "fp32"},
    "lmtune": {"kind": "lmtune_sft", "precision": "fp32"},
    "lmtune-packing": {"kind": "lmtune_sft", "precision": "fp32", "packing": True},
    "lmtune-bf16": {"kind": "lmtune_sft", "precision": "bf16"},
    "hf-trainer": {"kind": "hf_trainer", "precision": "fp32"},
    "trl": {"kind": "trl_sft", "precision": "fp32", "packing": False},
    "trl-packing": {"kind": "trl_sft", "precision": "fp32", "packing": True},
    "trl-bf16": {"kind": "trl_sft", "precision": "bf16", "packing": False},
}
OPTIONAL_ARMS: dict[str, dict[str, Any]] = {
    "lmtune-recompute-head": {"kind": "lmtune_sft", "precision": "fp32", "head": "checkpoint"},
    "lmtune-full": {"kind": "lmtune_full", "precision": "fp32"},
    "plain-full": {"kind": "plain", "precision": "fp32", "full": True},
    "lmtune-compile": {"kind": "lmtune_sft", "precision": "fp32", "compile": True},
    "lmtune-packing-compile": {"kind": "lmtune_sft", "precision": "fp32", "packing": True, "compile": True},
    "lmtune-packing-bf16": {"kind": "lmtune_sft", "precision": "bf16", "packing": True},
    "trl-defaults": {"kind": "trl_sft", "precision": "bf16", "packing": False, "grad_ckpt": True},
    "lmtune-dpo-precompute": {"kind": "lmtune_dpo", "precision": "fp32", "precompute_ref": True},
    "trl-dpo-precompute": {"kind": "trl_dpo", "precision": "fp32", "precompute_ref": True},
    "lmtune-dpo-bf16": {"kind": "lmtune_dpo", "precision": "bf16"},
    "trl-dpo-bf16": {"kind": "trl_dpo", "precision": "bf16"},
}
DPO_ARMS: dict[str, dict[str, Any]] = {
    "lmtune-dpo": {"kind": "lmtune_dpo", "precision": "fp32"},
    "trl-dpo": {"kind": "trl_dpo", "precision": "fp32"},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="8M model, few steps, one repeat (a few minutes)")
    p.add_argument("--models", default=None, help="comma list from the ladder: 8m,50m,125m")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per arm (default 20; quick 8)")
    p.add_argument("--warmup", type=int, default=None, help="steps excluded from tokens/s (default 4; quick 2)")
    p.add_argument("--window", type=int, default=None, help="steps per timing window (default 4; quick 2)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 2; quick 1)")
    p.add_argument("--batch-size", type=int, default=8, help="SFT examples per step (packed rows: same tokens)")
    p.add_argument("--dpo-batch-size", type=int, default=4, help="DPO pairs per step")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="OMP/MKL/torch threads in every arm")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="precision of every arm not named *-bf16 (fp32 without native bf16; bf16 on a GPU)")
    p.add_argument("--arms", default=None, help="comma list of arm names (default: the standard set)")
    p.add_argument("--extra", default="", help=f"comma list of optional arms: {','.join(OPTIONAL_ARMS)}")
    p.add_argument("--compile", action="store_true", help="add the lmtune torch.compile arm")
    p.add_argument("--no-dpo", action="store_true", help="skip the DPO arms")
    p.add_argument("--pairs", type=int, default=None, help="records generated (default 512; quick 128)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per arm before it is killed (row kept)")
    p.add_argument("--work", default=None, help="fixture folder (default: a temp folder named by the settings)")
    p.add_argument("--out", default=str(HERE / "RESULTS.md"), help="where the table goes")
    p.add_argument("--report-only", default=None, metavar="RAW.json", help="only re-render RAW.json into --out")
    p.add_argument("--label", default="", help="free text for the report header (e.g. 'under contention')")
    a = p.parse_args(argv)
    quick = a.quick
    a.models = (a.models or ("8m" if quick else "8m,50m,125m")).split(",")
    a.steps = a.steps or (8 if quick else 20)
    a.warmup = a.warmup if a.warmup is not None else (2 if quick else 4)
    a.window = a.window or (2 if quick else 4)
    a.repeats = a.repeats or (1 if quick else 2)
    a.pairs = a.pairs or (128 if quick else 512)
    for m in a.models:
        if m not in LADDER:
            p.error(f"--models: unknown rung {m!r}; choose from {', '.join(LADDER)}")
    return a


def plan(a: argparse.Namespace) -> dict[str, dict[str, Any]]:
    arms = dict(SFT_ARMS) if a.arms is None else {}
    if not a.no_dpo and a.arms is None:
        arms.update(DPO_ARMS)
    everything = {**SFT_ARMS, **DPO_ARMS, **OPTIONAL_ARMS}
    names = ([n for n in a.arms.split(",") if n] if a.arms else []) + [n for n in a.extra.split(",") if n]
    if a.compile:
        names.append("lmtune-compile")
    for n in names:
        if n not in everything:
            raise SystemExit(f"unknown arm {n!r}; arms: {', '.join(everything)}")
        arms[n] = everything[n]
    return arms


def run_arm(name: str, settings: dict[str, Any], rung: str, repeat: int, a: argparse.Namespace, work: Path,
            env: dict[str, str], packed_bs: int) -> dict[str, Any]:
    """One arm in a fresh subprocess; a crash, kill or timeout becomes a row with the reason."""
    kind = settings["kind"]
    if settings.get("precision") == "fp32" and not name.endswith("-bf16"):
        settings = {**settings, "precision": a.precision}
    bs = a.dpo_batch_size if kind.endswith("dpo") else (packed_bs if settings.get("packing") else a.batch_size)
    with tempfile.TemporaryDirectory(prefix=f"arm-{name}-") as scratch:
        spec = {"name": name, "rung": rung, "repeat": repeat, "work": str(work), "threads": a.threads,
                "steps": a.steps, "batch_size": bs, "scratch": str(Path(scratch) / "out"),
                "result": str(Path(scratch) / "result.json"), **settings}
        if kind == "ce_memory":
            spec["steps"] = 0
        spec_path = Path(scratch) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, str(HERE / "worker.py"), str(spec_path)], env=env,
                                  capture_output=True, text=True, timeout=a.timeout)
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-2000:]
        except subprocess.TimeoutExpired as e:
            rc, tail = "timeout", str(e.stdout or "")[-1000:]
        wall = time.perf_counter() - t0
        result = read_json(Path(spec["result"])) if Path(spec["result"]).exists() else {
            "ok": False, "error": f"worker died (exit {rc}{'; -9 = killed, likely out of memory' if rc == -9 else ''})",
            "traceback": tail}
    result.update({"name": name, "rung": rung, "repeat": repeat, "kind": kind, "settings": settings,
                   "batch_size": bs, "wall_seconds": wall})
    status = "ok" if result.get("ok") else f"FAILED: {result.get('error')}"
    print(f"  [{rung} r{repeat}] {name:24s} {wall:6.1f}s  {status}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    raw = out.with_suffix(".json")
    if a.report_only:  # re-render a finished (or cut-off) run's table
        from report import write_report

        write_report(json.loads(Path(a.report_only).read_text()), out)
        print(f"wrote {out}")
        return 0
    path = os.pathsep.join(x for x in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if x)
    env = {**os.environ, **set_thread_env(a.threads), "PYTHONPATH": path}
    work = Path(a.work or Path(tempfile.gettempdir()) / f"lmtune-bench-p{a.pairs}")
    arms = plan(a)
    command = "PYTHONPATH=src python benchmarks/run_bench.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    print(f"fixtures in {work}", flush=True)
    t0 = time.perf_counter()
    sys.path.insert(0, str(ROOT / "src"))
    from common import flops_per_loss_token
    from fixtures import build_fixtures

    fixtures = build_fixtures(work, a.models, a.pairs)
    print(f"fixtures ready in {time.perf_counter() - t0:.0f}s: {json.dumps(fixtures)}", flush=True)
    flops = {rung: flops_per_loss_token(work, rung, a.steps, a.batch_size, a.dpo_batch_size) for rung in a.models}
    run = {"command": command, "flops": flops, "label": a.label, "machine": machine_info(), "versions": versions(),
           "settings": {k: v for k, v in vars(a).items() if k not in ("out", "report_only")}, "fixtures": fixtures,
           "results": [], "cli": [], "total_seconds": 0.0}

    def record(result: dict[str, Any]) -> None:
        """Keep every arm's result on disk as it comes: a run cut short still has its rows."""
        run["results"].append(result)
        run["total_seconds"] = time.perf_counter() - t0
        raw.write_text(json.dumps(run, indent=1))

    for rung in a.models:
        mean_len = fixtures[rung]["sft_len_mean"]
        packed_bs = max(1, round(a.batch_size * mean_len / MAX_LEN))  # about the same tokens per step
        for r in range(a.repeats):
            record(run_arm("matmul-peak", {"kind": "matmul_peak", "precision": "-"}, rung, r, a, work, env, 0))
            names = list(arms)
            shift = (r * 3) % len(names)  # interleave: each repeat starts at a different arm
            for name in names[shift:] + names[:shift]:
                record(run_arm(name, arms[name], rung, r, a, work, env, packed_bs))
    for mode in ("chunked", "full"):
        record(run_arm(f"ce-{mode}", {"kind": "ce_memory", "precision": "fp32", "mode": mode, "seq_len": MAX_LEN},
                       a.models[-1], 0, a, work, env, 0))
    from probes import cli_latency

    run["cli"] = cli_latency(env)
    run["machine"] = machine_info()  # load average at the end
    run["total_seconds"] = time.perf_counter() - t0
    raw.write_text(json.dumps(run, indent=1))
    from report import write_report

    write_report(run, out)
    print(f"wrote {out} and {raw} in {time.perf_counter() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
