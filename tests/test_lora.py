"""The LoRA layer (Linear, GPT-2 Conv1D, rsLoRA, DoRA), target matching, what trains, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from adapter_helpers import ids, logits
from conftest import build_model, word_tokenizer
from lmtune.cli import main
from lmtune.config import load_config
from lmtune.errors import InputError
from lmtune.methods.adapters import adapter_parameters, inject
from lmtune.methods.lora_layer import LoRALinear, LoRASpec
from lmtune.methods.targets import resolve_targets
from lmtune.run import run_training
from lmtune.runlog import RunLog
from lmtune.train import make_optimizer

TOL = 1e-5


def _layer(base, seed=0, **spec):
    torch.manual_seed(seed)
    layer = LoRALinear(base)
    layer.add_adapter("default", LoRASpec(**{"r": 3, "alpha": 6.0, **spec}))
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    return layer


def test_forward_is_wx_plus_scaled_bax_for_linear():
    base = nn.Linear(8, 5)
    layer = _layer(base)
    x = torch.randn(4, 8)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, in), (out, r)
    expected = x @ base.weight.T + base.bias + (6.0 / 3) * (x @ a.T @ b.T)
    torch.testing.assert_close(layer(x), expected, atol=TOL, rtol=0)


def test_conv1d_weight_is_read_transposed():
    base = Conv1D(5, 8)  # GPT-2 layout: weight (d_in=8, d_out=5)
    nn.init.normal_(base.weight)
    layer = _layer(base)
    x = torch.randn(2, 3, 8)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = x @ base.weight + base.bias + 2.0 * (x @ a.T @ b.T)
    assert (layer.in_features, layer.out_features) == (8, 5)
    torch.testing.assert_close(layer(x), expected, atol=TOL, rtol=0)


def test_rslora_scales_by_alpha_over_sqrt_r():
    base = nn.Linear(16, 16)
    plain, rs = _layer(base, r=4, alpha=8.0), _layer(base, r=4, alpha=8.0, rslora=True)
    x = torch.randn(3, 16)
    base_out = base(x)
    assert rs.specs["default"].scaling == pytest.approx(8.0 / math.sqrt(4))
    ratio = (rs(x) - base_out) / (plain(x) - base_out)  # same A and B (same seed): only the scale differs
    torch.testing.assert_close(ratio, torch.full_like(ratio, (8 / 2) / (8 / 4)), atol=1e-4, rtol=0)


def test_default_init_is_kaiming_a_and_zero_b():
    layer = LoRALinear(nn.Linear(64, 32))
    layer.add_adapter("default", LoRASpec(r=8))
    a = layer.lora_A["default"].weight
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    assert a.abs().max() <= 1 / math.sqrt(64) + 1e-6  # kaiming_uniform(a=√5) bound = 1/√fan_in


def test_gaussian_init_draws_a_with_std_one_over_r():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(512, 512))
    layer.add_adapter("default", LoRASpec(r=4, init="gaussian"))
    assert layer.lora_A["default"].weight.std().item() == pytest.approx(1 / 4, rel=0.05)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0


@pytest.mark.parametrize("dora", [False, True])
def test_adapter_at_init_changes_nothing(model_dir, dora):
    from lmtune.models.loading import load_causal_lm

    base, model = load_causal_lm(model_dir), load_causal_lm(model_dir)
    inject(model, resolve_targets(model, "all-linear"), LoRASpec(r=4, dora=dora))
    x = ids()
    assert torch.equal(logits(model, x), logits(base, x))


def test_dora_matches_the_paper_formula():
    base = nn.Linear(8, 6)
    layer = _layer(base, dora=True)
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].mul_(torch.linspace(0.5, 1.5, 6))
    s, a, b = 2.0, layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"]
    adapted = base.weight + s * b @ a  # (out, in)
    direction = adapted / adapted.norm(dim=1, keepdim=True)
    x = torch.randn(5, 8)
    torch.testing.assert_close(layer(x), x @ (m.unsqueeze(1) * direction).T + base.bias, atol=TOL, rtol=0)


def test_dora_norm_gets_no_gradient():
    base = nn.Linear(8, 6)
    layer = _layer(base, dora=True)
    x = torch.randn(5, 8)
    layer(x).pow(2).sum().backward()
    s, a, b = 2.0, layer.lora_A["default"].weight, layer.lora_B["default"].weight
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    m = layer.lora_magnitude_vector["default"].detach()
    adapted = base.weight + s * b2 @ a2
    norm = adapted.norm(dim=1, keepdim=True).detach()  # the paper's §4.3: treated as a constant
    (x @ (m.unsqueeze(1) * adapted / norm).T + base.bias).pow(2).sum().backward()
    torch.testing.assert_close(a.grad, a2.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.grad, b2.grad, atol=1e-4, rtol=1e-4)


def test_lora_param_count_is_r_times_in_plus_out():
    layer = LoRALinear(nn.Linear(4096, 4096, bias=False, device="meta"))
    layer.add_adapter("default", LoRASpec(r=16))
    n = sum(p.numel() for p in layer.adapter_params("default"))
    assert n == 16 * (4096 + 4096) == 131_072 == 4096 * 4096 // 128


def _applied(arch, **overrides):
    from lmtune.methods.registry import METHODS

    tok = word_tokenizer()
    model = build_model(arch, tok)
    cfg = load_config(overrides={"method": "lora", "lora.target_modules": "all-linear", "lora.r": 4, **overrides})
    return METHODS["lora"].prepare(model, tok, Path("base"), cfg)


def test_only_adapter_params_get_gradients():
    model = _applied("llama").model
    model(ids(), labels=ids()).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_" in n for n in with_grad)
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n)


def test_adapter_init_follows_train_seed():
    def a_weights(seed):
        model = _applied("gpt2", **{"train.seed": seed}).model
        return [p for n, p in model.named_parameters() if "lora_A" in n]

    first, again, other = a_weights(3), a_weights(3), a_weights(4)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not all(torch.equal(x, y) for x, y in zip(first, other))


def test_optimizer_sees_only_adapter_params():
    model = _applied("gpt2", **{"lora.dora": True}).model
    optimizer = make_optimizer(model, load_config().train)
    seen = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert seen == {id(p) for p in adapter_parameters(model)}


# ---- targets --------------------------------------------------------------------------------

def test_default_targets_follow_the_architecture():
    tok = word_tokenizer()
    assert [n.rsplit(".", 1)[1] for n in resolve_targets(build_model("gpt2", tok), None)] == ["c_attn"] * 2
    assert {n.rsplit(".", 1)[1] for n in resolve_targets(build_model("llama", tok), None)} == {"q_proj", "v_proj"}


def test_all_linear_leaves_out_the_output_head():
    model = build_model("llama", word_tokenizer())
    names = resolve_targets(model, "all-linear")
    assert "lm_head" not in names and len(names) == 2 * 7


def test_regex_target_matches_full_names():
    model = build_model("llama", word_tokenizer())
    assert resolve_targets(model, r".*\.1\.self_attn\.(q|k)_proj") == ["model.layers.1.self_attn.q_proj",
                                                                       "model.layers.1.self_attn.k_proj"]


def test_dotted_suffix_target():
    model = build_model("gpt2", word_tokenizer())
    assert resolve_targets(model, ["h.0.mlp.c_fc"]) == ["transformer.h.0.mlp.c_fc"]


def test_unknown_target_lists_the_linear_modules():
    with pytest.raises(InputError, match=r"'q_proj' matches no linear layer.*c_attn, c_proj, c_fc"):
        resolve_targets(build_model("gpt2", word_tokenizer()), ["q_proj"])


def test_every_unmatched_name_is_an_error_even_when_another_matched():
    with pytest.raises(InputError, match="'v_proj'"):
        resolve_targets(build_model("gpt2", word_tokenizer()), ["c_attn", "v_proj"])


def test_target_that_is_not_a_linear_layer_is_an_error():
    with pytest.raises(InputError, match="Embedding"):
        resolve_targets(build_model("gpt2", word_tokenizer()), ["wte"])


def test_dora_on_a_layer_it_cannot_decompose_is_an_error():
    with pytest.raises(InputError, match="DoRA.*Embedding|Embedding.*DoRA"):
        resolve_targets(build_model("llama", word_tokenizer()), ["embed_tokens"], dora=True)


def test_rank_larger_than_the_layer_is_an_error():
    layer = LoRALinear(nn.Linear(8, 4))
    with pytest.raises(InputError, match="lora.r=5 is larger than the layer"):
        layer.add_adapter("default", LoRASpec(r=5))


# ---- through a run --------------------------------------------------------------------------

def _train(model_dir, corpus, out, **extra):
    cfg = load_config(overrides={"model": str(model_dir), "data.train": str(corpus), "output_dir": str(out),
                                 "method": "lora", "train.steps": 3, "train.batch_size": 4, "train.lr": 1e-2,
                                 **extra})
    return run_training(cfg, log=RunLog(out, quiet=True, tensorboard=False)).summary


def test_lora_run_trains_only_the_adapter_and_reports_counts(gpt2_dir, corpus, tmp_path):
    summary = _train(gpt2_dir, corpus, tmp_path / "run", **{"lora.r": 2})
    d = 32  # tiny GPT-2: c_attn is Conv1D 32 -> 96, two blocks
    assert summary["trainable_params"] == summary["adapter_params"] == 2 * 2 * (d + 3 * d)
    assert summary["trainable_ratio"] == pytest.approx(summary["trainable_params"] / summary["total_params"])
    saved = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert sum(t.numel() for t in saved.values()) == summary["trainable_params"]
    assert any(torch.count_nonzero(t) for k, t in saved.items() if "lora_B" in k)  # it learned something


@pytest.mark.parametrize("overrides, message", [
    (["lora.r=0"], "lora.r"), (["lora.alpha=0"], "lora.alpha"), (["lora.dropout=1.0"], "lora.dropout"),
    (["lora.r=64"], "larger than the layer"), (["lora.target_modules=[c_attn,nope]"], "'nope' matches no linear"),
    (["lora.dora=true", "lora.target_modules=[wte]"], "DoRA decomposes a weight matrix per output"),
])
def test_bad_lora_settings_exit_with_code_2(gpt2_dir, corpus, tmp_path, capsys, overrides, message):
    code = main(["train", f"model={gpt2_dir}", f"data.train={corpus}", f"output_dir={tmp_path / 'o'}",
                 "method=lora", "train.steps=1", *overrides])
    assert code == 2
    assert message in capsys.readouterr().err
