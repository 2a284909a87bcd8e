"""Chat templates: ChatML fallback, the tokenizer's own template, assistant-only labels, generation prompts."""

from __future__ import annotations

import pytest

from conftest import word_tokenizer
from lmtune.data.chat import (
    IM_END,
    IM_START,
    chat_example_ids,
    conversation_ids,
    end_of_turn_ids,
    ensure_chat_template,
    render_generation_prompt,
)
from lmtune.data.examples import IGNORE, BuildStats
from lmtune.errors import InputError
from sft_helpers import merging_bpe_tokenizer, templated_tokenizer

TWO_TURNS = [{"role": "system", "content": "the cat can run ."},
             {"role": "user", "content": "can the cat run ?"},
             {"role": "assistant", "content": "the cat can run ."},
             {"role": "user", "content": "where is the red ball ?"},
             {"role": "assistant", "content": "the red ball is big ."}]


def spans(ex: dict) -> list[list[int]]:
    """The runs of consecutive labelled token ids."""
    runs, current = [], []
    for t in ex["labels"]:
        if t == IGNORE:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(t)
    return runs + ([current] if current else [])


def test_chatml_fallback_adds_special_tokens_and_the_role_words_the_vocabulary_lacks():
    tok = word_tokenizer()
    size = len(tok)
    added = ensure_chat_template(tok)
    assert added == [IM_START, IM_END, "system", "user", "assistant"]
    assert len(tok) == size + 5
    ids = tok("<|im_start|>user", add_special_tokens=False)["input_ids"]
    assert ids == tok.convert_tokens_to_ids([IM_START, "user"])
    assert ensure_chat_template(tok) == []  # idempotent: the template is now the tokenizer's own


def test_chatml_trains_every_assistant_turn_through_its_end_token():
    tok = word_tokenizer()
    ensure_chat_template(tok)
    ex = chat_example_ids(tok, TWO_TURNS, 64, BuildStats())
    im_end = tok.convert_tokens_to_ids(IM_END)
    assert [tok.decode(s[:-1]) for s in spans(ex)] == ["the cat can run .", "the red ball is big ."]
    assert all(s[-1] == im_end for s in spans(ex))
    assert ex["input_ids"][0] == tok.bos_token_id


def test_own_template_is_used_and_nothing_is_added():
    tok = templated_tokenizer()
    size = len(tok)
    assert ensure_chat_template(tok) == []
    assert len(tok) == size
    msgs = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat"}]
    ids, trained = conversation_ids(tok, msgs)
    assert tok.decode(ids) == tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode([t for t, k in zip(ids, trained) if k]) == "sat</s>"  # the template's EOS ends the turn


def test_turn_boundaries_are_exact_when_the_tokenizer_merges_across_them():
    tok = templated_tokenizer()
    msgs = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "the cat sat"},
            {"role": "user", "content": "the"}, {"role": "assistant", "content": "cat sat"}]
    ex = chat_example_ids(tok, msgs, 128, BuildStats())
    assert [tok.decode(s) for s in spans(ex)] == ["the cat sat</s>", "cat sat</s>"]


def test_template_without_an_end_marker_gets_eos_appended_to_each_turn():
    tok = merging_bpe_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    ex = chat_example_ids(tok, [{"role": "user", "content": "the"}, {"role": "assistant", "content": "cat"}],
                          64, BuildStats())
    assert spans(ex)[-1][-1] == tok.eos_token_id


def test_template_that_fails_to_render_names_the_row():
    with pytest.raises(InputError, match=r"data.jsonl line 3: the chat template of .* refused to render.*no system"):
        conversation_ids(templated_tokenizer(), TWO_TURNS, "data.jsonl line 3")


def test_invalid_template_names_the_row():
    tok = merging_bpe_tokenizer()
    tok.chat_template = "{% for m in messages %}"  # unclosed block
    with pytest.raises(InputError, match=r"row 1: the chat template of .* refused to render.*TemplateSyntaxError"):
        conversation_ids(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "row 1")


def test_generation_prompt_tokenizes_like_the_training_prefix():
    tok = word_tokenizer()
    ensure_chat_template(tok)
    msgs = [{"role": "user", "content": "can the cat run ?"}, {"role": "assistant", "content": "the cat can run ."}]
    ex = chat_example_ids(tok, msgs, 64, BuildStats())
    text, stops = render_generation_prompt(tok, "can the cat run ?")
    prompt_ids = tok(text, add_special_tokens=False)["input_ids"]
    first_label = next(i for i, t in enumerate(ex["labels"]) if t != IGNORE)
    assert prompt_ids == ex["input_ids"][:first_label]
    assert stops[0] == tok.convert_tokens_to_ids(IM_END) and tok.eos_token_id in stops


def test_end_of_turn_of_an_own_template_is_found_from_its_rendering():
    tok = templated_tokenizer()
    assert end_of_turn_ids(tok) == [tok.eos_token_id]


def test_generation_prompt_refuses_a_tokenizer_never_tuned_on_chat():
    with pytest.raises(InputError, match="no chat template and no ChatML tokens"):
        render_generation_prompt(word_tokenizer(), "hi")


def test_template_whose_prefixes_change_is_an_error():
    tok = merging_bpe_tokenizer()
    # Writes the number of turns first, so adding a turn rewrites the start of the text.
    tok.chat_template = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(InputError, match="renders earlier turns differently"):
        conversation_ids(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
