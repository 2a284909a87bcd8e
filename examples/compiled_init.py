"""Three compile -> fine-tune -> extract -> merge cycles on the shipped corpus, vs a random and a pre-trained start.

The seed graph is the bigram counts of the first 200 sentences of the shipped pre-training
corpus (a stand-in for a hand-made graph: it knows some associations and lacks most). Each cycle:

1. ``lmtune.compile`` the graph at rank K over the shipped vocabulary (no training);
2. score the compiled model on held-out text (``retain.txt``);
3. fine-tune it with ``lmtune train`` on 1000 other sentences for a fixed budget, score again;
4. ``lmtune.compile.extract_links`` the fine-tuned model's strongest associations the graph lacks
   (averaged over the fine-tuning text) and merge them into the graph for the next cycle.

The same fine-tuning budget is then given to a randomly initialised model of the compiled
architecture and to the shipped pre-trained model (which saw all 4000 sentences for 1500
steps: a reference, not a fair rival). Writes COMPILED_INIT.json and compiled_init.png next
to this file and prints the table of COMPILED_INIT.md.

    PYTHONPATH=src python examples/compiled_init.py [--steps 200] [--rank 32] [--smoothing 0.05] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

import lmtune.compile
from lmtune.cli import main as lmtune_cli
from lmtune.compile.build import corpus_links
from lmtune.compile.graph import write_links
from lmtune.evaluate import run_eval
from lmtune.models.loading import load_tokenizer, save_model, shipped_model_dir

HERE = Path(__file__).resolve().parent
DATA = Path(lmtune.__file__).parent / "assets" / "data"
SEED_SENTENCES, FINETUNE_SENTENCES = 200, 1000


def held_out_loss(model: Path | None) -> float:
    return run_eval(model=str(model) if model else None, adapter=None, data=str(DATA / "retain.txt"))["loss"]


def fine_tune(model: Path | None, text: Path, out: Path, steps: int) -> float:
    """``lmtune train`` with the same budget for every start; returns the held-out loss after."""
    args = ["train", f"data.train={text}", f"output_dir={out}", f"train.steps={steps}", "train.batch_size=16",
            "train.lr=3e-3", "train.warmup_steps=20", f"train.log_every={steps}", "train.seed=0"]
    if model is not None:
        args.append(f"model={model}")
    assert lmtune_cli(args) == 0, f"training {model} failed"
    return held_out_loss(out)


def random_start(like: Path, out: Path) -> Path:
    """The compiled model's architecture and tokenizer, freshly initialised (transformers' own init)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(like))
    save_model(model, load_tokenizer(like), out)
    return out


