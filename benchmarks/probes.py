"""Small measurements beside the training arms: matmul peak, chunked-CE memory, CLI latency."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import LORA, ROOT, SEED, current_rss_mb, median, peak_rss_mb


def run_matmul_peak(spec: dict[str, Any]) -> dict[str, Any]:
    """Best ``torch.mm`` FLOP/s per dtype at a few square sizes: the MFU denominator of this run."""
    import torch

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = [4096, 8192] if dev.type == "cuda" else [512, 1024, 2048]
    reps = 20 if dev.type == "cuda" else 5
    out: dict[str, Any] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        best = 0.0
        for n in sizes:
            a = torch.randn(n, n, device=dev).to(dtype)
            b = torch.randn(n, n, device=dev).to(dtype)
            for _ in range(2):
                torch.mm(a, b)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            secs = (time.perf_counter() - t0) / reps
            best = max(best, 2 * n**3 / secs)
        out[name] = best
    return {"peak_flops": out, "steps": []}


def run_ce_memory(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of one LoRA forward+backward on a full batch, chunked CE vs full logits.

    ``spec["mode"]``: ``chunked`` (lmtune's ``lm_loss``: head + CE only on loss rows, in
    checkpointed chunks) or ``full`` (``model(labels=...)``: the whole (B, T, V) logits).
    """
    import torch
    from peers import device
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmtune.objectives.lm import lm_loss

    folder = Path(spec["work"]) / f"model-{spec['rung']}"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").requires_grad_(False)
    # Adapters injected in place keep the transformers class (``base_model`` is the body), which
    # ``lm_loss`` expects; the same adapters as the training arms, so the same activations are kept.
    inject_adapter_in_model(LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=LORA["targets"]), model)
    model = model.to(device()).train()
    tok = AutoTokenizer.from_pretrained(folder)
    g = torch.Generator().manual_seed(SEED)
    b, t = spec["batch_size"], spec["seq_len"]
    ids = torch.randint(3, len(tok), (b, t), generator=g)  # (B, T)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    batch = {k: v.to(device()) for k, v in batch.items()}
    if device().type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before, t0 = current_rss_mb(), time.perf_counter()
    if spec["mode"] == "chunked":
        loss_sum, _ = lm_loss(model, batch)
        loss = loss_sum / (b * (t - 1))
    else:
        loss = model(**batch).loss
    loss.backward()
    seconds = time.perf_counter() - t0
    out = {"rss_before_mb": before, "loss": float(loss), "seconds": seconds, "steps": []}
    if device().type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    out["peak_rss_after_mb"] = peak_rss_mb()
    return out


def cli_latency(env: dict[str, str], repeats: int = 3) -> list[dict[str, Any]]:
    """Wall time of ``python -m lmtune --help`` and of an argument error (must be < 1 s)."""
    cases = [("lmtune --help", ["--help"], 0),
             ("lmtune train no.such.key=1 (unknown key)", ["train", "output_dir=/tmp/x", "no.such.key=1"], 2),
             ("lmtune train train.lr=-1 (bad value)", ["train", "output_dir=/tmp/x", "train.lr=-1"], 2),
             ("lmtune train missing.yaml (no such file)", ["train", "/nonexistent/missing.yaml"], 2),
             ("lmtune (no command)", [], 2)]
    full_env = {**os.environ, **env, "PYTHONPATH": str(ROOT / "src")}
    rows = []
    for label, args, want in cases:
        times, codes = [], set()
        for _ in range(repeats):
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "lmtune", *args], env=full_env, capture_output=True,
                                  text=True, timeout=120)
            times.append(time.perf_counter() - t0)
            codes.add(proc.returncode)
        rows.append({"case": label, "median_s": median(times), "max_s": max(times), "exit_codes": sorted(codes),
                     "expected_exit": want})
    return rows
