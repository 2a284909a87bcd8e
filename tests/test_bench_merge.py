"""benchmarks/merge_dpo.py: a DPO-only run replaces the DPO sections of RESULTS.md and nothing else."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import merge_dpo  # noqa: E402  (benchmarks/ is a script folder, not a package)

OLD = """# results

## LoRA SFT, 50m

| sft table | untouched |

## DPO step, 50m

| old dpo row | 999 |

## CLI latency

| kept |
"""


def _arm(name: str, precision: str, peak: float, seconds: float) -> dict:
    steps = [{"seconds": seconds, "cpu_seconds": seconds, "tokens": 100, "loss": 0.69} for _ in range(4)]
    return {"rung": "50m", "name": name, "kind": name.split("-")[0] + "_dpo", "repeat": 0, "ok": True,
            "settings": {"precision": precision}, "batch_size": 4, "steps": steps, "peak_rss_mb": peak}


def _run() -> dict:
    results = [_arm("lmtune-dpo", "fp32", 1000.0, 1.0), _arm("trl-dpo", "fp32", 2000.0, 2.0),
               _arm("lmtune-dpo-bf16", "bf16", 900.0, 1.0), _arm("trl-dpo-bf16", "bf16", 1000.0, 1.0)]
    return {"command": "run_bench.py --arms lmtune-dpo", "label": "contended", "flops": {}, "results": results,
            "settings": {"models": ["50m"], "steps": 4, "warmup": 1, "window": 1, "repeats": 1, "threads": 2,
                         "dpo_batch_size": 4},
            "machine": {"cpu": "Xeon", "cores": 2, "load_avg": [1.0, 1.0, 1.0], "avx512f": True, "avx512_bf16": True,
                        "avx512_vnni": True, "amx_bf16": False},
            "versions": {"lmtune": "abc1234"}}


def test_merge_replaces_only_the_dpo_section_with_its_provenance_and_ratios():
    md = merge_dpo.merge(_run(), OLD)
    assert "| sft table | untouched |" in md and "## CLI latency\n\n| kept |" in md
    assert "old dpo row" not in md and md.count("## DPO step, 50m") == 1
    dpo = md.split("## DPO step, 50m")[1].split("## CLI latency")[0]
    assert "lmtune abc1234" in dpo and "avx512_bf16=True" in dpo and "amx_bf16=False" in dpo
    assert "fp32: peak RSS 1000 / 2000 MB = **0.50×** (goal ≤ 0.6×: met)" in dpo
    assert "per CPU-second **2.00×**" in dpo
    assert "bf16: peak RSS 900 / 1000 MB = **0.90×** (goal ≤ 0.6×: NOT met)" in dpo
    assert "| lmtune-dpo-bf16 | bf16 | 4 |" in dpo and "| 900 |" in dpo


def test_merge_appends_a_rung_the_report_did_not_have():
    md = merge_dpo.merge(_run(), "# results\n\n## LoRA SFT, 8m\n\n| x |\n")
    assert md.startswith("# results\n\n## LoRA SFT, 8m\n\n| x |\n") and "## DPO step, 50m" in md
