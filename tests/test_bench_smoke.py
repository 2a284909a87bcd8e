"""The benchmark's fixed inputs: every arm must see the same token ids lmtune builds itself.

The benchmark (``benchmarks/run_bench.py``) is a script, not a timed test; these checks cover
the pieces whose mistakes would silently void its comparisons (framing, order, timing windows),
and the CLI latency fix it measured. Each runs in well under a second or two.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import common as bench  # noqa: E402  (benchmarks/ is a script folder, not a package)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    gen = bench.TextGen(seed=3, n_words=400)
    return bench.train_tokenizer([gen.text(60) for _ in range(40)], 400, tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def pairs():
    return bench.make_pairs(6, tokens_per_word=3.0, seed=5)


def test_sft_framing_equals_lmtune_prompt_completion(bpe, pairs):
    from lmtune.data.examples import BuildStats
    from lmtune.data.formats import prompt_completion_ids

    for r in pairs[0]:
        want = prompt_completion_ids(bpe, r["prompt"], r["completion"], 10_000, BuildStats())
        assert bench.sft_ids(bpe, r["prompt"], r["completion"]) == want


def test_preference_framing_equals_lmtune_pairs_and_trl_text(bpe, pairs):
    from lmtune.data.preference import build_pairs
    from lmtune.data.readers import Record

    for r in pairs[1]:
        ids = bench.pref_ids(bpe, r["prompt"], r["chosen"], r["rejected"])
        record = Record({"prompt": r["prompt"], "chosen": " " + r["chosen"], "rejected": " " + r["rejected"]}, "t")
        (pair,), _ = build_pairs([record], bpe, 10_000)
        assert [pair["prompt_ids"], pair["chosen_ids"], pair["rejected_ids"]] == [
            ids["prompt_ids"], ids["chosen_ids"], ids["rejected_ids"]]
        # TRL tokenizes prompt + completion as one text with BOS and EOS written out.
        text = bpe.encode("<s>" + r["prompt"] + " " + r["chosen"] + "</s>", add_special_tokens=False)
        assert text == ids["prompt_ids"] + ids["chosen_ids"]


def test_peers_read_lmtune_batch_order():
    from lmtune.data.batching import epoch_order

    items = list(range(10))
    assert bench.ordered(items, epochs=2) == epoch_order(10, bench.SEED, 0) + epoch_order(10, bench.SEED, 1)


def test_window_rates_skip_warmup_and_sum_tokens_over_time():
    steps = [{"seconds": 9.0, "tokens": 1}] + [{"seconds": s, "tokens": 100} for s in (1.0, 1.0, 2.0, 2.0)]
    assert bench.window_rates(steps, warmup=1, window=2) == [100.0, 50.0]
    assert bench.median([3.0, 1.0, 2.0]) == 2.0


def test_config_error_is_reported_before_torch_is_imported(tmp_path):
    import os

    import lmtune

    code = ("import sys; from lmtune.cli import main; rc = main(['train', 'output_dir=x', 'no.such.key=1']); "
            "print(rc, 'torch' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(Path(lmtune.__file__).resolve().parents[1])}  # this checkout's lmtune
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.stdout.split() == ["2", "False"]


@pytest.fixture(scope="module")
def qlora_bench_base(tmp_path_factory):
    import qlora_memory  # noqa: E402  (benchmarks/ is on sys.path above)

    folder = tmp_path_factory.mktemp("qlora-bench") / "base"
    qlora_memory.SIZES["tiny"] = (2, 64, 128)  # the script's own base builder, at a test's size
    try:
        qlora_memory.build_base(folder, "tiny")
    finally:
        del qlora_memory.SIZES["tiny"]
    return folder


@pytest.mark.parametrize("arm", ["qlora", "qlora-trim"])
def test_qlora_memory_arm_runs_on_a_tiny_llama(qlora_bench_base, tmp_path, arm):
    # The script wraps lmtune's loop functions by name (accumulate_gradients, _optimizer_step,
    # evaluate_loss); a rename in the library must fail here, not in the next benchmark run.
    import json

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "qlora_memory.py"
    proc = subprocess.run([sys.executable, str(script), "--arm", arm, "--base", str(qlora_bench_base),
                           "--out", str(tmp_path / "o"), "--steps", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["arm"] == arm and row["steady_rss_mb"] > 0 and row["eval_loss"] > 0 and row["base_eval_loss"] > 0
