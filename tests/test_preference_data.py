"""Preference pairs: tokenization, the implicit-prompt split, batching, completion log-probs."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_model, word_tokenizer
from lmtune.data.examples import IGNORE
from lmtune.data.preference import IDENTICAL, build_pairs, collate_pairs
from lmtune.data.readers import Record
from lmtune.errors import InputError
from lmtune.objectives.lm import completion_logps


def recs(*fields: dict) -> list[Record]:
    return [Record(f, f"pairs.jsonl line {i + 1}") for i, f in enumerate(fields)]


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_prompt_gets_bos_and_completions_get_eos(tok):
    pairs, stats = build_pairs(recs({"prompt": "the cat", "chosen": "can run .", "rejected": "is big ."}), tok, 64)
    bos = tok.bos_token_id
    assert pairs[0]["prompt_ids"] == [bos] + ids(tok, "the cat")
    assert pairs[0]["chosen_ids"] == ids(tok, "can run .") + [tok.eos_token_id]
    assert pairs[0]["rejected_ids"] == ids(tok, "is big .") + [tok.eos_token_id]
    assert stats.examples == 1


def test_implicit_prompt_is_the_common_token_prefix(tok):
    record = {"chosen": "the red ball is big .", "rejected": "the red ball is in the cup ."}
    pairs, _ = build_pairs(recs(record), tok, 64)
    assert pairs[0]["prompt_ids"] == [tok.bos_token_id] + ids(tok, "the red ball is")
    assert pairs[0]["chosen_ids"][:-1] == ids(tok, "big .")
    assert pairs[0]["rejected_ids"][:-1] == ids(tok, "in the cup .")


def test_chat_messages_are_split_after_the_generation_prompt(tok):
    tok = word_tokenizer()
    # The tiny vocabulary has no role names, so this template writes contents only and opens
    # the assistant turn with "the" (which the assistant's content then repeats).
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}the {% endif %}")
    prompt = [{"role": "user", "content": "where is the cat ?"}]
    chosen = [{"role": "assistant", "content": "the cat is in the cup ."}]
    rejected = [{"role": "assistant", "content": "the dog can run ."}]
    pairs, _ = build_pairs(recs({"prompt": prompt, "chosen": chosen, "rejected": rejected}), tok, 64)
    head = ids(tok, tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True))
    assert pairs[0]["prompt_ids"] == head
    full = ids(tok, tok.apply_chat_template(prompt + chosen, tokenize=False))
    assert pairs[0]["chosen_ids"] == full[len(head):]  # no EOS: the template closes the turn


def test_chat_messages_without_a_template_name_the_line(tok):
    m = [{"role": "assistant", "content": "the cat"}]
    with pytest.raises(InputError, match=r"pairs.jsonl line 1: .*chat template"):
        build_pairs(recs({"chosen": m, "rejected": [{"role": "assistant", "content": "a dog"}]}), tok, 64)


def test_identical_pairs_are_skipped_and_counted(tok):
    pairs, stats = build_pairs(recs({"prompt": "the cat", "chosen": "can run .", "rejected": "can run ."},
                                    {"prompt": "the dog", "chosen": "can jump .", "rejected": "is big ."}), tok, 64)
    assert len(pairs) == 1 and stats.dropped == {IDENTICAL: 1}


def test_empty_completion_is_an_error_naming_the_line(tok):
    with pytest.raises(InputError, match=r"pairs.jsonl line 2: the rejected completion is empty"):
        build_pairs(recs({"prompt": "the cat", "chosen": "can run .", "rejected": "is big ."},
                         {"prompt": "the cat", "chosen": "can run .", "rejected": ""}), tok, 64)


def test_implicit_prefix_pair_is_an_empty_completion(tok):
    with pytest.raises(InputError, match="chosen completion is empty once the prefix"):
        build_pairs(recs({"chosen": "the cat", "rejected": "the cat can run ."}), tok, 64)


def test_prompt_that_fills_max_length_is_an_error(tok):
    with pytest.raises(InputError, match=r"line 1: the prompt has 5 tokens, which fills train.max_length=5"):
        build_pairs(recs({"prompt": "the cat can run", "chosen": ".", "rejected": "?"}), tok, 5)


def test_long_completions_are_cut_and_counted(tok):
    pairs, stats = build_pairs(recs({"prompt": "the", "chosen": "cat can run .", "rejected": "dog is big ."}), tok, 4)
    assert stats.truncated == 1
    assert len(pairs[0]["prompt_ids"]) + len(pairs[0]["chosen_ids"]) == 4


def test_margin_must_be_a_number_when_asked_for(tok):
    with pytest.raises(InputError, match="numeric 'margin'"):
        build_pairs(recs({"prompt": "the", "chosen": "cat .", "rejected": "dog .", "margin": "big"}), tok, 64,
                    margin=True)


def test_batch_stacks_chosen_then_rejected_with_labels_on_completions_only(tok):
    pairs, _ = build_pairs(recs({"prompt": "the cat", "chosen": "can run .", "rejected": "is big ."},
                                {"prompt": "where is", "chosen": "the red ball ?", "rejected": "my mom ?"}), tok, 64)
    batch = collate_pairs(pairs, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 4 and batch["num_loss_tokens"] == 2
    for row, (pair, side) in enumerate([(pairs[0], "chosen_ids"), (pairs[1], "chosen_ids"),
                                        (pairs[0], "rejected_ids"), (pairs[1], "rejected_ids")]):
        labelled = batch["labels"][row][batch["labels"][row] != IGNORE].tolist()
        assert labelled == pair[side]
        assert (batch["labels"][row][batch["attention_mask"][row] == 0] == IGNORE).all()
        assert batch["completion_lengths"][row].item() == len(pair[side])


def test_completion_logps_sum_only_completion_tokens_and_ignore_padding(tok):
    model = build_model("llama", tok).eval()
    pairs, _ = build_pairs(recs({"prompt": "the cat", "chosen": "can run .", "rejected": "is big ."},
                                {"prompt": "where is the", "chosen": "red ball ?", "rejected": "big dog in the cup ?"}),
                           tok, 64)
    with torch.no_grad():
        got = completion_logps(model, collate_pairs(pairs, tok.pad_token_id), chunk_rows=3)  # (4,)
        expected = []
        for side in ("chosen_ids", "rejected_ids"):
            for p in pairs:  # each sequence alone, unpadded, through transformers' own forward
                seq = torch.tensor([p["prompt_ids"] + p[side]])
                logp = torch.log_softmax(model(seq).logits[0, :-1].double(), -1)  # (T-1, V)
                start = len(p["prompt_ids"]) - 1
                expected.append(sum(logp[start + i, t].item() for i, t in enumerate(p[side])))
    assert torch.allclose(got.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-4)


def test_completion_logps_backward_reaches_the_model(tok):
    model = build_model("gpt2", tok)
    pairs, _ = build_pairs(recs({"prompt": "the cat", "chosen": "can run .", "rejected": "is big ."}), tok, 64)
    completion_logps(model, collate_pairs(pairs, tok.pad_token_id)).sum().backward()
    assert model.transformer.h[0].attn.c_attn.weight.grad.abs().sum() > 0


def test_completion_logps_with_a_frozen_head_has_transformers_gradients(tok):
    # A frozen head (LoRA, prompt tuning) takes head_logprobs' forward-gradient path; the oracle is
    # the same sums from transformers' full logits, backpropagated the ordinary way.
    model = build_model("llama", tok).eval()
    model.lm_head.requires_grad_(False)
    model.model.embed_tokens.requires_grad_(False)
    pairs, _ = build_pairs(recs({"prompt": "the cat", "chosen": "can run .", "rejected": "is big ."}), tok, 64)
    batch = collate_pairs(pairs, tok.pad_token_id)
    weights = torch.tensor([1.0, -2.0])  # any loss that is not symmetric in the rows
    (completion_logps(model, batch, chunk_rows=2) * weights).sum().backward()
    got = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]  # (2, T-1, V)
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    logp = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ((logp * keep).sum(1) * weights).sum().backward()
    expected = [p.grad for p in model.parameters() if p.requires_grad]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def write_pairs(path, rows: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
