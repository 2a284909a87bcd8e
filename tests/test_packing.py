"""Packing: rows of several examples equal the examples run one by one (loss and gradients, 1e-5)."""

from __future__ import annotations

import pytest
import torch

from conftest import build_model, word_tokenizer
from lmtune.data.batching import pad_batch
from lmtune.data.examples import IGNORE, BuildStats
from lmtune.data.formats import prompt_completion_ids
from lmtune.data.packing import collate_packed, pack_examples, packed_attention, segment_bounds
from lmtune.objectives.lm import lm_loss
from lmtune.objectives.sft_task import sft_loss

PAIRS = [("can the cat run ?", "the cat can run ."), ("where is the red ball ?", "the red ball is big ."),
         ("the dog", "can jump ."), ("i see", "a big dog ."),
         ("can the cat run ? the dog can jump .", "the cat can run ."), ("the girl", "has a hat ."),
         ("where is the fish ?", "the fish is in the cup ."), ("my mom", "likes the cat .")]


def examples(tok, loss_on="response"):
    return [prompt_completion_ids(tok, p, c, 64, BuildStats(), loss_on) for p, c in PAIRS]


def loss_and_grads(model, batch, loss_fn):
    model.zero_grad()
    loss_sum, _ = loss_fn(model, batch)
    mean = loss_sum / batch["num_loss_tokens"]
    mean.backward()
    return mean.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_rows_restart_positions_and_never_label_an_example_start():
    exs = examples(word_tokenizer(), loss_on="all")
    rows = pack_examples(exs, 24)
    assert sorted(len(e["input_ids"]) for e in exs) == sorted(
        e - s for r in rows for s, e in segment_bounds(torch.tensor([r["position_ids"]]))[0])
    for r in rows:
        assert len(r["input_ids"]) <= 24
        starts = [t for t, p in enumerate(r["position_ids"]) if p == 0]
        assert all(r["labels"][t] == IGNORE for t in starts)


def test_every_example_lands_in_exactly_one_row_intact():
    exs = examples(word_tokenizer())
    rows = pack_examples(exs, 32)
    pieces = []
    for r in rows:
        for s, e in segment_bounds(torch.tensor([r["position_ids"]]))[0]:
            pieces.append((tuple(r["input_ids"][s:e]), tuple(r["labels"][s:e])))
    assert sorted(pieces) == sorted((tuple(e["input_ids"]), tuple(e["labels"])) for e in exs)
    assert len(rows) < len(exs)


def test_example_longer_than_the_row_is_refused():
    with pytest.raises(ValueError, match="more than the row length"):
        pack_examples([{"input_ids": [1] * 9, "labels": [1] * 9}], 8)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_block_mask_attention_equals_unpacked(arch):
    tok = word_tokenizer()
    model = build_model(arch, tok)
    exs = examples(tok)
    ref, _ = loss_and_grads(model, pad_batch(exs, tok.pad_token_id), lm_loss)
    packed = collate_packed(pack_examples(exs, 40), tok.pad_token_id)

    def masked(m, batch):
        with packed_attention(m, "lmtune_block_mask"):
            return lm_loss(m, batch)

    loss, _ = loss_and_grads(model, packed, masked)
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packed_loss_and_gradients_equal_unpacked(arch):
    tok = word_tokenizer()
    model = build_model(arch, tok)
    exs = examples(tok)
    ref_loss, ref_grads = loss_and_grads(model, pad_batch(exs, tok.pad_token_id), lm_loss)
    packed = collate_packed(pack_examples(exs, 40), tok.pad_token_id)
    assert packed["input_ids"].shape[0] < len(exs)
    assert packed["num_loss_tokens"] == pad_batch(exs, tok.pad_token_id)["num_loss_tokens"]
    loss, grads = loss_and_grads(model, packed, sft_loss)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=1e-5, msg=name)


def test_plain_causal_attention_over_a_packed_row_differs():
    """Without per-example attention the examples read each other: the check above can fail."""
    tok = word_tokenizer()
    model = build_model("llama", tok)
    exs = examples(tok)
    ref, _ = loss_and_grads(model, pad_batch(exs, tok.pad_token_id), lm_loss)
    packed = collate_packed(pack_examples(exs, 40), tok.pad_token_id)
    packed["attention_mask"] = torch.ones_like(packed["input_ids"])
    crosstalk, _ = loss_and_grads(model, packed, lm_loss)
    assert abs(float(crosstalk - ref)) > 1e-3


def test_later_example_is_unaffected_by_an_earlier_one():
    tok = word_tokenizer()
    model = build_model("gpt2", tok).eval()
    a, b, c = examples(tok)[:3]
    row1 = collate_packed(pack_examples([a, c], 64), tok.pad_token_id)
    row2 = collate_packed(pack_examples([b, c], 64), tok.pad_token_id)
    with torch.no_grad(), packed_attention(model):
        h1 = model.base_model(input_ids=row1["input_ids"], position_ids=row1["position_ids"]).last_hidden_state
        h2 = model.base_model(input_ids=row2["input_ids"], position_ids=row2["position_ids"]).last_hidden_state
    n, s1, s2 = len(c["input_ids"]), len(a["input_ids"]), len(b["input_ids"])  # c comes second in both rows
    assert row1["input_ids"][0, s1:s1 + n].tolist() == c["input_ids"]
    torch.testing.assert_close(h1[0, s1:s1 + n], h2[0, s2:s2 + n], rtol=0, atol=1e-5)


def test_packed_attention_restores_the_model_attention():
    model = build_model("gpt2", word_tokenizer())
    before = model.config._attn_implementation
    with packed_attention(model):
        assert model.config._attn_implementation == "lmtune_segments"
    assert model.config._attn_implementation == before
