"""Merging adapters into the weights: merged == unmerged == PEFT, unmerge, ``lmtune merge``."""

from __future__ import annotations

import pytest
import torch

from adapter_helpers import adapted_model, ids, logits
from conftest import build_model, word_tokenizer
from lmtune.cli import main
from lmtune.methods.adapters import merge_adapter, merge_and_unload, save_adapter, unmerge_adapter
from lmtune.methods.lora_layer import lora_layers

TOL = 1e-5


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merged_logits_match_unmerged_and_peft(tmp_path, arch, dora):
    from peft import PeftModel

    model, tok = adapted_model(arch, dora=dora)
    save_adapter(model, tmp_path / "a", tok)
    x = ids()
    unmerged = logits(model, x)
    peft = logits(PeftModel.from_pretrained(build_model(arch, tok), tmp_path / "a"), x)
    merged_model = merge_and_unload(model)
    assert not any(".lora_" in n or "base_layer" in n for n, _ in merged_model.named_parameters())
    merged = logits(merged_model, x)
    torch.testing.assert_close(merged, unmerged, atol=TOL, rtol=0)
    torch.testing.assert_close(merged, peft, atol=TOL, rtol=0)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_unmerge_restores_the_base_weights(dora):
    model, tok = adapted_model("gpt2", dora=dora)
    base = build_model("gpt2", tok)
    x = ids()
    adapted = logits(model, x)
    merge_adapter(model)
    unmerge_adapter(model)
    torch.testing.assert_close(logits(model, x), adapted, atol=TOL, rtol=0)
    layers = lora_layers(model)
    assert layers
    for name, layer in layers.items():
        torch.testing.assert_close(layer.base_layer.weight, base.get_submodule(name).weight, atol=TOL, rtol=0)


def test_merge_command_writes_a_plain_transformers_model(tmp_path, model_dir):
    from transformers import AutoModelForCausalLM

    from lmtune.models.loading import load_model_and_tokenizer

    base, tok, _ = load_model_and_tokenizer(model_dir)
    arch = base.config.model_type
    adapted, _ = adapted_model("gpt2" if arch == "gpt2" else "llama")
    save_adapter(adapted, tmp_path / "adapter", tok)
    assert main(["merge", "--model", str(model_dir), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.state_dict().keys() == base.state_dict().keys()  # same modules: base-model speed
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    x = ids()
    torch.testing.assert_close(logits(merged, x), logits(adapted, x), atol=TOL, rtol=0)


def test_merging_into_the_wrong_base_exits_2(tmp_path, capsys):
    from lmtune.models.loading import save_model

    llama = tmp_path / "llama"
    save_model(build_model("llama", word_tokenizer()), word_tokenizer(), llama)
    model, tok = adapted_model("gpt2")
    save_adapter(model, tmp_path / "adapter", tok)
    assert main(["merge", "--model", str(llama), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 2
    assert "another base model" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


def test_merge_refuses_to_write_over_an_existing_folder(tmp_path, gpt2_dir, capsys):
    model, tok = adapted_model("gpt2")
    save_adapter(model, tmp_path / "adapter", tok)
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "keep.txt").write_text("mine")
    assert main(["merge", "--model", str(gpt2_dir), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 2
    assert "not empty" in capsys.readouterr().err
