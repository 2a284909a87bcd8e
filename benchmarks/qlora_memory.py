"""QLoRA vs LoRA: peak RSS, weight memory, eval loss and step time on 60M and 134M Llamas.

Each arm runs ``lmtune``'s own training path (``lmtune.run.run_training``) in a fresh
subprocess, so ``ru_maxrss`` is that arm's peak alone:

- ``lora-fp32``: LoRA on the fp32 base (lmtune's default loading);
- ``lora-bf16``: LoRA on the base loaded in bf16 (adapters stay fp32);
- ``qlora``: LoRA on the NF4 base, weights streamed into 4 bits while loading.

Same data, order, steps, rank, alpha, targets (all linear layers), learning rate (constant),
dropout 0, batch. The base is a randomly initialised Llama (60M: 8 layers, d=512; 134M: 12 layers,
d=768; V=32000; built from a config with a fixed seed: no pre-trained model can be downloaded here), so
the eval losses compare the adapters' training on the same frozen base, not fine-tuning quality.
The shipped questions (word-level tokenizer) are the data: they use ids < 261 of the 32,000.

Run (writes benchmarks/QLORA.md and prints it):

    PYTHONPATH=src python benchmarks/qlora_memory.py [--steps 12] [--sizes 60m,134m]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THREADS = "2"
EVAL_LINES = 48
ARMS = ("lora-fp32", "lora-bf16", "qlora")
HERE = Path(__file__).resolve().parent


def rss_mb() -> float:
    """Current resident set size in MB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


SIZES = {"60m": (8, 512, 1536), "134m": (12, 768, 2048)}  # layers, hidden, MLP width; V=32000 for both