def run(work: Path, steps: int, rank: int, smoothing: float) -> dict:
    lines = [line for line in (DATA / "pretrain.txt").read_text().splitlines() if line.strip()]
    tokenizer = load_tokenizer(shipped_model_dir())
    graph = work / "graph_1.tsv"
    write_links(graph, corpus_links(lines[:SEED_SENTENCES], tokenizer, "pretrain.txt"))
    text = work / "finetune.txt"
    text.write_text("\n".join(lines[SEED_SENTENCES:SEED_SENTENCES + FINETUNE_SENTENCES]) + "\n")

    cycles = []
    for c in (1, 2, 3):
        t0 = time.time()
        compiled = lmtune.compile(graph, out=work / f"compiled_{c}", rank=rank, vocab=shipped_model_dir(),
                                  smoothing=smoothing, quiet=True)
        loss0 = held_out_loss(compiled.out)
        loss1 = fine_tune(compiled.out, text, work / f"tuned_{c}", steps)
        next_graph = work / f"graph_{c + 1}.tsv"
        shutil.copy(graph, next_graph)
        found = lmtune.compile.extract_links(work / f"tuned_{c}", work / f"new_{c}.tsv", graph=graph, data=text,
                                             top=150, min_prob=0.05, merge_into=next_graph, quiet=True)
        r = compiled.report
        cycles.append({"cycle": c, "links": r["links"], "rank": rank, "residual_frobenius": r["residual_frobenius"],
                       "discarded_root": r["discarded_singular_values_root"], "relative_error": r["relative_error"],
                       "loss_compiled": loss0, "loss_finetuned": loss1, "links_added": len(found),
                       "examples": [[x.source, x.target, x.weight] for x in found[:5]],
                       "seconds": round(time.time() - t0, 1)})
        print(f"cycle {c}: {r['links']} links, rel. error {r['relative_error']:.4f} "
              f"(||M-M_K||_F {r['residual_frobenius']:.3f} = sqrt(sum s_k^2, k>K) "
              f"{r['discarded_singular_values_root']:.3f}), "
              f"held-out loss {loss0:.3f} compiled -> {loss1:.3f} fine-tuned, +{len(found)} links", flush=True)
        graph = next_graph
    rnd = random_start(work / "compiled_1", work / "random_init")
    baselines = {name: {"loss_start": held_out_loss(start),
                        "loss_finetuned": fine_tune(start, text, work / f"tuned_{name}", steps)}
                 for name, start in (("random", rnd), ("shipped", None))}
    return {"steps": steps, "rank": rank, "smoothing": smoothing, "seed_sentences": SEED_SENTENCES,
            "finetune_sentences": FINETUNE_SENTENCES,
            "vocab_size": len(tokenizer), "cycles": cycles, "baselines": baselines,
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def table(res: dict) -> str:
    rows = ["| start | graph links | rel. error ‖M−M_K‖_F/‖M‖_F | held-out loss at start | after fine-tuning "
            "| links added |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for c in res["cycles"]:
        rows.append(f"| compiled, cycle {c['cycle']} | {c['links']} | {c['relative_error']:.4f} | "
                    f"{c['loss_compiled']:.3f} | {c['loss_finetuned']:.3f} | {c['links_added']} |")
    for name, label in (("random", "random init (same architecture)"), ("shipped", "shipped pre-trained model")):
        b = res["baselines"][name]
        rows.append(f"| {label} | – | – | {b['loss_start']:.3f} | {b['loss_finetuned']:.3f} | – |")
    return "\n".join(rows)


def plot(res: dict, path: Path) -> None:
    import matplotlib  # optional dependency: only the example plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cyc = [c["cycle"] for c in res["cycles"]]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(cyc, [c["loss_compiled"] for c in res["cycles"]], "o-", label="compiled (no training)")
    ax.plot(cyc, [c["loss_finetuned"] for c in res["cycles"]], "s-", label=f"compiled + {res['steps']} steps")
    for name, style in (("random", ":"), ("shipped", "--")):
        ax.axhline(res["baselines"][name]["loss_finetuned"], linestyle=style, color="grey")
        ax.annotate(f"{name} start + {res['steps']} steps", (cyc[0], res["baselines"][name]["loss_finetuned"]),
                    textcoords="offset points", xytext=(0, 4), fontsize=8, color="grey")
    ax.set_xticks(cyc)
    ax.set_xlabel("cycle (compile -> fine-tune -> extract -> merge)")
    ax.set_ylabel("held-out loss (nats/token, retain.txt)")
    ax.set_title(f"Compiled initialisation, rank {res['rank']}, V={res['vocab_size']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps per start (default: 200)")
    parser.add_argument("--rank", type=int, default=32, help="compile rank K (default: 32)")
    parser.add_argument("--smoothing", type=float, default=0.05, help="compile smoothing (default: 0.05)")
    parser.add_argument("--work", help="working folder (default: a temporary one, removed after)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and the machine is shared
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="compiled-init-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    results = run(work, args.steps, args.rank, args.smoothing)
    results["wall_seconds"] = round(time.time() - start, 1)
    tag = "" if args.smoothing == 0.05 else f"_s{args.smoothing:g}"
    (HERE / f"COMPILED_INIT{tag}.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, HERE / f"compiled_init{tag}.png")
    print(table(results))
    print(f"wall time {results['wall_seconds']} s")
    if not args.work:
        shutil.rmtree(work)
