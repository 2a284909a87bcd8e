"""Turn one run's raw results (``results.json``) into ``RESULTS.md``: machine, settings, table, goals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common import LADDER, lora_params, median, param_count, window_rates

FP32_TOL, BF16_TOL = 1e-4, 1e-2


def _fmt(x: Any, spec: str = ".0f", none: str = "–") -> str:
    return none if x is None else format(x, spec)


def summarise(run: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (rung, arm): medians over repeats of tokens/s, RSS, first-step time; losses of repeat 0."""
    s = run["settings"]
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in run["results"]:
        row = rows.setdefault((r["rung"], r["name"]), {"runs": [], "kind": r["kind"], "settings": r["settings"],
                                                        "batch_size": r.get("batch_size")})
        row["runs"].append(r)
    for row in rows.values():
        ok = [r for r in row["runs"] if r.get("ok")]
        row["ok"] = bool(ok)
        row["errors"] = sorted({r.get("error", "?") for r in row["runs"] if not r.get("ok")})
        row["tps"] = median([median(window_rates(r["steps"], s["warmup"], s["window"])) for r in ok if r["steps"]])
        row["tpcpu"] = median([median(window_rates(r["steps"], s["warmup"], s["window"], "cpu_seconds"))
                               for r in ok if r["steps"]])
        row["peak_rss"] = median([r["peak_rss_mb"] for r in ok])
        row["rss_start"] = median([r.get("rss_at_start_mb") for r in ok])
        row["first_step"] = median([r["steps"][0]["seconds"] for r in ok if r["steps"]])
        first = sorted(ok, key=lambda r: r["repeat"])[0] if ok else None
        row["losses"] = [st["loss"] for st in first["steps"]] if first and first["steps"] else []
        tail = [x for x in row["losses"][-s["window"]:] if x is not None]
        row["final_loss"] = sum(tail) / len(tail) if tail else None
        row["tokens_match"] = first.get("tokens_match") if first else None
        row["cuda_peak"] = median([r.get("cuda_peak_mb") for r in ok]) if ok else None
        row["mm_peak"] = median([r.get("mm_peak") for r in ok])
        row["extra"] = first or {}
    return rows


def _parity(row: dict[str, Any], ref: dict[str, Any] | None) -> float | None:
    if ref is None or not row["losses"] or not ref["losses"]:
        return None
    pairs = [(a, b) for a, b in zip(row["losses"], ref["losses"]) if a is not None and b is not None]
    return max(abs(a - b) for a, b in pairs) if pairs else None


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _peaks(run: dict[str, Any]) -> dict[str, float]:
    best: dict[str, float] = {}
    for r in run["results"]:
        if r["kind"] == "matmul_peak" and r.get("ok"):
            for k, v in r["peak_flops"].items():
                best[k] = max(best.get(k, 0.0), v)
    return best


def _mfu(row: dict[str, Any], run: dict[str, Any], rung: str, peaks: dict[str, float]) -> float | None:
    flops = run["flops"].get(rung, {})
    key = "sft"
    if row["kind"].endswith("dpo"):
        key = "dpo_precomputed" if row["settings"].get("precompute_ref") else "dpo"
    # The arm's own matmul peak (measured in its process, before and after training) when there is
    # one: on a shared machine that is the speed the machine gave this arm.
    peak = row["mm_peak"] or peaks.get(row["settings"].get("precision", "fp32"))
    if row["tps"] is None or not peak or key not in flops:
        return None
    return row["tps"] * flops[key] / peak


