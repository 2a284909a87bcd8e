"""Predicted vs measured peak memory, and gradient checkpointing's memory/speed trade.

Every arm runs ``lmtune.run.run_training`` in a fresh process (``peak_rss_mb`` is that process's
own ``VmHWM``) and reports summary.json's ``predicted_peak_mb`` (``lmtune inspect``'s prediction,
made before the model loads) next to ``peak_rss_mb``.

- ``--table predicted``: methods full / lora / qlora / prompt_tuning on random Llamas of two sizes.
- ``--table checkpointing``: LoRA on the larger Llama at 512, 1,024 and 2,048 tokens, with and
  without ``train.gradient_checkpointing``.

Run (writes benchmarks/MEMORY.md):

    PYTHONPATH=src python benchmarks/memory_predicted.py [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
THREADS = "1"  # 2 OpenMP threads on a 2-core machine shared by ~8 jobs spin-wait: 10x slower
SIZES = {"12m": (4, 384, 1024, 8000), "134m": (12, 768, 2048, 32000),  # layers, hidden, MLP, vocab
         "27m": (12, 384, 1024, 8000)}  # deeper, for checkpointing at up to 2,048 tokens in reasonable time
PREDICTED_SIZES = ("12m", "134m")


def build_base(folder: Path, size: str, context: int) -> int:
    """A random Llama with the shipped word tokenizer (no model can be downloaded here)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmtune.models.loading import load_tokenizer, save_model, shipped_model_dir

    tok = load_tokenizer(shipped_model_dir())
    layers, hidden, mlp, vocab = SIZES[size]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 192, max_position_embeddings=context,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id))
    save_model(model, tok, folder)
    return sum(p.numel() for p in model.parameters())


def long_text(folder: Path, tokens: int) -> Path:
    """Lines of ``tokens`` words from the shipped questions, so every example fills train.max_length."""
    from lmtune import run as run_module

    words = (Path(run_module.__file__).parent / "assets" / "data" / "questions.txt").read_text().split()
    path = folder / f"long{tokens}.txt"
    lines = [" ".join(words[(i * 97) % len(words):] + words)[: 8 * tokens] for i in range(64)]
    path.write_text("\n".join(" ".join(ln.split()[:tokens]) for ln in lines) + "\n")
    return path


def run_arm(spec: dict) -> dict:
    """One arm in this (fresh) process."""
    from lmtune.config import load_config
    from lmtune.run import run_training
    from lmtune.runlog import RunLog

    overrides = {"model": spec["base"], "output_dir": spec["out"], "data.train": spec["data"],
                 "train.lr": 1e-4, "train.log_every": 1, "train.eval_every": 0, "train.seed": 0, **spec["overrides"]}
    if overrides["method"] in ("lora", "qlora"):  # other methods refuse a key they would not read
        overrides["lora.target_modules"] = "all-linear"
    cfg = load_config(overrides=overrides)
    summary = run_training(cfg, log=RunLog(Path(spec["out"]), quiet=True, tensorboard=False)).summary
    step_s = summary["tokens_trained"] / summary["tokens_per_second"] / summary["steps"]
    return {"peak_rss_mb": summary["peak_rss_mb"], "predicted_peak_mb": summary["predicted_peak_mb"],
            "step_s": step_s}


def spawn(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": THREADS, "MKL_NUM_THREADS": THREADS, "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, __file__, "--arm", json.dumps(spec)], env=env, capture_output=True,
                          text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"failed": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def header(command: str) -> str:
    import torch
    import transformers

    info = open("/proc/cpuinfo").read()
    cpu = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if f in flags]
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout
    return "\n".join([
        "# Memory: predicted vs measured, and gradient checkpointing", "",
        f"Command: `{command}`  ",
        f"Commit: {rev.strip()}  ",
        f"Machine: {cpu}, {os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f} at the start), "
        f"{THREADS} thread per arm; "
        f"CPU flags: {' '.join(shown) or 'none of avx2/avx512'}{'' if 'amx_bf16' in flags else ', no AMX'}  ",
        f"Versions: Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}  ",
        "Peak = `VmHWM` of the arm's own fresh process (summary.json `peak_rss_mb`); predicted = summary.json "
        "`predicted_peak_mb`, the number `lmtune inspect` prints for the same config. Step times come from one "
        "run each: compare within a table only.", ""]) + "\n"


