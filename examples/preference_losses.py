"""DPO vs ORPO vs SimPO on the sentiment pairs of examples/sentiment_rlhf.py (shipped tiny GPT).

The same 360 preference pairs (labelled by the programmatic ``sentiment_score``), the same
steps, batch and learning rate; only ``dpo.loss`` (and its β) changes. DPO keeps a reference
(here a frozen copy: method=full) and runs it every step; ORPO and SimPO have none. Each policy
then continues the 20 held-out prompts of sentiment_rlhf.py (8 samples, temperature 1) and is
scored as there: true sentiment against KL(π‖π_ref) to the shipped model. Time per step is the
run's own (``summary.json``: tokens trained / tokens per second / steps, the first step excluded).
Rerun (a few minutes on two busy CPU cores)::

    PYTHONPATH=src python examples/preference_losses.py [--out runs/preference_losses]

It writes ``examples/PREFERENCE_LOSSES.md`` (table) and ``examples/preference_losses.png`` (plot).
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from sentiment_rlhf import evaluate, fresh_out, train, write_data  # noqa: E402  (the PPO/DPO example's evaluation)

from lmtune.models.loading import load_model_and_tokenizer  # noqa: E402

ARMS = [("sigmoid", {"dpo.beta": 0.2}), ("sigmoid", {"dpo.beta": 1.0}),
        ("orpo", {"dpo.beta": 0.2}), ("orpo", {"dpo.beta": 1.0}),
        ("simpo", {"dpo.beta": 2.0, "dpo.simpo_gamma": 0.5}), ("simpo", {"dpo.beta": 10.0, "dpo.simpo_gamma": 2.0})]
STEPS = 60


def main() -> None:
    out = fresh_out(__doc__.split("\n")[0], "runs/preference_losses")
    start = time.perf_counter()
    held_out = write_data(out)

    ref, tok, _ = load_model_and_tokenizer(None)
    ref.eval()
    rows = [{"loss": "base (reference)", "setting": "-", **dict(zip(("sentiment", "kl"), evaluate(None, ref, tok,
                                                                                                  held_out)))}]
    for loss, keys in ARMS:
        run = out / f"{loss}_{'_'.join(str(v) for v in keys.values())}"
        summary = train(run, objective="dpo", **{"data.train": str(out / "pairs_train.jsonl"), "dpo.loss": loss,
                                                 "train.steps": STEPS, "train.batch_size": 16, "train.lr": 1e-3,
                                                 **keys})
        sentiment, kl = evaluate(run, ref, tok, held_out)
        step_s = summary["tokens_trained"] / summary["tokens_per_second"] / summary["steps"]
        rows.append({"loss": loss, "setting": ", ".join(f"{k[4:]}={v}" for k, v in keys.items()),
                     "sentiment": sentiment, "kl": kl, "step_s": step_s, "peak_rss_mb": summary["peak_rss_mb"],
                     "reference_model": summary["dpo"]["reference_model"]})
        print(rows[-1], flush=True)
    write_report(rows, time.perf_counter() - start)


def write_report(rows: list[dict], elapsed: float) -> None:
    sigmoid = [r["step_s"] for r in rows if r["loss"] == "sigmoid"]
    base_step = sum(sigmoid) / len(sigmoid)
    lines = [
        "# DPO vs ORPO vs SimPO: true sentiment vs KL, and time per step (shipped tiny GPT)", "",
        "Written by `PYTHONPATH=src python examples/preference_losses.py` "
        f"({elapsed / 60:.1f} min on {platform.processor() or platform.machine()}, shared by other work, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, Python {sys.version.split()[0]}).", "",
        f"Every run: method=full, 360 shipped sentiment pairs, {STEPS} steps of 16 pairs, lr 1e-3. Evaluation as in "
        "sentiment_rlhf.md: 20 held-out prompts × 8 samples, temperature 1, ≤ 8 new tokens; sentiment is the "
        "ground-truth `sentiment_score` (−1…1), KL is mean Σ_t (log π − log π_ref) over the samples, in nats. "
        "Step time is each run's own mean after its first step, on a shared machine: read the ratios, "
        "not the seconds.", "",
        "| loss | setting | reference model | true sentiment | KL(π‖π_ref) | step (s) | vs sigmoid DPO |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "step_s" not in r:
            lines.append(f"| {r['loss']} | - | - | {r['sentiment']:.3f} | {r['kl']:.3f} | | |")
            continue
        ref = "frozen copy, every step" if r["reference_model"] else "none"
        lines.append(f"| {r['loss']} | {r['setting']} | {ref} | {r['sentiment']:.3f} | {r['kl']:.3f} | "
                     f"{r['step_s']:.4f} | {r['step_s'] / base_step:.2f}x |")
    (HERE / "PREFERENCE_LOSSES.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (HERE / "preference_losses.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    labels = (("sigmoid", "s", "DPO (sigmoid)"), ("orpo", "o", "ORPO"), ("simpo", "^", "SimPO"),
              ("base (reference)", "*", "base (reference)"))
    for loss, marker, label in labels:
        pts = [r for r in rows if r["loss"] == loss]
        ax.scatter([r["kl"] for r in pts], [r["sentiment"] for r in pts], marker=marker, s=60, label=label)
        for r in pts:
            if r["setting"] != "-":
                ax.annotate(r["setting"], (r["kl"], r["sentiment"]), textcoords="offset points", xytext=(4, 4),
                            fontsize=7)
    ax.set_xlabel("KL(π ‖ π_ref) per continuation (nats)")
    ax.set_ylabel("true sentiment of continuation")
    ax.set_title("Preference losses on the shipped tiny GPT")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "preference_losses.png", dpi=120)


if __name__ == "__main__":
    main()
