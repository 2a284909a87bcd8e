"""Prompt tuning: the soft prompt, PEFT's format both ways, what trains, init, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapter_helpers import ids, logits
from conftest import build_model, word_tokenizer
from lmtune.cli import main
from lmtune.config import load_config
from lmtune.errors import InputError
from lmtune.methods.adapters import disable_adapter, load_adapter
from lmtune.methods.prompt_tuning import PromptTuned, save_prompt_adapter
from lmtune.methods.registry import METHODS

TOL = 1e-5


def _prompted(arch, n=3, init="random", seed=0):
    tok = word_tokenizer()
    cfg = load_config(overrides={"method": "prompt_tuning", "prompt_tuning.num_virtual_tokens": n,
                                 "prompt_tuning.init": init, "train.seed": seed})
    return METHODS["prompt_tuning"].prepare(build_model(arch, tok), tok, Path("base"), cfg).model, tok


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_peft_loads_lmtune_prompt_with_equal_logits(tmp_path, arch):
    from peft import PeftModel

    model, tok = _prompted(arch, init="vocab")
    save_prompt_adapter(model, tmp_path / "pt", tok, "vocab")
    peft = PeftModel.from_pretrained(build_model(arch, tok), tmp_path / "pt")
    x = ids()
    theirs = logits(peft, x)[:, model.num_virtual_tokens:]  # PEFT returns the virtual positions too
    torch.testing.assert_close(logits(model, x), theirs, atol=TOL, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lmtune_loads_peft_prompt_adapter(tmp_path, arch):
    from peft import PromptTuningConfig, get_peft_model

    peft = get_peft_model(build_model(arch, word_tokenizer()),
                          PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    peft.save_pretrained(tmp_path / "peft")
    ours = load_adapter(build_model(arch, word_tokenizer()), tmp_path / "peft")
    assert isinstance(ours, PromptTuned) and ours.num_virtual_tokens == 4
    x = ids()
    torch.testing.assert_close(logits(ours, x), logits(peft, x)[:, 4:], atol=TOL, rtol=0)


def test_attention_mask_keeps_padded_rows_equal_to_unpadded():
    model, _ = _prompted("llama")
    x = ids(batch=1, length=5)
    padded = torch.cat([x, torch.zeros(1, 2, dtype=torch.long)], dim=1)  # right padding
    mask = torch.tensor([[1] * 5 + [0] * 2])
    with torch.no_grad():
        torch.testing.assert_close(model(padded, attention_mask=mask)[:, :5], model(x), atol=TOL, rtol=0)


def test_prompt_changes_the_output_and_disable_adapter_skips_it():
    model, tok = _prompted("gpt2")
    base = build_model("gpt2", tok)
    x = ids()
    assert (logits(model, x) - logits(base, x)).abs().max() > 1e-3
    with disable_adapter(model):
        torch.testing.assert_close(logits(model, x), logits(base, x), atol=TOL, rtol=0)
    assert model.prompt_enabled


def test_vocab_and_text_inits_copy_embedding_rows():
    model, tok = _prompted("gpt2", n=5, init="text: the cat")
    table = model.get_input_embeddings().weight
    cat, the = tok.convert_tokens_to_ids("cat"), tok.convert_tokens_to_ids("the")
    torch.testing.assert_close(model.prompt_embeddings.data, table[[the, cat, the, cat, the]])
    vocab_model, _ = _prompted("gpt2", n=4, init="vocab")
    rows = vocab_model.prompt_embeddings.data
    assert all((table == row).all(dim=1).any() for row in rows)


def test_unknown_init_is_an_error():
    with pytest.raises(InputError, match="random, vocab, or text:<words>"):
        _prompted("gpt2", init="zeros")


def test_training_changes_only_the_prompt(gpt2_dir, corpus, tmp_path):
    from lmtune.run import run_training
    from lmtune.runlog import RunLog

    cfg = load_config(overrides={"model": str(gpt2_dir), "data.train": str(corpus), "output_dir": str(tmp_path / "r"),
                                 "method": "prompt_tuning", "prompt_tuning.num_virtual_tokens": 4,
                                 "train.steps": 3, "train.batch_size": 4, "train.lr": 0.1})
    summary = run_training(cfg, log=RunLog(tmp_path / "r", quiet=True, tensorboard=False)).summary
    assert summary["trainable_params"] == summary["adapter_params"] == 4 * 32
    saved = load_file(tmp_path / "r" / "adapter_model.safetensors")
    assert list(saved) == ["prompt_embeddings"] and saved["prompt_embeddings"].shape == (4, 32)
    assert main(["generate", "--model", str(gpt2_dir), "--adapter", str(tmp_path / "r"), "--prompt", "the cat",
                 "--max-new-tokens", "3"]) == 0


def test_merging_a_prompt_adapter_exits_2(tmp_path, gpt2_dir, capsys):
    model, tok = _prompted("gpt2")
    save_prompt_adapter(model, tmp_path / "pt", tok)
    assert main(["merge", "--model", str(gpt2_dir), "--adapter", str(tmp_path / "pt"),
                 "--out", str(tmp_path / "m")]) == 2
    assert "nothing to merge" in capsys.readouterr().err


def test_prompt_adapter_for_another_hidden_size_is_refused(tmp_path):
    model, tok = _prompted("gpt2")
    save_prompt_adapter(model, tmp_path / "pt", tok)
    (tmp_path / "pt" / "lmtune.json").unlink()
    from transformers import GPT2Config, GPT2LMHeadModel

    wider = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=48, n_layer=1, n_head=2))
    with pytest.raises(InputError, match="another base model"):
        load_adapter(wider, tmp_path / "pt")