def predicted_table(tmp: Path, steps: int) -> str:
    rows = ["## Predicted vs measured peak (batch 8 × 128 tokens, fp32)", "",
            "| model | method | predicted (MB) | measured (MB) | predicted / measured |",
            "| --- | --- | ---: | ---: | ---: |"]
    for size in PREDICTED_SIZES:
        base = tmp / size
        n = build_base(base, size, 2048)
        data = long_text(tmp, 128)
        for method in ("full", "lora", "qlora", "prompt_tuning"):
            r = spawn({"base": str(base), "out": str(tmp / f"{size}-{method}"), "data": str(data),
                       "overrides": {"method": method, "train.steps": steps, "train.batch_size": 8,
                                     "train.max_length": 128}})
            print(json.dumps({"size": size, "method": method, **r}), flush=True)
            if "failed" in r:
                rows.append(f"| {size} ({n / 1e6:.0f}M) | {method} | failed: {r['failed']} | | |")
                continue
            rows.append(f"| {size} ({n / 1e6:.0f}M) | {method} | {r['predicted_peak_mb']:.0f} | "
                        f"{r['peak_rss_mb']:.0f} | {r['predicted_peak_mb'] / r['peak_rss_mb']:.2f} |")
    return "\n".join(rows) + "\n"


def checkpointing_table(tmp: Path, steps: int) -> str:
    base = tmp / "27m-ckpt"
    n = build_base(base, "27m", 2048)
    rows = [f"## Gradient checkpointing: LoRA (all-linear, r=8) on a {n / 1e6:.0f}M Llama (12 layers, d=384), "
            "batch 1, fp32", "",
            "| tokens | plain peak (MB) | checkpointed peak (MB) | memory ratio | plain step (s) "
            "| checkpointed step (s) | time ratio | predicted plain / checkpointed (MB) "
            "| predicted / measured, plain / checkpointed |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for tokens in (512, 1024, 2048):
        data = long_text(tmp, tokens)
        got = {}
        for ckpt in (False, True):
            got[ckpt] = spawn({"base": str(base), "out": str(tmp / f"ck{tokens}{ckpt}"), "data": str(data),
                               "overrides": {"method": "lora", "train.steps": steps, "train.batch_size": 1,
                                             "train.max_length": tokens, "train.gradient_checkpointing": ckpt}})
            print(json.dumps({"tokens": tokens, "checkpointing": ckpt, **got[ckpt]}), flush=True)
        a, b = got[False], got[True]
        if "failed" in a or "failed" in b:
            rows.append(f"| {tokens} | failed: {a.get('failed') or b.get('failed')} | | | | | | | |")
            continue
        rows.append(f"| {tokens} | {a['peak_rss_mb']:.0f} | {b['peak_rss_mb']:.0f} | "
                    f"{b['peak_rss_mb'] / a['peak_rss_mb']:.2f} | "
                    f"{a['step_s']:.2f} | {b['step_s']:.2f} | {b['step_s'] / a['step_s']:.2f} | "
                    f"{a['predicted_peak_mb']:.0f} / {b['predicted_peak_mb']:.0f} | "
                    f"{a['predicted_peak_mb'] / a['peak_rss_mb']:.2f} / "
                    f"{b['predicted_peak_mb'] / b['peak_rss_mb']:.2f} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)  # step time: steps after the first
    parser.add_argument("--tables", default="predicted,checkpointing")
    parser.add_argument("--report", default=str(HERE / "MEMORY.md"), help="where the markdown goes")
    parser.add_argument("--arm")
    args = parser.parse_args()
    if args.arm:
        print(json.dumps(run_arm(json.loads(args.arm))))
        return
    command = f"PYTHONPATH=src python benchmarks/memory_predicted.py --steps {args.steps} --tables {args.tables}"
    report = header(command)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.tables.split(","):
            build = {"predicted": predicted_table, "checkpointing": checkpointing_table}[name]
            report += "\n" + build(Path(tmp), args.steps)
            Path(args.report).write_text(report, encoding="utf-8")
    print(report)


if __name__ == "__main__":
    main()
