"""Adapters in PEFT's layout, both directions, with PEFT as the oracle; fingerprints; switching."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapter_helpers import adapted_model, ids, logits, randomize_adapters, saved_adapter
from conftest import build_model, word_tokenizer
from lmtune.cli import main
from lmtune.errors import InputError
from lmtune.methods.adapters import (
    adapter_names,
    disable_adapter,
    load_adapter,
    save_adapter,
    set_active_adapter,
)

TOL = 1e-5
ARCHS = ["gpt2", "llama"]
VARIANTS = [{}, {"rslora": True}, {"dora": True}]


def _peft_model(arch, folder):
    from peft import PeftModel

    return PeftModel.from_pretrained(build_model(arch, word_tokenizer()), folder)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", VARIANTS, ids=["lora", "rslora", "dora"])
def test_peft_loads_lmtune_adapter_with_equal_logits(tmp_path, arch, spec):
    folder, model = saved_adapter(tmp_path, arch, **spec)
    x = ids()
    theirs, ours = logits(_peft_model(arch, folder), x), logits(model, x)
    assert (ours - logits(build_model(arch, word_tokenizer()), x)).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(ours, theirs, atol=TOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_lmtune_loads_peft_made_adapter_with_equal_logits(tmp_path, arch, dora):
    from peft import LoraConfig, get_peft_model

    targets = ["c_attn", "c_fc"] if arch == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    peft_model = get_peft_model(build_model(arch, word_tokenizer()),
                                LoraConfig(r=4, lora_alpha=16, target_modules=targets, use_dora=dora))
    randomize_adapters(peft_model, seed=3)  # non-zero B
    peft_model.save_pretrained(tmp_path / "peft")
    ours = load_adapter(build_model(arch, word_tokenizer()), tmp_path / "peft")
    x = ids()
    torch.testing.assert_close(logits(ours, x), logits(peft_model, x), atol=TOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)  # GPT-2: the head is tied to the embedding; Llama: untied
def test_lmtune_loads_peft_made_trainable_token_rows(tmp_path, arch):
    from peft import LoraConfig, get_peft_model

    def grown():
        model = build_model(arch, word_tokenizer())
        model.resize_token_embeddings(len(word_tokenizer()) + 3, mean_resizing=False)
        return model

    new = list(range(len(word_tokenizer()), len(word_tokenizer()) + 3))
    indices = new if arch == "gpt2" else {"embed_tokens": new, "lm_head": new}
    peft_model = get_peft_model(grown(), LoraConfig(r=4, trainable_token_indices=indices))
    randomize_adapters(peft_model, seed=3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn(p.shape) * 0.5)  # rows unlike the base's
    peft_model.save_pretrained(tmp_path / "peft")
    ours = load_adapter(build_model(arch, word_tokenizer()), tmp_path / "peft")  # lmtune grows the base itself
    x = torch.cat([ids(), torch.tensor([new + new[:1] * 4] * 2)], dim=1)  # (2, 14) with the new ids
    torch.testing.assert_close(logits(ours, x), logits(peft_model.eval(), x), atol=TOL, rtol=0)


def test_saved_config_has_peft_fields(tmp_path):
    folder, _ = saved_adapter(tmp_path, "gpt2", rslora=True)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["fan_in_fan_out"] is True and config["use_rslora"] is True and config["use_dora"] is False
    assert "transformer.h.0.attn.c_attn" in config["target_modules"]
    keys = load_file(folder / "adapter_model.safetensors")
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in keys
    assert (folder / "tokenizer.json").is_file()
    assert json.loads((folder / "lmtune.json").read_text())["base_fingerprint"]


def test_loading_onto_another_base_is_a_clear_error(tmp_path):
    folder, _ = saved_adapter(tmp_path, "gpt2")
    with pytest.raises(InputError, match="trained on another base model"):
        load_adapter(build_model("llama", word_tokenizer()), folder)


def test_peft_adapter_for_another_base_is_a_clear_error(tmp_path):
    folder, _ = saved_adapter(tmp_path, "gpt2")
    (folder / "lmtune.json").unlink()  # as PEFT would write it: no fingerprint to compare
    with pytest.raises(InputError, match="does not have as a linear layer"):
        load_adapter(build_model("llama", word_tokenizer()), folder)


def test_wrong_tensor_shape_is_a_clear_error(tmp_path):
    folder, _ = saved_adapter(tmp_path, "llama")
    (folder / "lmtune.json").unlink()
    tensors = load_file(folder / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    tensors[key] = torch.zeros(7, 4)
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(InputError, match=r"q_proj.lora_B.weight has shape \(7, 4\).*needs \(32, 4\)"):
        load_adapter(build_model("llama", word_tokenizer()), folder)


def test_wrong_shape_through_the_cli_exits_2(tmp_path, gpt2_dir, capsys):
    folder, _ = saved_adapter(tmp_path, "gpt2")
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"] = torch.zeros(4, 5)
    save_file(tensors, folder / "adapter_model.safetensors")
    assert main(["merge", "--model", str(gpt2_dir), "--adapter", str(folder), "--out", str(tmp_path / "m")]) == 2
    assert "has shape (4, 5)" in capsys.readouterr().err


@pytest.mark.parametrize("missing", ["adapter_config.json", "adapter_model.safetensors"])
def test_adapter_folder_missing_a_file_exits_2(tmp_path, capsys, gpt2_dir, missing):
    folder, _ = saved_adapter(tmp_path, "gpt2")
    (folder / missing).unlink()
    assert main(["generate", "--model", str(gpt2_dir), "--adapter", str(folder), "--prompt", "the cat"]) == 2
    assert f"missing {missing}" in capsys.readouterr().err


def test_adapter_with_another_tokenizer_is_refused(tmp_path):
    from lmtune.models.shipped import build_word_tokenizer

    folder, _ = saved_adapter(tmp_path, "gpt2")
    other = build_word_tokenizer(["zebra quartz", "another tokenizer entirely ."])
    with pytest.raises(InputError, match="another tokenizer"):
        load_adapter(build_model("gpt2", word_tokenizer()), folder, tokenizer=other)


def test_generate_uses_an_adapter_without_merging(tmp_path, gpt2_dir, capsys):
    from lmtune.models.loading import load_model_and_tokenizer

    base, tok, _ = load_model_and_tokenizer(gpt2_dir)
    model, _ = adapted_model("gpt2")
    folder = tmp_path / "a"
    save_adapter(model, folder, tok)
    assert main(["generate", "--model", str(gpt2_dir), "--adapter", str(folder), "--prompt", "the cat",
                 "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()
    assert not any("lora" in n for n, _ in base.named_parameters())


def test_several_adapters_load_by_name_and_switch(tmp_path):
    first, m1 = saved_adapter(tmp_path, "llama", name="first")
    second, m2 = saved_adapter(tmp_path, "llama", name="second", targets=["k_proj"], seed=9)
    model = build_model("llama", word_tokenizer())
    load_adapter(model, first, adapter="first")
    load_adapter(model, second, adapter="second")
    assert adapter_names(model) == ["first", "second"]
    x = ids()
    torch.testing.assert_close(logits(model, x), logits(m2, x), atol=TOL, rtol=0)  # the last loaded is active
    set_active_adapter(model, "first")
    torch.testing.assert_close(logits(model, x), logits(m1, x), atol=TOL, rtol=0)
    with pytest.raises(InputError, match="no adapter named 'third'"):
        set_active_adapter(model, "third")


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_disable_adapter_returns_base_outputs_then_restores(dora):
    model, tok = adapted_model("gpt2", dora=dora)
    base = build_model("gpt2", tok)
    x = ids()
    adapted = logits(model, x)
    with disable_adapter(model):
        torch.testing.assert_close(logits(model, x), logits(base, x), atol=0, rtol=0)
    torch.testing.assert_close(logits(model, x), adapted, atol=0, rtol=0)


def test_disable_adapter_on_a_merged_model_still_gives_the_base():
    from lmtune.methods.adapters import merge_adapter

    model, tok = adapted_model("llama")
    x = ids()
    adapted = logits(model, x)
    merge_adapter(model)
    with disable_adapter(model):
        torch.testing.assert_close(logits(model, x), logits(build_model("llama", tok), x), atol=TOL, rtol=0)
    torch.testing.assert_close(logits(model, x), adapted, atol=TOL, rtol=0)


def test_disable_adapter_without_an_adapter_is_an_error():
    with pytest.raises(ValueError, match="no adapter"), disable_adapter(build_model("gpt2", word_tokenizer())):
        pass