def table(run: dict[str, Any], rows: dict[tuple[str, str], dict[str, Any]], rung: str, dpo: bool) -> list[str]:
    peaks = _peaks(run)
    base = rows.get((rung, "lmtune-dpo" if dpo else "lmtune"))
    plain = rows.get((rung, "trl-dpo" if dpo else "plain"))
    ref_name = "trl-dpo" if dpo else "plain"
    out = [f"| arm | precision | batch | loss tokens/s | × lmtune | tokens/CPU-s × lmtune | peak RSS MB "
           f"| RSS at start MB | first step s | final loss | max abs Δloss vs {ref_name} | MFU | notes |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (r, name), row in rows.items():
        if r != rung or row["kind"] in ("matmul_peak", "ce_memory") or row["kind"].endswith("dpo") != dpo:
            continue
        prec = row["settings"].get("precision", "fp32")
        notes = []
        if not row["ok"]:
            notes.append("FAILED: " + "; ".join(row["errors"])[:200])
        same_batches = not row["settings"].get("packing")
        delta = _parity(row, plain) if same_batches and name != ref_name else None
        if delta is not None:
            tol = BF16_TOL if prec == "bf16" else FP32_TOL
            notes.append(f"parity {'ok' if delta < tol else 'OUTSIDE'} (tol {tol:g})")
        if row["settings"].get("packing"):
            notes.append("packed: other batches, no per-step parity")
        if row["tokens_match"] is False:
            notes.append("TOKENS DIFFER from the fixture")
        if prec == "bf16" and not run["machine"].get("bf16_native") and "gpu" not in run["machine"]:
            notes.append("bf16 emulated (no avx512_bf16/AMX)")
        if row["settings"].get("head") == "checkpoint":
            notes.append("lever off: head recomputed in backward (checkpointed chunks)")
        if row["settings"].get("compile"):
            notes.append("first step includes torch.compile")
        if row["settings"].get("grad_ckpt"):
            notes.append("gradient checkpointing (TRL default)")
        if row["settings"].get("precompute_ref"):
            notes.append("reference log-probs precomputed before the timed window")
        if row["cuda_peak"]:
            notes.append(f"GPU peak {row['cuda_peak']:.0f} MB")
        ratio = row["tps"] / base["tps"] if base and base["tps"] and row["tps"] else None
        cpu_ratio = row["tpcpu"] / base["tpcpu"] if base and base.get("tpcpu") and row.get("tpcpu") else None
        mfu = _mfu(row, run, rung, peaks)
        out.append(f"| {name} | {prec} | {row['batch_size']} | {_fmt(row['tps'])} | {_fmt(ratio, '.2f')} "
                   f"| {_fmt(cpu_ratio, '.2f')} "
                   f"| {_fmt(row['peak_rss'])} | {_fmt(row['rss_start'])} | {_fmt(row['first_step'], '.2f')} "
                   f"| {_fmt(row['final_loss'], '.4f')} | {_fmt(delta, '.1e')} | {_fmt(mfu, '.1%')} "
                   f"| {'; '.join(notes)} |")
    return out


def goals(run: dict[str, Any], rows: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """Issue 9's goals, each with the measured number and met / not met."""
    rung = run["settings"]["models"][-1]
    peaks = _peaks(run)

    def best(prefix: str, dpo: bool = False) -> tuple[str, dict[str, Any]] | None:
        cands = [(n, row) for (r, n), row in rows.items() if r == rung and n.startswith(prefix) and row["ok"]
                 and row["tps"] and row["kind"].endswith("dpo") == dpo]
        return max(cands, key=lambda c: c[1]["tps"]) if cands else None

    gpu = "gpu" in run["machine"]
    mem, mem_name = ("cuda_peak", "peak GPU memory") if gpu else ("peak_rss", "peak RSS")
    out = [f"Measured on the largest model of this run ({rung}); ratios from this one run.", ""]
    lm, trl = best("lmtune"), best("trl")
    if lm and trl:
        speed = lm[1]["tps"] / trl[1]["tps"]
        rss = lm[1][mem] / trl[1][mem]
        loss = abs(lm[1]["final_loss"] - trl[1]["final_loss"]) / trl[1]["final_loss"] if (
            lm[1]["final_loss"] and trl[1]["final_loss"]) else None
        out += [f"- LoRA SFT speed: best lmtune (`{lm[0]}`) / best TRL (`{trl[0]}`) = **{speed:.2f}×** "
                f"(goal ≥ 1.5×: {'met' if speed >= 1.5 else 'NOT met'})",
                f"- LoRA SFT final loss: {lm[1]['final_loss']:.4f} vs {trl[1]['final_loss']:.4f}, "
                f"{_fmt(loss, '.2%')} apart (goal within 2%: {_met(loss is not None and loss <= 0.02)})",
                f"- LoRA SFT {mem_name}: {lm[1][mem]:.0f} / {trl[1][mem]:.0f} MB = **{rss:.2f}×** "
                f"(goal ≤ 0.7×: {'met' if rss <= 0.7 else 'NOT met'})"]
    ld, td = best("lmtune-dpo", True), best("trl-dpo", True)
    if ld and td:
        speed, rss = ld[1]["tps"] / td[1]["tps"], ld[1][mem] / td[1][mem]
        out += [f"- DPO step speed: `{ld[0]}` / `{td[0]}` = **{speed:.2f}×** (goal ≥ 1.5×: "
                f"{'met' if speed >= 1.5 else 'NOT met'})",
                f"- DPO {mem_name}: {ld[1][mem]:.0f} / {td[1][mem]:.0f} MB = **{rss:.2f}×** "
                f"(goal ≤ 0.6×: {'met' if rss <= 0.6 else 'NOT met'})"]
    if lm:
        mfu = _mfu(lm[1], run, rung, peaks)
        out.append(f"- MFU of `{lm[0]}`: **{_fmt(mfu, '.1%')}** of the measured "
                   f"{lm[1]['settings'].get('precision', 'fp32')} matmul peak (goal ≥ 50%: "
                   f"{'met' if mfu is not None and mfu >= 0.5 else 'NOT met'})")
    ce = {m: rows.get((rung, f"ce-{m}")) for m in ("chunked", "full")}
    if all(ce.values()) and all(r["ok"] for r in ce.values()):
        d = {m: r["extra"]["peak_rss_after_mb"] - r["extra"]["rss_before_mb"] for m, r in ce.items()}
        out.append(f"- Chunked CE: one forward+backward on a full {ce['full']['batch_size'] or ''} batch grows RSS "
                   f"by {d['chunked']:.0f} MB (chunked, loss rows only) vs {d['full']:.0f} MB (full logits)")
    slow = [c for c in run["cli"] if c["median_s"] >= 1.0]
    timings = ", ".join(f"`{c['case']}` {c['median_s']:.2f}s" for c in run["cli"])
    if run["cli"]:
        out.append(f"- CLI latency: {timings} (goal < 1 s: {_met(not slow)})")
    else:
        out.append("- CLI latency: not measured in this run (cut short)")
    return out


def write_report(run: dict[str, Any], path: Path) -> None:
    rows = summarise(run)
    m, v, s = run["machine"], run["versions"], run["settings"]
    peaks = _peaks(run)
    bf16 = ("native (avx512_bf16)" if m.get("avx512_bf16") else "native (AMX)" if m.get("amx_bf16")
            else "NOT native: no avx512_bf16, no AMX (bf16 rows are emulated and slow)")
    lines = ["# lmtune benchmark results", "",
             f"Written by `benchmarks/run_bench.py` from one invocation; raw numbers in "
             f"`{path.with_suffix('.json').name}`. "
             "Ratios come from arms run side by side in that invocation; absolute numbers drift between runs.", ""]
    if run.get("label"):
        lines += [f"**Conditions: {run['label']}**", ""]
    lines += ["## Command", "", "```", run["command"], "```", "",
              "## Machine", "",
              f"- CPU: {m['cpu']}, {m['cores']} cores, {m['mem_gb']} GB; load average at the end "
              f"{', '.join(f'{x:.1f}' for x in m['load_avg'])}" + (f"; GPU: {m['gpu']}" if m.get("gpu") else ""),
              f"- flags: avx512f={m['avx512f']}, avx512_vnni={m['avx512_vnni']}, avx512_bf16={m['avx512_bf16']}, "
              f"amx_bf16={m['amx_bf16']} → bf16 {bf16}",
              "- measured matmul peak (torch.mm, best of sizes, this run): "
              + ", ".join(f"{k} {x / 1e9:.0f} GFLOP/s" for k, x in peaks.items()),
              "- versions: " + ", ".join(f"{k} {x}" for k, x in v.items()), f"- python {m['python']}", "",
              "## Settings", "",
              "- models (Llama, untied embeddings, seed 0): " + "; ".join(
                  f"{r}: {LADDER[r]['layers']} layers, d={LADDER[r]['d']}, V={LADDER[r]['vocab']}, "
                  f"{param_count(r) / 1e6:.1f}M params, LoRA {lora_params(r) / 1e6:.2f}M" for r in s["models"]),
              "- LoRA r=16, alpha=32, dropout 0, on q,k,v,o,gate,up,down; one shared initialisation for every arm; "
              "AdamW lr 2e-4 constant, betas (0.9, 0.999), eps 1e-8, no weight decay, clip 1.0; "
              "no eval or saving in the timed window",
              f"- data: {s['pairs']} instruction/response records and {s['pairs']} preference records per "
              "vocabulary, generated text, 20–500 tokens (log-uniform), byte-level BPE trained here; "
              "pre-tokenized once; every same-batch arm sees lmtune's order (peers: a sequential sampler over the "
              "pre-ordered set); lengths per model: " + "; ".join(
                  f"{r}: SFT {f['sft_len_min']}–{f['sft_len_max']} (mean {f['sft_len_mean']:.0f}, "
                  f"{f['loss_frac']:.0%} of tokens carry loss), DPO prompt+longer completion {f['pref_len_min']}–"
                  f"{f['pref_len_max']} (mean {f['pref_len_mean']:.0f})"
                  for r, f in run["fixtures"].items() if r in LADDER),
              f"- {s['steps']} steps per arm, the first {s['warmup']} excluded; tokens/s = loss-carrying tokens / "
              f"wall time per window of {s['window']} steps, median of windows, median of {s['repeats']} "
              f"interleaved repeat(s); {s['threads']} threads (OMP/MKL/torch) in every arm; each arm a fresh process",
              f"- SFT batch {s['batch_size']} examples (packed arms: rows of 512 tokens, about the same tokens per "
              f"step); DPO batch {s['dpo_batch_size']} pairs",
              "- MFU: model FLOPs (frozen base: forward + input-gradient matmuls, LoRA 6·N, causal attention, "
              "output head only on loss rows) per loss token × tokens/s ÷ the arm's own `torch.mm` peak for its "
              "dtype (best square product measured in the arm's process before and after training; the run-level "
              "probe above when missing)",
              "- peak RSS: `VmHWM` of the arm's own process (imports, model, data, training); "
              "RSS at start: after loading, before the first step", ""]
    lines += ["## Goals (issue 9)", ""] + goals(run, rows) + [""]
    for rung in s["models"]:
        lines += [f"## LoRA SFT, {rung}", ""] + table(run, rows, rung, dpo=False) + [""]
        if any(r == rung and row["kind"].endswith("dpo") for (r, _), row in rows.items()):
            lines += [f"## DPO step, {rung}", "", "loss tokens = completion tokens of chosen + rejected.", ""]
            lines += table(run, rows, rung, dpo=True) + [""]
    ce = [(k, row) for k, row in rows.items() if row["kind"] == "ce_memory"]
    if ce:
        lines += ["## Chunked cross-entropy vs full logits", "",
                  "One LoRA forward+backward on a batch of 8×512 tokens, every token labelled, fresh process each.", "",
                  "| loss | model | RSS growth MB | peak RSS MB | seconds | notes |", "|---|---|---|---|---|---|"]
        for (rung, name), row in ce:
            e = row["extra"]
            if row["ok"]:
                cuda = f"CUDA peak {e['cuda_peak_mb']:.0f} MB" if e.get("cuda_peak_mb") else ""
                lines.append(f"| {name} | {rung} | {e['peak_rss_after_mb'] - e['rss_before_mb']:.0f} "
                             f"| {row['peak_rss']:.0f} | {e['seconds']:.2f} | {cuda} |")
            else:
                lines.append(f"| {name} | {rung} | – | – | – | FAILED: {'; '.join(row['errors'])[:200]} |")
        lines.append("")
    lines += ["## CLI latency", "", "| command | median s | max s | exit codes |", "|---|---|---|---|"]
    lines += [f"| `{c['case']}` | {c['median_s']:.2f} | {c['max_s']:.2f} | {c['exit_codes']} |" for c in run["cli"]]
    lines += ["", f"Total wall time of the invocation: {run['total_seconds'] / 60:.1f} min.", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
