"""Tokens/s of 1 vs 2 torchrun processes (gloo, CPU), with DDP's backward overlap on and off.

Overlap on: ``train.distributed.bucket_mb=1`` (several buckets, each all-reduced while the rest of
backward runs). Off: ``bucket_mb=10000`` (one bucket larger than the model: a single all-reduce
after backward, like the hand-written all-reduce this replaced). The model is a GPT-2 built from
a config (4 layers, width 256, ~3.5M parameters), nothing downloaded. Each arm trains
``--steps`` steps of the same per-rank batch and reports ``tokens_per_second`` from
summary.json (the first step is excluded by the loop's clock).

    PYTHONPATH=src python benchmarks/ddp_overlap.py --steps 12 --out benchmarks/ddp_overlap.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

SENTENCES = ["the cat can run and the dog can jump over the red ball in the big house .",
             "my mom likes the cat and the fish is in the cup near the tree by the road ."]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(folder: Path) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmtune.models.loading import save_model
    from lmtune.models.shipped import build_word_tokenizer

    tok = build_word_tokenizer(SENTENCES)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=256, n_layer=4, n_head=4,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.bos_token_id)
    save_model(GPT2LMHeadModel(cfg), tok, folder)


def _arm(nproc: int, bucket_mb: float, steps: int, work: Path) -> float:
    out = work / f"out-{nproc}-{bucket_mb:g}"
    args = [f"model={work / 'model'}", f"data.train={work / 'data.txt'}", f"train.steps={steps}", "train.batch_size=8",
            f"train.distributed.bucket_mb={bucket_mb}", f"output_dir={out}", "train.log_every=1000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "lmtune", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_port()}",
               "--master_addr=127.0.0.1", "-m", "lmtune", "train", *args]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=900)
    return json.loads((out / "summary.json").read_text())["tokens_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", type=Path, default=None)
    a = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _model(work / "model")
        (work / "data.txt").write_text("\n".join(SENTENCES * 64) + "\n")
        one = _arm(1, 25.0, a.steps, work)
        on = _arm(2, 1.0, a.steps, work)
        off = _arm(2, 10000.0, a.steps, work)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True).stdout.strip())
    cpu_flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni") if f in cpu_flags]
    flags.append("AMX" if "amx_tile" in cpu_flags else "no AMX")
    load = os.getloadavg()[0]
    lines = [
        f"# DDP: tokens/s of 1 vs 2 processes, overlap on and off (commit {commit}{' DIRTY' if dirty else ''})",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, flags {' '.join(flags)}; "
        f"1-minute load {load:.1f} at the end (its own 2 processes count in it; more means other jobs: noise); "
        f"2 processes compete for the same {os.cpu_count()} cores; read the ratios, not the absolute rates. "
        f"GPT-2 4×256, per-rank batch 8 × 17 tokens, {a.steps} steps, gloo, OMP_NUM_THREADS=1.",
        "",
        f"Command: `PYTHONPATH=src python benchmarks/ddp_overlap.py --steps {a.steps} --out benchmarks/ddp_overlap.md`",
        "",
        "| arm | tokens/s | vs 1 process |",
        "|---|---:|---:|",
        f"| 1 process | {one:.0f} | 1.00 |",
        f"| 2 processes, overlap on (bucket_mb=1) | {on:.0f} | {on / one:.2f} |",
        f"| 2 processes, overlap off (bucket_mb=10000) | {off:.0f} | {off / one:.2f} |",
        "",
        f"Overlap on / off: {on / off:.2f}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
