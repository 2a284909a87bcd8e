"""The peak-memory prediction: its arithmetic, and its activation count against autograd's saved tensors."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import word_tokenizer
from lmtune.config import load_config
from lmtune.footprint import activation_numbers, architecture, predict_peak
from lmtune.methods.registry import METHODS
from lmtune.objectives.lm import lm_loss


def _llama(hidden, inter, layers, kv_heads=2, vocab=500):
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=kv_heads, tie_word_embeddings=False)


def _saved_numbers_per_token(config, method, tokens=(2, 48)):
    """Numbers autograd keeps for backward per token (unique storages, parameters excluded): the oracle."""
    torch.manual_seed(0)
    cfg = load_config(overrides={"method": method, "lora.target_modules": "all-linear", "lora.r": 8})
    model = METHODS[method].prepare(LlamaForCausalLM(config), word_tokenizer(), "base", cfg).model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    x = torch.randint(0, config.vocab_size, tokens)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lm_loss(model, {"input_ids": x, "labels": x, "attention_mask": torch.ones_like(x)})
    positions = x.numel() + (x.shape[0] * cfg.prompt_tuning.num_virtual_tokens if method == "prompt_tuning" else 0)
    return sum(n for ptr, n in seen.items() if ptr not in params) / 4 / positions


@pytest.mark.parametrize("method", ["full", "lora", "qlora", "prompt_tuning"])
@pytest.mark.parametrize("shape", [(96, 320, 3, 2), (192, 256, 2, 1)])
def test_activation_count_matches_what_autograd_saves(method, shape):
    hidden, inter, layers, kv_heads = shape
    config = _llama(hidden, inter, layers, kv_heads)
    adapters = 7 if method in ("lora", "qlora") else 0  # all-linear: q k v o gate up down
    predicted = activation_numbers(architecture(config), method, lora_r=8, adapters_per_block=adapters)["total"]
    measured = _saved_numbers_per_token(config, method)
    assert predicted == pytest.approx(measured, rel=0.08)


def test_architecture_reads_llama_and_gpt2_configs():
    from transformers import GPT2Config

    arch = architecture(_llama(96, 320, 3, kv_heads=2))
    assert (arch["hidden"], arch["inter"], arch["layers"], arch["kv"], arch["gated"]) == (96, 320, 3, 48, True)
    gpt = architecture(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100))
    assert (gpt["hidden"], gpt["inter"], gpt["layers"], gpt["kv"], gpt["gated"]) == (64, 256, 2, 64, False)


ROW = {"weight_bytes": 1000, "gradient_bytes": 40, "optimizer_bytes": 80, "lora_target_modules": 14}
ARCH = {"hidden": 64, "inter": 256, "layers": 2, "kv": 32, "vocab": 1000, "gated": True}


def test_head_part_is_one_chunk_capped_at_32_mib_of_fp32_logits():
    big = {**ARCH, "vocab": 32000}
    p = predict_peak(ROW, big, method="lora", objective="lm", batch_size=8, seq_len=128, lora_r=8)
    rows = 32 * 2**20 // (4 * 32000)  # 262 of the 1,024 tokens: the chunk the head really computes
    assert rows == 262 and p["parts"]["head"] == 2 * rows * 32000 * 4


def test_peak_is_the_sum_of_its_parts_in_closed_form():
    p = predict_peak(ROW, ARCH, method="lora", objective="lm", batch_size=4, seq_len=32, lora_r=8,
                     baseline_bytes=5e8)
    tokens = 4 * 32
    per_block = 6 * 64 + 2 * 32 + 4 * 256 + 8 * 7  # 7 adapters of rank 8 per block
    assert p["parts"]["activations"] == tokens * (2 * per_block + 1.25 * 64) * 4
    assert p["parts"]["head"] == 2 * tokens * 1000 * 4  # fewer rows than a chunk: all of them at once
    assert p["parts"]["backward"] == tokens * (2 * 64 + 2 * 256) * 4
    assert p["total"] == sum(p["parts"].values()) == pytest.approx(
        5e8 + 1000 + 40 + 80 + p["parts"]["activations"] + p["parts"]["head"] + p["parts"]["backward"])


def test_checkpointing_keeps_block_inputs_plus_one_block_and_pairs_double_the_tokens():
    plain = predict_peak(ROW, ARCH, method="full", objective="lm", batch_size=2, seq_len=16)
    ckpt = predict_peak(ROW, ARCH, method="full", objective="lm", batch_size=2, seq_len=16, checkpointing=True)
    per_block = 6 * 64 + 2 * 32 + 4 * 256 + 2 * 64  # trained norms keep their inputs
    assert plain["parts"]["activations"] == 32 * (2 * per_block + 3.25 * 64) * 4
    assert ckpt["parts"]["activations"] == 32 * (2 * 64 + per_block + 3.25 * 64) * 4
    dpo = predict_peak(ROW, ARCH, method="full", objective="dpo", batch_size=2, seq_len=16)
    assert dpo["parts"]["activations"] == 2 * plain["parts"]["activations"]
    bf16 = predict_peak(ROW, ARCH, method="full", objective="lm", batch_size=2, seq_len=16, precision="bf16")
    assert bf16["parts"]["activations"] == plain["parts"]["activations"] * 3 / 4


def test_heap_slack_adds_one_uncheckpointed_steps_activations_for_methods_that_keep_glibcs_defaults():
    from lmtune.allocator import FREEING_METHODS
    from lmtune.config import load_config
    from lmtune.footprint import _shape

    plain = predict_peak(ROW, ARCH, method="full", objective="lm", batch_size=2, seq_len=16, heap_slack=True)
    ckpt = predict_peak(ROW, ARCH, method="full", objective="lm", batch_size=2, seq_len=16, heap_slack=True,
                        checkpointing=True)
    per_block = 6 * 64 + 2 * 32 + 4 * 256 + 2 * 64
    uncheckpointed = 32 * (2 * per_block + 3.25 * 64) * 4
    assert plain["parts"]["heap"] == ckpt["parts"]["heap"] == uncheckpointed  # the recompute frees as much
    assert plain["total"] == sum(plain["parts"].values())
    assert "heap" not in predict_peak(ROW, ARCH, method="full", objective="lm", batch_size=2, seq_len=16)["parts"]
    cfg = load_config(overrides={"method": "lora"})
    assert _shape(cfg)["heap_slack"] and _shape(cfg, "full")["heap_slack"]
    assert FREEING_METHODS == {"qlora"} and not _shape(cfg, "qlora")["heap_slack"]  # run.py frees for qlora
