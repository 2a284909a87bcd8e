"""``lmtune demo``: the small-scale fine-tuning story, end to end, on the shipped model.

1. Load the shipped word-level GPT (pre-trained on simple sentences) and its tokenizer.
2. Fine-tune it on questions in the same vocabulary, with the same ``train()``.
3. Train the same architecture from scratch on the questions for the same steps.
4. LoRA on the same questions, next to full fine-tuning.
5. Compare: step-1 loss vs ln(V) vs from scratch; samples before/after; loss.png; summary.json.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from lmtune.assets.corpora import data_path
from lmtune.config import load_config
from lmtune.errors import InputError
from lmtune.generate import generate_text
from lmtune.models.loading import load_model_and_tokenizer, save_model
from lmtune.models.shipped import random_model
from lmtune.run import run_training
from lmtune.runlog import RunLog, write_json_atomic

SAMPLE_SEEDS = (1, 2, 3)


def _samples(model: Any, tokenizer: Any, prompt: str = "") -> list[str]:

    return [generate_text(model, tokenizer, prompt, max_new_tokens=12, temperature=0.8, top_k=20, seed=s)
            for s in SAMPLE_SEEDS]


def _curve(run_dir: Path) -> tuple[list[int], list[float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows], [r["loss"] for r in rows]


def _arm(name: str, out: Path, model: Path | None, steps: int, lr: float, extra: dict[str, Any]) -> dict[str, Any]:
    cfg = load_config(overrides={
        "model": str(model) if model else None, "output_dir": str(out / name),
        "data.train": str(data_path("questions.txt")), "data.eval": str(data_path("questions_eval.txt")),
        "train.steps": steps, "train.lr": lr, "train.batch_size": 16, "train.betas": [0.85, 0.99],
        "train.log_every": 5, "train.eval_every": steps, "train.max_length": 64, **extra})
    print(f"\n== {name} ==")
    summary = run_training(cfg, log=RunLog(out / name, console_every=max(1, steps // 4))).summary
    summary["first_loss"] = _curve(out / name)[1][0]
    return summary


def run_demo(out: str | Path = "lmtune-demo", steps: int = 300) -> dict[str, Any]:
    """Run the demo into ``out`` (replaced if it holds an earlier demo) and return its summary.

    Runs single-threaded and restores the caller's torch thread count afterwards.
    """
    import torch

    # The shipped model is 48 wide: its matmuls are far too small to share between threads, and
    # thread hand-offs (badly so on a busy machine) cost more than they save. Measured: 100 steps
    # took 40 s with 2 threads on a loaded 2-core machine, 8.6 s with one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_demo(Path(out), steps)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out: Path, steps: int) -> dict[str, Any]:
    if out.exists():
        if not (out / "demo.json").exists() and any(out.iterdir()):

            raise InputError(f"{out} exists and is not an earlier demo's folder; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "demo.json").write_text("{}\n")

    model, tokenizer, folder = load_model_and_tokenizer(None)
    vocab = len(tokenizer)
    questions = [q for q in data_path("questions.txt").read_text().splitlines() if q.strip()]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab size: {vocab} ({vocab - 1} words + BOS)")
    print(f"loaded pre-trained model: {n_params} params")
    print(f"fine-tuning sentences: {len(questions)}")
    before = _samples(model, tokenizer)

    # The same architecture, randomly initialised, saved as a model folder so that it goes
    # through exactly the same run path as the pre-trained model.
    scratch_init = out / "scratch-init"
    save_model(random_model(tokenizer, seed=0, n_embd=model.config.n_embd, n_layer=model.config.n_layer,
                            n_head=model.config.n_head, n_positions=model.config.n_positions),
               tokenizer, scratch_init)

    arms = {
        "finetune-full": _arm("finetune-full", out, None, steps, 1e-3, {"method": "full"}),
        "from-scratch": _arm("from-scratch", out, scratch_init, steps, 1e-3, {"method": "full"}),
    }
    # LoRA's B starts at zero and only r directions per layer move, so it takes a ~10x larger rate.
    arms["finetune-lora"] = _arm("finetune-lora", out, None, steps, 1e-2, {
        "method": "lora", "lora.r": 8, "lora.alpha": 16, "lora.target_modules": "all-linear"})
    tuned, _, _ = load_model_and_tokenizer(out / "finetune-full")
    after = _samples(tuned, tokenizer)

    ln_v = math.log(vocab)
    print("\n== what fine-tuning bought ==")
    print(f"loss of a random model, ln(V):          {ln_v:.4f}")
    for name, s in arms.items():
        print(f"{name:<15} step-1 loss {s['first_loss']:.4f} | final {s['final_loss']:.4f} | "
              f"eval {s['eval_loss']:.4f} | trainable {s['trainable_params']:,} of {s['total_params']:,}")
    print("\nsamples before fine-tuning:")
    for s in before:
        print(f"  {s}")
    print("samples after fine-tuning:")
    for s in after:
        print(f"  {s}")

    _plot(out, folder, arms)
    summary = {"vocab_size": vocab, "ln_vocab": ln_v, "pretrained_params": n_params,
               "fine_tuning_sentences": len(questions), "steps": steps,
               "arms": {k: {f: v[f] for f in ("first_loss", "final_loss", "eval_loss", "trainable_params",
                                              "total_params", "tokens_per_second", "wall_seconds")}
                        for k, v in arms.items()},
               "samples_before": before, "samples_after": after}
    write_json_atomic(out / "summary.json", summary)
    (out / "demo.json").write_text(json.dumps({"lmtune_demo": True}) + "\n")
    print(f"\nmodel saved to {out / 'finetune-full'}; loss curves in {out / 'loss.png'}; "
          f"numbers in {out / 'summary.json'}")
    return summary


def _plot(out: Path, pretrained: Path, arms: dict[str, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if (pretrained / "metrics.jsonl").exists():
        ax1.plot(*_curve(pretrained), label="pre-training (shipped model)")
    ax1.set(title="pre-training on simple sentences", xlabel="step", ylabel="loss")
    ax1.legend()
    for name in arms:
        ax2.plot(*_curve(out / name), label=name)
    ax2.set(title="on the questions: fine-tuning vs from scratch", xlabel="step", ylabel="loss")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)

