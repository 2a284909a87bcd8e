"""Splice a DPO-only run of ``run_bench.py`` into ``RESULTS.md`` / ``RESULTS.json``.

    PYTHONPATH=src python benchmarks/run_bench.py --models 50m --arms lmtune-dpo,trl-dpo,lmtune-dpo-bf16,trl-dpo-bf16 \\
        --out /tmp/dpo.md --label "..."
    python benchmarks/merge_dpo.py /tmp/dpo.json [--into benchmarks/RESULTS.md]

The full ladder takes hours on a shared 2-core CPU; the DPO rows alone take minutes. Each
``## DPO step, <rung>`` section of the target is replaced by the new run's table, headed by that
run's own command, commit, CPU flags, settings and conditions (its rates are not comparable with
the other sections' runs; its ratios are side by side within it). The raw run is kept in the
target JSON under ``dpo_rerun`` (one entry per rung). The SFT rows and the rest stay as they were.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from report import summarise, table  # noqa: E402


def _ratio_lines(rows: dict[tuple[str, str], dict[str, Any]], rung: str) -> list[str]:
    """Peak and speed of lmtune vs TRL at each precision the run has (goal: ≤ 0.6× peak, ≥ 1.5× speed)."""
    out = []
    for suffix, precision in (("", "fp32"), ("-bf16", "bf16")):
        ours, theirs = rows.get((rung, f"lmtune-dpo{suffix}")), rows.get((rung, f"trl-dpo{suffix}"))
        if not (ours and theirs and ours["ok"] and theirs["ok"]):
            continue
        peak = ours["peak_rss"] / theirs["peak_rss"]
        speed = ours["tps"] / theirs["tps"] if ours["tps"] and theirs["tps"] else None
        cpu = ours["tpcpu"] / theirs["tpcpu"] if ours["tpcpu"] and theirs["tpcpu"] else None
        out.append(f"- {precision}: peak RSS {ours['peak_rss']:.0f} / {theirs['peak_rss']:.0f} MB = **{peak:.2f}×** "
                   f"(goal ≤ 0.6×: {'met' if peak <= 0.6 else 'NOT met'}); speed (wall) "
                   f"{'–' if speed is None else f'{speed:.2f}×'}, per CPU-second "
                   f"{'–' if cpu is None else f'**{cpu:.2f}×**'} (goal ≥ 1.5×)")
    return out


def section(run: dict[str, Any], rung: str) -> list[str]:
    """The ``## DPO step, <rung>`` section for ``run``, with the run's own provenance."""
    rows = summarise(run)
    m, s, v = run["machine"], run["settings"], run["versions"]
    flags = ", ".join(f"{k}={m[k]}" for k in ("avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16"))
    return [f"## DPO step, {rung}", "",
            f"Regenerated on its own (`benchmarks/merge_dpo.py`): lmtune {v.get('lmtune')}; "
            f"{m['cpu']}, {m['cores']} cores, {flags}; load average at the end "
            f"{', '.join(f'{x:.1f}' for x in m['load_avg'])}"
            + (f"; conditions: {run['label']}" if run.get("label") else "") + ".", "",
            "```", run["command"], "```", "",
            f"{s['steps']} steps per arm, the first {s['warmup']} excluded, windows of {s['window']}, "
            f"{s['repeats']} repeat(s), {s['threads']} threads, batch {s['dpo_batch_size']} pairs. "
            "Under contention wall-clock rates mostly measure the other jobs; tokens per CPU-second is the "
            "steadier speed figure. loss tokens = completion tokens of chosen + rejected.", "",
            *_ratio_lines(rows, rung), "", *table(run, rows, rung, dpo=True), ""]


def merge(run: dict[str, Any], md: str) -> str:
    """``md`` with each of ``run``'s rungs' DPO section replaced (or appended when it has none)."""
    for rung in run["settings"]["models"]:
        new = "\n".join(section(run, rung))
        pattern = re.compile(rf"^## DPO step, {re.escape(rung)}\n.*?(?=^## |\Z)", re.S | re.M)
        found = pattern.search(md)
        md = md[:found.start()] + new + "\n" + md[found.end():] if found else md.rstrip() + "\n\n" + new
    return md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("raw", help="the DPO-only run's JSON (run_bench.py writes it next to --out)")
    ap.add_argument("--into", default=str(HERE / "RESULTS.md"), help="the report to update (its .json too)")
    a = ap.parse_args(argv)
    run = json.loads(Path(a.raw).read_text())
    target = Path(a.into)
    target.write_text(merge(run, target.read_text(encoding="utf-8")), encoding="utf-8")
    raw = target.with_suffix(".json")
    if raw.exists():
        full = json.loads(raw.read_text())
        kept = full.setdefault("dpo_rerun", {})
        kept.update({rung: run for rung in run["settings"]["models"]})
        raw.write_text(json.dumps(full, indent=1))
    print(f"merged the DPO rows of {', '.join(run['settings']['models'])} into {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
