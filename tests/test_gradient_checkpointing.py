"""``train.gradient_checkpointing``: same gradients as the plain run, blocks really recomputed."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from adapter_helpers import ids, randomize_adapters
from conftest import word_tokenizer
from lmtune.config import load_config
from lmtune.errors import InputError
from lmtune.methods.registry import METHODS
from lmtune.recompute import enable_gradient_checkpointing


def _prepared(method):
    torch.manual_seed(0)
    tok = word_tokenizer()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64, tie_word_embeddings=False))
    cfg = load_config(overrides={"method": method, "lora.target_modules": "all-linear", "freeze.layers": 1,
                                 "prompt_tuning.num_virtual_tokens": 3})
    prepared = METHODS[method].prepare(model, tok, "base", cfg).model
    randomize_adapters(prepared)  # B = 0 would give A no gradient to compare
    return prepared.train()


def _grads(model, x):
    out = model(x)
    logits = out if torch.is_tensor(out) else out.logits  # (B, T, V)
    F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _block_forwards(model):
    """A counter of decoder-block forward calls (2 per step when checkpointed: forward + recompute)."""
    calls = []
    norm = next(m for n, m in model.named_modules() if n.endswith("layers.2.input_layernorm"))
    # A pre-hook on the block's first module: recomputation stops early once what backward needs
    # is rebuilt, so a hook on the block's end would not see it.
    norm.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("method", ["full", "freeze", "lora", "qlora", "prompt_tuning"])
def test_checkpointed_gradients_equal_the_plain_run(method):
    plain = _prepared(method)
    checkpointed = copy.deepcopy(plain)
    enable_gradient_checkpointing(checkpointed)
    calls = _block_forwards(checkpointed)
    x = ids(2, 9)
    expected, got = _grads(plain, x), _grads(checkpointed, x)
    assert len(calls) == 2  # the last block ran again in backward: activations were not kept
    assert expected.keys() == got.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=0, msg=name)


def test_a_model_without_checkpointing_support_is_refused_naming_the_key():
    with pytest.raises(InputError, match="train.gradient_checkpointing"):
        enable_gradient_checkpointing(torch.nn.Linear(3, 3))


def test_the_config_key_turns_it_on_in_a_run(model_dir, corpus, tmp_path, monkeypatch):
    import lmtune.run
    from lmtune.run import run_training
    from lmtune.runlog import RunLog

    enabled = []
    original = lmtune.run.enable_gradient_checkpointing
    monkeypatch.setattr(lmtune.run, "enable_gradient_checkpointing", lambda m: enabled.append(original(m)))
    cfg = load_config(overrides={"model": str(model_dir), "data.train": str(corpus), "output_dir": str(tmp_path / "r"),
                                 "method": "lora", "train.steps": 1, "train.batch_size": 2,
                                 "train.gradient_checkpointing": True})
    summary = run_training(cfg, log=RunLog(tmp_path / "r", quiet=True, tensorboard=False)).summary
    assert len(enabled) == 1 and enabled[0].is_gradient_checkpointing
    assert summary["steps"] == 1
