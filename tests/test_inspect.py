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
    assert row["quantized_layers"] == 2 * 7  # q k v o gate up down per block


def test_smollm2_shapes_all_quantize_and_bytes_per_param_equal_the_measured_nf4_bytes():
    from lmtune.quant import quantize

    def build():  # SmolLM2-135M's block: hidden 576, 9 heads, 3 KV heads of 64, MLP 1536
        with torch.device("meta"):
            return LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=576, num_hidden_layers=1,
                                                intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3))
    row = inspect_model(build, load_config(overrides={"method": "qlora"}))["qlora"]
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    measured = sum(quantize(torch.randn(shape)).nbytes() for shape in shapes)  # real buffers, padding included
    numel = sum(a * b for a, b in shapes)
    assert row["quantized_layers"] == 7
    assert row["bytes_per_quantized_param"] == measured / numel
    assert f"{numel:,} NF4 weights in {measured:,} B" in row["arithmetic"]["weights"]


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
    # the prediction is written next to the measured peak (this tiny model: mostly the process baseline)
    assert 0.75 < summary["predicted_peak_mb"] / summary["peak_rss_mb"] < 1.25


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
