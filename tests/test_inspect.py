"""``lmtune inspect``: counts match the closed forms and what a run reports in summary.json."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmtune.cli import main
from lmtune.config import load_config
from lmtune.footprint import inspect_model, run_inspect
from lmtune.run import run_training
from lmtune.runlog import RunLog


def _meta_llama(hidden=4096, layers=1, inter=None):
    def build():
        with torch.device("meta"):
            return LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=hidden, num_hidden_layers=layers,
                                                intermediate_size=inter or 2 * hidden, num_attention_heads=8,
                                                num_key_value_heads=8))
    return build


def test_lora_on_a_4096_square_matrix_has_131072_parameters():
    cfg = load_config(overrides={"lora.r": 16, "lora.target_modules": ["q_proj"]})
    row = inspect_model(_meta_llama(), cfg)["lora"]
    assert row["trainable_params"] == 16 * (4096 + 4096) == 131_072 == 4096 * 4096 // 128


def test_memory_is_weights_plus_fp32_grads_plus_two_adam_moments():
    cfg = load_config(overrides={"lora.r": 4})
    rows = inspect_model(_meta_llama(hidden=64, layers=2), cfg)
    for method in ("full", "lora", "prompt_tuning"):
        row = rows[method]
        assert row["weight_bytes"] == 4 * row["total_params"]
        assert row["train_bytes"] == 4 * row["total_params"] + 4 * row["trainable_params"] + 8 * row["trainable_params"]
    assert rows["full"]["trainable_params"] == rows["full"]["total_params"]


def test_qlora_row_reports_nf4_bytes_per_param_and_weight_memory():
    cfg = load_config(overrides={"method": "qlora"})
    row = inspect_model(_meta_llama(hidden=256, layers=2), cfg)["qlora"]
    assert row["bytes_per_quantized_param"] <= 0.52
    assert row["weight_bytes"] < row["weight_bytes_bf16"] < row["weight_bytes_fp32"]
    assert row["unquantized_layers"] == []


@pytest.mark.parametrize("method, extra", [("lora", {"lora.r": 2, "lora.dora": True,
                                                    "lora.target_modules": "all-linear"}),
                                           ("prompt_tuning", {"prompt_tuning.num_virtual_tokens": 3}),
                                           ("full", {})])
def test_inspect_counts_equal_summary_json(model_dir, corpus, tmp_path, method, extra):
    overrides = {"method": method, **extra}
    cfg = load_config(overrides={"model": str(model_dir), "data.train": str(corpus), "output_dir": str(tmp_path / "r"),
                                 "train.steps": 1, "train.batch_size": 2, **overrides})
    summary = run_training(cfg, log=RunLog(tmp_path / "r", quiet=True, tensorboard=False)).summary
    row = run_inspect(str(model_dir), [f"{k}={json.dumps(v)}" for k, v in overrides.items()])["methods"][method]
    assert (row["total_params"], row["trainable_params"]) == (summary["total_params"], summary["trainable_params"])


def test_cli_prints_the_arithmetic_and_json(gpt2_dir, capsys):
    assert main(["inspect", "--model", str(gpt2_dir), "method=lora"]) == 0
    text = capsys.readouterr().out
    assert "lora   <- this config" in text and "× 8 B (two fp32 moments)" in text
    assert main(["inspect", "--model", str(gpt2_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["methods"]) >= {"full", "lora", "qlora", "prompt_tuning"}


def test_inspect_bad_key_exits_2(gpt2_dir, capsys):
    assert main(["inspect", "--model", str(gpt2_dir), "lora.rank=4"]) == 2
    assert "lora.r" in capsys.readouterr().err
