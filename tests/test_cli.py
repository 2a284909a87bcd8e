"""The command line: train/pretrain/generate/demo end to end, exit codes, fast help."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmtune.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_train_from_yaml_with_overrides(gpt2_dir, corpus, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {gpt2_dir}\nmethod: full\ndata:\n  train: {corpus}\n"
                      f"train:\n  steps: 2\n  lr: 1.0e-3\n  batch_size: 4\n")
    out = tmp_path / "run"
    assert main(["train", str(config), f"output_dir={out}", "train.steps=3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3  # the override wins over the file
    assert "step 1/3 | loss" in capsys.readouterr().out


def test_every_example_config_is_valid():
    from lmtune.config import load_config

    configs = sorted((REPO / "examples").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


def test_pretrain_builds_word_tokenizer_and_model(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import SENTENCES, write_lines

    corpus = write_lines(tmp_path / "c.txt", SENTENCES * 4)
    out = tmp_path / "pre"
    assert main(["pretrain", "--corpus", str(corpus), "--out", str(out), "train.steps=30",
                 "train.batch_size=8"]) == 0
    words = sorted({w for s in SENTENCES for w in s.split()})
    tok = AutoTokenizer.from_pretrained(out)
    # The story's tokenizer: sorted unique words, then BOS.
    assert [tok.convert_ids_to_tokens(i) for i in range(len(words))] == words
    assert tok.convert_ids_to_tokens(len(words)) == tok.bos_token
    printed = capsys.readouterr().out
    assert f"vocab size: {len(words) + 1} ({len(words)} words + BOS)" in printed
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(math.log(len(words) + 1), abs=0.3)  # random model ~ ln(V)
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    AutoModelForCausalLM.from_pretrained(out)


def test_generate_is_greedy_and_seeded(capsys):
    assert main(["generate", "--prompt", "the cat", "--max-new-tokens", "5"]) == 0
    first = capsys.readouterr().out
    assert main(["generate", "--prompt", "the cat", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == first and first.strip()
    args = ["generate", "--prompt", "the cat", "--temperature", "1.0", "--seed", "3", "--max-new-tokens", "8"]
    assert main(args) == 0
    sampled = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == sampled


def test_input_error_exits_2_with_one_line(tmp_path, capsys):
    code = main(["train", "data.train=nope.txt", f"output_dir={tmp_path / 'x'}", "train.lrr=1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown config key 'train.lrr'" in err and "train.lr" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_help_answers_fast_without_heavy_imports():
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", "import sys, lmtune.cli as c; c.build_parser(); "
                           "print('torch' in sys.modules, 'transformers' in sys.modules)"],
                          capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ["False", "False"]
    proc = subprocess.run([sys.executable, "-m", "lmtune", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "demo" in proc.stdout
    assert time.perf_counter() - start < 5  # two interpreter starts; each well under a second


def test_demo_tells_the_story(tmp_path, capsys):
    from lmtune.demo import run_demo

    summary = run_demo(tmp_path / "demo", steps=20)
    arms = summary["arms"]
    # The point of fine-tuning: the pre-trained model starts far below a random model.
    assert arms["finetune-full"]["first_loss"] < summary["ln_vocab"] - 1.5
    assert arms["finetune-full"]["first_loss"] < arms["from-scratch"]["first_loss"] - 1.5
    assert arms["finetune-full"]["eval_loss"] < arms["from-scratch"]["eval_loss"]
    assert (tmp_path / "demo" / "loss.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["steps"] == 20
    printed = capsys.readouterr().out
    for line in ("vocab size:", "loaded pre-trained model:", "fine-tuning sentences:", "step 1/20 | loss",
                 "samples before fine-tuning:", "samples after fine-tuning:"):
        assert line in printed
