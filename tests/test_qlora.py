"""QLoRA: NF4 round trip, forward close to fp, gradients, what trains, PEFT on the fp base, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from adapter_helpers import ids, logits, randomize_adapters
from conftest import word_tokenizer
from lmtune.cli import main
from lmtune.config import load_config
from lmtune.errors import InputError
from lmtune.methods.adapters import disable_adapter, load_adapter
from lmtune.methods.lora_layer import LoRALinear, LoRASpec, lora_layers
from lmtune.quant import NF4_LEVELS, dequantize, nf4_nbytes, quant_nbytes, quantize

# Half the widest gap between neighbouring NF4 levels (0.7230 .. 1.0), relative to a block's absmax.
HALF_GAP = max(b - a for a, b in zip(NF4_LEVELS, NF4_LEVELS[1:])) / 2


def _llama(seed=0):
    """Hidden 128: q/o/MLP weights hold 16,384+ numbers (quantizable); k/v (64 × 128) do not."""
    torch.manual_seed(seed)
    tok = word_tokenizer()
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64, bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.bos_token_id, tie_word_embeddings=False)), tok


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from lmtune.models.loading import save_model

    model, tok = _llama()
    folder = tmp_path_factory.mktemp("qlora-llama")
    save_model(model, tok, folder)
    return folder


def _qlora(**overrides):
    from lmtune.methods.registry import METHODS

    model, tok = _llama()
    cfg = load_config(overrides={"method": "qlora", "lora.target_modules": "all-linear", **overrides})
    return METHODS["qlora"].prepare(model, tok, Path("base"), cfg), tok


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_round_trip_error_is_within_the_bound(double_quant):
    torch.manual_seed(0)
    w = torch.randn(256, 128) * 0.02  # (out, in); 32,768 weights = 512 blocks = 2 scaler blocks
    back = dequantize(quantize(w, 64, double_quant))
    absmax = w.view(-1, 64).abs().amax(dim=1, keepdim=True)  # (blocks, 1)
    err = (back - w).view(-1, 64).abs()  # (blocks, 64)
    # Rounding to the nearest level costs at most half a gap; 8-bit scales add up to 1/256 of
    # the scales' spread (double quantization).
    scale_err = (absmax - absmax.mean()).abs().max() / 256 if double_quant else 0.0
    assert (err <= HALF_GAP * absmax + scale_err + 1e-7).all()
    assert (back - w).norm() / w.norm() < 0.11  # ~0.1 for Gaussian weights (QLoRA paper, Fig. 2 regime)


def test_nf4_bytes_per_param_is_at_most_0_52_and_matches_the_closed_form():
    w = torch.randn(512, 256)
    q = quantize(w, 64, True)
    assert quant_nbytes(q) == nf4_nbytes(w.numel(), 64, True)
    assert quant_nbytes(q) / w.numel() <= 0.52
    assert quant_nbytes(quantize(w, 64, False)) == nf4_nbytes(w.numel(), 64, False) == w.numel() // 2 + 4 * 2048


def test_qlora_layer_forward_is_close_to_the_fp_layer():
    torch.manual_seed(0)
    base = nn.Linear(128, 256)
    nn.init.normal_(base.weight, std=0.02)
    x = torch.randn(8, 128)
    expected = base(x)
    layer = LoRALinear(base, quantize_base=True)
    assert base.weight is None  # only the 4-bit copy remains
    assert (layer(x) - expected).norm() / (expected - base.bias).norm() < 0.11


def test_qlora_model_logits_are_close_to_the_fp_model():
    prepared, _ = _qlora()
    fp, _ = _llama()
    x = ids()
    ours, theirs = logits(prepared.model, x), logits(fp, x)
    cos = torch.nn.functional.cosine_similarity(ours.flatten(), theirs.flatten(), dim=0)
    assert cos > 0.99


def test_gradients_reach_adapters_and_input_never_4bit_weights():
    base = nn.Linear(128, 128)
    layer = LoRALinear(base, quantize_base=True)
    layer.add_adapter("default", LoRASpec(r=4))
    x = torch.randn(3, 128, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert layer.lora_B["default"].weight.grad is not None
    assert not layer.weight_4bit.requires_grad and layer.weight_4bit.grad is None


def test_unquantizable_layers_stay_full_precision_and_are_listed(capsys):
    prepared, _ = _qlora()
    layers = lora_layers(prepared.model)
    kept = {n for n, layer in layers.items() if not layer.quantized}
    assert kept == {f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("k_proj", "v_proj")}
    assert sorted(kept) == prepared.summary["unquantized_layers"]
    assert "kept 4 linear layer(s) in full precision" in capsys.readouterr().out
    assert isinstance(prepared.model.lm_head, nn.Linear)  # the head stays as it was


def test_summary_reports_bytes_per_param_and_weight_memory():
    prepared, _ = _qlora()
    s = prepared.summary
    measured = sum(quant_nbytes(layer.weight_4bit) for layer in lora_layers(prepared.model).values()
                   if layer.quantized)
    quantized_params = sum(layer.in_features * layer.out_features for layer in lora_layers(prepared.model).values()
                           if layer.quantized)
    assert s["bytes_per_quantized_param"] == pytest.approx(measured / quantized_params) and measured > 0
    assert s["bytes_per_quantized_param"] <= 0.52
    assert s["weight_memory_mb"] < s["weight_memory_bf16_mb"] < s["weight_memory_fp32_mb"]


def test_disable_adapter_gives_the_4bit_base():
    prepared, _ = _qlora()
    x = ids()
    at_init = logits(prepared.model, x)
    randomize_adapters(prepared.model)
    assert (logits(prepared.model, x) - at_init).abs().max() > 1e-3
    with disable_adapter(prepared.model):
        torch.testing.assert_close(logits(prepared.model, x), at_init, atol=1e-5, rtol=0)


def test_merging_into_the_4bit_base_is_refused():
    layer = LoRALinear(nn.Linear(128, 128), quantize_base=True)
    layer.add_adapter("default", LoRASpec(r=4))
    with pytest.raises(InputError, match="lossy"):
        layer.merge("default")


def _state(model):
    out = {}
    for name, layer in lora_layers(model).items():
        if layer.quantized:
            out[name + ".nf4"] = layer.weight_4bit.quantized_data.clone()
    out.update({n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" not in n and
                "weight_4bit" not in n})
    return out


def test_training_changes_only_adapter_parameters(tmp_path):
    from lmtune.data.batching import pad_batch
    from lmtune.objectives.lm import lm_loss
    from lmtune.objectives.task import ExampleBatches, Task
    from lmtune.train import train

    prepared, tok = _qlora()
    before = _state(prepared.model)
    lora_before = {n: p.detach().clone() for n, p in prepared.model.named_parameters() if ".lora_" in n}
    examples = [{"input_ids": row, "labels": row} for row in ids(8, 6).tolist()]
    cfg = load_config(overrides={"method": "qlora", "objective": "lm", "train.steps": 3, "train.batch_size": 4,
                                 "train.lr": 1e-2})
    batches = ExampleBatches(examples, lambda e: pad_batch(e, 0), cfg.train.batch_size, cfg.train.seed)
    task = Task(model=prepared.model, batches=batches, loss=lm_loss, save=prepared.save)
    train(task, cfg.train, tmp_path, log=None)
    after = _state(prepared.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(p, lora_before[n]) for n, p in prepared.model.named_parameters() if ".lora_" in n)


def test_qlora_run_saves_an_adapter_peft_loads_onto_the_fp_base(llama_dir, corpus, tmp_path):
    from peft import PeftModel

    from lmtune.models.loading import load_causal_lm
    from lmtune.run import run_training
    from lmtune.runlog import RunLog

    out = tmp_path / "run"
    cfg = load_config(overrides={"model": str(llama_dir), "data.train": str(corpus), "output_dir": str(out),
                                 "method": "qlora", "lora.target_modules": "all-linear", "train.steps": 3,
                                 "train.batch_size": 4, "train.lr": 1e-2})
    summary = run_training(cfg, log=RunLog(out, quiet=True, tensorboard=False)).summary
    assert summary["bytes_per_quantized_param"] <= 0.52
    assert any(torch.count_nonzero(t) for k, t in load_file(out / "adapter_model.safetensors").items() if "lora_B" in k)
    x = ids()
    peft = logits(PeftModel.from_pretrained(load_causal_lm(llama_dir), out), x)
    ours = logits(load_adapter(load_causal_lm(llama_dir), out), x)
    torch.testing.assert_close(ours, peft, atol=1e-5, rtol=0)
    assert main(["merge", "--model", str(llama_dir), "--adapter", str(out), "--out", str(tmp_path / "merged")]) == 0
    merged = logits(load_causal_lm(tmp_path / "merged"), x)
    torch.testing.assert_close(merged, ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("override, message", [
    ("quant.block_size=48", "positive power of two"),
    ("quant.block_size=0", "positive power of two"),
])
def test_bad_block_size_exits_2(llama_dir, corpus, tmp_path, capsys, override, message):
    assert main(["train", f"model={llama_dir}", f"data.train={corpus}", f"output_dir={tmp_path / 'o'}",
                 "method=qlora", "train.steps=1", override]) == 2
    assert message in capsys.readouterr().err


def test_model_with_no_quantizable_linear_layer_exits_2(gpt2_dir, corpus, tmp_path, capsys):
    assert main(["train", f"model={gpt2_dir}", f"data.train={corpus}", f"output_dir={tmp_path / 'o'}",
                 "method=qlora", "train.steps=1"]) == 2
    assert "no linear layer of GPT2LMHeadModel can be stored in NF4" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_qlora_layer_runs_forward_and_backward_on_gpu():
    layer = LoRALinear(nn.Linear(128, 256), quantize_base=True).cuda()
    layer.add_adapter("default", LoRASpec(r=4))
    x = torch.randn(4, 128, device="cuda", requires_grad=True)
    layer(x).sum().backward()
    assert x.grad.is_cuda and layer.lora_A["default"].weight.grad is not None


def test_streamed_loading_equals_loading_then_quantizing(llama_dir):
    from lmtune.methods.qlora import load_quantized
    from lmtune.methods.registry import METHODS
    from lmtune.models.loading import load_causal_lm

    cfg = load_config(overrides={"method": "qlora", "lora.target_modules": "all-linear"})
    apply = METHODS["qlora"].prepare
    streamed = load_quantized(llama_dir, cfg.quant)
    quantized = [layer for layer in lora_layers(streamed).values() if layer.quantized]
    assert len(quantized) == 10 and all(layer.base_layer.weight is None for layer in quantized)
    tok = word_tokenizer()
    a = apply(streamed, tok, llama_dir, cfg).model
    b = apply(load_causal_lm(llama_dir), tok, llama_dir, cfg).model
    x = ids()
    torch.testing.assert_close(logits(a, x), logits(b, x), atol=0, rtol=0)


def test_inspect_qlora_numbers_equal_the_run_summary():
    from lmtune.footprint import inspect_model

    prepared, _ = _qlora()
    cfg = load_config(overrides={"method": "qlora", "lora.target_modules": "all-linear"})
    row = inspect_model(lambda: _llama()[0], cfg)["qlora"]
    s = prepared.summary
    assert row["bytes_per_quantized_param"] == s["bytes_per_quantized_param"]
    assert row["base_weight_bytes"] / 2**20 == pytest.approx(s["weight_memory_mb"])
    assert row["weight_bytes_fp32"] / 2**20 == pytest.approx(s["weight_memory_fp32_mb"])
    assert row["unquantized_layers"] == s["unquantized_layers"]
