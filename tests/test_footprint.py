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


PAIRS = [{"prompt": "the cat", "chosen": "can run .", "rejected": "is in the cup ."},
         {"prompt": "where is the red", "chosen": "ball ?", "rejected": "hat ?"}]
UNPAIRED = [{"prompt": "the cat", "completion": "can run .", "label": True},
            {"prompt": "where is the red ball", "completion": "?", "label": False},
            {"prompt": "the", "completion": "boy can see the bird .", "label": True}]


def test_longest_sequence_is_the_padded_width_of_the_objectives_batches(llama_dir):
    # Oracle: each objective's own collate, which pads a batch to its longest row.
    from lmtune.data.batching import pad_batch
    from lmtune.data.preference import build_pairs, collate_pairs
    from lmtune.data.readers import Record
    from lmtune.footprint import longest_sequence
    from lmtune.models.loading import load_tokenizer
    from lmtune.objectives.kto_task import build_examples, collate_unpaired

    tok = load_tokenizer(llama_dir)
    pairs, _ = build_pairs([Record(p, "x") for p in PAIRS], tok, 64)
    assert longest_sequence(pairs, 64) == collate_pairs(pairs, tok.pad_token_id)["input_ids"].shape[1]
    kto, _ = build_examples([Record(r, "x") for r in UNPAIRED], tok, 64)
    # KTO's KL rows pair prompts with other examples' completions: the bound is any prompt with any completion
    width = collate_unpaired(kto, tok.pad_token_id, 64)["input_ids"].shape[1]
    any_pairing = max(len(a["prompt_ids"]) + len(b["completion_ids"]) for a in kto for b in kto)
    assert width <= longest_sequence(kto, 64) == any_pairing
    rows = [{"input_ids": [5] * n, "labels": [5] * n} for n in (3, 9, 4)]
    assert longest_sequence(rows, 64) == pad_batch(rows, 0)["input_ids"].shape[1] == 9
    assert longest_sequence(rows, 5) == 5  # never past train.max_length
    assert longest_sequence(None, 64) == longest_sequence([("a", "b")], 64) == 64  # unknown: the bound


def test_summary_predicts_the_peak_for_the_runs_longest_example_not_max_length(model_dir, corpus, tmp_path,
                                                                                 monkeypatch):
    from lmtune import footprint, run
    from lmtune.runlog import RunLog

    seen = {}
    real_longest, real_predict = footprint.longest_sequence, footprint.predicted_peak_mb

    def longest(examples, max_length):
        seen["examples"], seen["longest"] = examples, real_longest(examples, max_length)
        return seen["longest"]

    def predict(folder, cfg, baseline, seq_len=None):
        seen["seq_len"] = seq_len
        return real_predict(folder, cfg, baseline, seq_len)

    monkeypatch.setattr(run, "longest_sequence", longest)
    monkeypatch.setattr(run, "predicted_peak_mb", predict)
    cfg = load_config(overrides={"model": str(model_dir), "data.train": str(corpus), "output_dir": str(tmp_path / "r"),
                                 "train.steps": 1, "train.batch_size": 2, "train.max_length": 512})
    summary = run.run_training(cfg, log=RunLog(tmp_path / "r", quiet=True, tensorboard=False)).summary
    assert seen["seq_len"] == seen["longest"] == max(len(e["input_ids"]) for e in seen["examples"]) < 512
    assert "predicted_peak_mb" in summary
    # inspect, without the data, bounds by train.max_length: more than the run's own prediction
    assert real_predict(model_dir, cfg, 0.0, seen["longest"]) < real_predict(model_dir, cfg, 0.0)
