"""Instruction records -> samples -> token examples: labels on the response, errors that name the row."""

from __future__ import annotations

import json

import pytest

from conftest import word_tokenizer
from lmtune.data.examples import IGNORE, BuildStats
from lmtune.data.formats import (
    DROP_CUT,
    DROP_EMPTY,
    Conversation,
    PromptCompletion,
    parse_records,
    prompt_completion_ids,
)
from lmtune.data.readers import read_records
from lmtune.errors import InputError
from sft_helpers import merging_bpe_tokenizer, records


def labelled(ex: dict) -> list[int]:
    return [t for t in ex["labels"] if t != IGNORE]


def test_prompt_completion_labels_cover_completion_and_eos_only():
    tok = word_tokenizer()
    ex = prompt_completion_ids(tok, "where is the red ball ?", "the red ball is big .", 64, BuildStats())
    prompt = tok("where is the red ball ?", add_special_tokens=False)["input_ids"]
    completion = tok("the red ball is big .", add_special_tokens=False)["input_ids"]
    assert ex["input_ids"] == [tok.bos_token_id] + prompt + completion + [tok.eos_token_id]
    assert ex["labels"] == [IGNORE] * (1 + len(prompt)) + completion + [tok.eos_token_id]


def test_loss_on_all_labels_every_token_after_the_first():
    tok = word_tokenizer()
    ex = prompt_completion_ids(tok, "can the cat run ?", "the cat can run .", 64, BuildStats(), loss_on="all")
    assert ex["labels"] == [IGNORE] + ex["input_ids"][1:]


def test_boundary_is_exact_when_the_tokenizer_merges_across_it():
    tok = merging_bpe_tokenizer()
    whole = tok("the cat sat", add_special_tokens=False)["input_ids"]
    prompt = tok("the cat", add_special_tokens=False)["input_ids"]
    assert whole[:len(prompt)] != prompt  # the tokenizer really merges across " sat": the test can fail
    ex = prompt_completion_ids(tok, "the cat", "sat", 64, BuildStats())
    n_prompt = ex["labels"].index(next(t for t in ex["labels"] if t != IGNORE))
    assert ex["input_ids"][:n_prompt] == [tok.bos_token_id] + prompt  # what generation feeds the model
    assert tok.decode(labelled(ex)[:-1]) == " sat"
    assert labelled(ex)[-1] == tok.eos_token_id


def test_alpaca_joins_instruction_and_input_and_trains_output():
    recs = records([{"instruction": "where is the cat ?", "input": "the cat is on the tree .",
                     "output": "on the tree ."},
                    {"instruction": "can the dog jump ?", "input": "", "output": "the dog can jump ."}])
    samples = parse_records(recs, "alpaca", BuildStats())
    assert samples[0] == PromptCompletion("where is the cat ?\nthe cat is on the tree .", "on the tree .",
                                          "data.jsonl line 1")
    assert samples[1].prompt == "can the dog jump ?"


def test_sharegpt_conversations_become_role_content_messages():
    recs = records([{"conversations": [{"from": "system", "value": "be kind ."}, {"from": "human", "value": "hi"},
                                       {"from": "gpt", "value": "hello"}]}])
    (sample,) = parse_records(recs, "messages", BuildStats())
    assert sample == Conversation([{"role": "system", "content": "be kind ."}, {"role": "user", "content": "hi"},
                                   {"role": "assistant", "content": "hello"}], "data.jsonl line 1")


def test_missing_field_names_the_row_and_the_field():
    recs = records([{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    with pytest.raises(InputError, match=r"data.jsonl line 2: field 'completion' is missing"):
        parse_records(recs, "prompt_completion", BuildStats())


def test_non_string_field_names_the_row_and_type():
    with pytest.raises(InputError, match=r"line 1: field 'output' must be a string, got int"):
        parse_records(records([{"instruction": "a", "output": 3}]), "alpaca", BuildStats())


def test_missing_turn_content_names_the_turn():
    recs = records([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}])
    with pytest.raises(InputError, match=r"line 1, messages\[1\]: field 'content' is missing"):
        parse_records(recs, "messages", BuildStats())


def test_empty_response_is_dropped_and_counted():
    stats = BuildStats()
    recs = records([{"prompt": "a", "completion": "  "}, {"prompt": "b", "completion": "c"},
                    {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}])
    assert len(parse_records(recs[:2], "prompt_completion", stats)) == 1
    assert parse_records(recs[2:], "messages", stats) == []
    assert stats.dropped == {DROP_EMPTY: 2}


def test_unknown_role_names_the_row_and_role():
    recs = records([{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}])
    with pytest.raises(InputError, match=r"line 1, messages\[0\]: unknown role 'robot'"):
        parse_records(recs, "messages", BuildStats())


def test_conversation_not_ending_with_assistant_is_an_error():
    recs = records([{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                                  {"role": "user", "content": "z"}]}])
    with pytest.raises(InputError, match=r"line 1: the conversation ends with a 'user' turn"):
        parse_records(recs, "messages", BuildStats())


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff", "completion": "c"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl line 2: not valid UTF-8"):
        read_records(path)


def test_unpaired_surrogate_escape_names_the_field(tmp_path):
    path = tmp_path / "surrogate.jsonl"
    good = json.dumps({"prompt": "a", "completion": "b"})
    path.write_text(good + "\n" + '{"prompt": "\\ud800", "completion": "c"}\n')
    with pytest.raises(InputError, match=r"line 2: field 'prompt' holds characters that are not valid Unicode"):
        parse_records(read_records(path), "prompt_completion", BuildStats())


def test_words_outside_the_vocabulary_name_the_row():
    with pytest.raises(InputError, match=r"row 7: the tokenizer cannot encode the completion"):
        prompt_completion_ids(word_tokenizer(), "the cat", "zebra", 64, BuildStats(), where="row 7")


def test_truncation_keeps_the_start_and_is_counted():
    tok, stats = word_tokenizer(), BuildStats()
    full = prompt_completion_ids(tok, "the cat", "the red ball is big .", 64, BuildStats())
    cut = prompt_completion_ids(tok, "the cat", "the red ball is big .", 6, stats)
    assert cut["input_ids"] == full["input_ids"][:6] and cut["labels"] == full["labels"][:6]
    assert stats.truncated == 1 and stats.examples == 1


def test_response_cut_off_entirely_is_dropped_and_counted():
    stats = BuildStats()
    assert prompt_completion_ids(word_tokenizer(), "where is the red ball ?", "big", 5, stats) is None
    assert stats.dropped == {DROP_CUT: 1} and stats.examples == 0