def build_base(folder: Path, size: str) -> int:
    """A Llama of ``size`` with the shipped word tokenizer, saved as a model folder; returns its size."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmtune.models.loading import load_tokenizer, save_model, shipped_model_dir

    tok = load_tokenizer(shipped_model_dir())
    layers, hidden, mlp = SIZES[size]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=32000, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id))
    save_model(model, tok, folder)
    return sum(p.numel() for p in model.parameters())


def run_arm(arm: str, base: Path, out: Path, steps: int) -> dict:
    """One arm, in this (fresh) process."""
    import torch

    from lmtune import run as run_module
    from lmtune.config import load_config
    from lmtune.data.readers import read_records  # noqa: F401  (import cost outside the measured window)
    from lmtune.models.loading import load_causal_lm
    from lmtune.runlog import RunLog

    data = Path(run_module.__file__).parent / "assets" / "data"
    eval_file = out.parent / "eval.txt"  # the first EVAL_LINES held-out questions: a short, fixed eval
    eval_file.write_text("\n".join((data / "questions_eval.txt").read_text().splitlines()[:EVAL_LINES]) + "\n")
    cfg = load_config(overrides={
        "model": str(base), "output_dir": str(out), "method": "qlora" if arm == "qlora" else "lora",
        "data.train": str(data / "questions.txt"), "data.eval": str(eval_file),
        "lora.r": 16, "lora.alpha": 32, "lora.target_modules": "all-linear", "train.steps": steps,
        "train.lr": 1e-3, "train.batch_size": 8, "train.max_length": 64, "train.log_every": steps,
        "train.eval_every": 0, "train.seed": 0})
    loaded = {}
    original = run_module.RunContext.load_causal_lm

    def load(self):  # record the memory the weights take, and load bf16 for that arm
        before = rss_mb()
        model = load_causal_lm(self.model_folder, dtype=torch.bfloat16) if arm == "lora-bf16" else original(self)
        with torch.no_grad():  # read every weight once: memory-mapped pages count only when touched
            for name, p in model.named_parameters():
                if "weight_4bit" not in name:  # NF4 weights were written by lmtune's loader: resident already
                    p.float().sum()
        loaded["weights_rss_mb"] = rss_mb() - before
        return model

    run_module.RunContext.load_causal_lm = load
    start = time.perf_counter()
    summary = run_module.run_training(cfg, log=RunLog(out, quiet=True, tensorboard=False)).summary
    step_s = summary["tokens_trained"] / summary["tokens_per_second"] / summary["steps"]
    return {"arm": arm, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "weights_rss_mb": loaded["weights_rss_mb"], "eval_loss": summary["eval_loss"],
            "final_loss": summary["final_loss"], "step_s": step_s, "wall_s": time.perf_counter() - start,
            "trainable_params": summary["trainable_params"], "total_params": summary["total_params"],
            **{k: summary[k] for k in ("bytes_per_quantized_param", "weight_memory_mb", "weight_memory_fp32_mb",
                                       "weight_memory_bf16_mb", "unquantized_layers") if k in summary}}


def spawn(arm: str, base: Path, out: Path, steps: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": THREADS, "MKL_NUM_THREADS": THREADS, "OPENBLAS_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, __file__, "--arm", arm, "--base", str(base), "--out", str(out), "--steps", str(steps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"arm": arm, "failed": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def table(rows: list[dict], size: str, n_params: int, steps: int, load: str) -> str:
    lora = next((r for r in rows if r["arm"] == "lora-fp32" and "failed" not in r), None)
    q = next((r for r in rows if r["arm"] == "qlora" and "failed" not in r), {})
    layers, hidden, _ = SIZES[size]
    lines = [
        f"## {size}: random Llama, {layers} layers, d={hidden}, V=32000, {n_params / 1e6:.1f}M parameters", "",
        f"Load average before each arm and at the end: {load}", "",
        "| arm | peak RSS (MB) | weights in RSS (MB) | eval loss | vs LoRA fp32 | step (s) | trainable |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['arm']} | failed: {r['failed']} | | | | | |")
            continue
        rel = f"{100 * (r['eval_loss'] / lora['eval_loss'] - 1):+.2f}%" if lora else "n/a"
        lines.append(f"| {r['arm']} | {r['peak_rss_mb']:.0f} | {r['weights_rss_mb']:.0f} | {r['eval_loss']:.4f} | "
                     f"{rel} | {r['step_s']:.3f} | {r['trainable_params']:,} |")
    if q:
        lines += ["", f"Weight memory alone (closed form, lmtune's summary.json): NF4 base "
                  f"{q['weight_memory_mb']:.1f} MB vs fp32 {q['weight_memory_fp32_mb']:.1f} MB and bf16 "
                  f"{q['weight_memory_bf16_mb']:.1f} MB; {q['bytes_per_quantized_param']:.4f} bytes per quantized "
                  f"parameter. Embeddings, norms and the output head (2 × {32000 * hidden / 1e6:.1f}M parameters) "
                  "stay fp32, which is why the whole model shrinks less than its linear layers."
                  + (f" Unquantized linear layers: {', '.join(q['unquantized_layers'])}." if q.get("unquantized_layers")
                     else "")]
    return "\n".join(lines) + "\n"


def header(command: str, steps: int) -> str:
    import torch
    import transformers

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    bf16 = "avx512_bf16" in open("/proc/cpuinfo").read()
    return "\n".join([
        "# QLoRA vs LoRA: memory, loss and step time", "",
        f"Command: `{command}`  ",
        f"Machine: {cpu}, {os.cpu_count()} cores (shared with other work), {THREADS} threads per arm; "
        f"avx512_bf16: {'yes' if bf16 else 'no (bf16 matmuls are emulated)'}  ",
        f"Versions: Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}  ",
        f"Every arm: LoRA r=16, alpha=32 on all linear layers; lr 1e-3 constant; batch 8; {steps} steps; "
        f"train.seed 0; shipped questions (train) and the first {EVAL_LINES} of questions_eval (eval).", "",
        "Peak RSS (`ru_maxrss` of the arm's own process) includes Python, torch and transformers (~360 MB here), "
        "activations and the chunked loss. 'weights in RSS' is the resident memory that loading added, after "
        "reading every weight once (memory-mapped pages count only when touched); for QLoRA it also holds "
        "allocator memory kept from quantizing. Step times are medians of nothing: one run each, on a shared "
        "machine whose load is shown; compare them only within a table and with care.", ""]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--sizes", default="60m,134m", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--arm", choices=ARMS)
    parser.add_argument("--base")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.arm:  # child: one arm, result as the last JSON line
        print(json.dumps(run_arm(args.arm, Path(args.base), Path(args.out), args.steps)))
        return
    command = f"PYTHONPATH=src python benchmarks/qlora_memory.py --steps {args.steps} --sizes {args.sizes}"
    report = header(command, args.steps)
    for size in args.sizes.split(","):
        loads = []
        with tempfile.TemporaryDirectory() as tmp:
            base = Path(tmp) / "base"
            n_params = build_base(base, size)
            rows = []
            for arm in ARMS:
                loads.append(os.getloadavg()[0])
                rows.append(spawn(arm, base, Path(tmp) / arm, args.steps))
                print(json.dumps({"size": size, **rows[-1]}), flush=True)
        loads.append(os.getloadavg()[0])
        report += "\n" + table(rows, size, n_params, args.steps, " → ".join(f"{x:.1f}" for x in loads))
        (HERE / "QLORA.md").write_text(report, encoding="utf-8")  # after each size: a failure keeps the rest
    print(report)


if __name__ == "__main__":
    main()
