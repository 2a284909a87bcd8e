"""Every path from text to token ids goes through data.examples.encode: unknown words are an InputError."""

import pytest

from conftest import build_model, word_tokenizer
from lmtune.data.chat import render
from lmtune.data.examples import encode
from lmtune.errors import InputError
from lmtune.generate import generate_text
from lmtune.methods.prompt_tuning import initial_prompt


def test_encode_names_the_unknown_words_and_the_row():
    with pytest.raises(InputError, match=r"^row 3: the tokenizer cannot encode the prompt: .*'zebra'"):
        encode(word_tokenizer(), "the zebra can run", "prompt", "row 3")


def test_encode_of_known_words_is_the_tokenizer_without_special_tokens():
    tok = word_tokenizer()
    assert encode(tok, "the cat can run .") == tok("the cat can run .", add_special_tokens=False)["input_ids"]


def test_a_generate_prompt_with_an_unknown_word_is_an_input_error():
    tok = word_tokenizer()
    with pytest.raises(InputError, match=r"--prompt: .*'zebra'"):
        generate_text(build_model("gpt2", tok), tok, "the zebra", max_new_tokens=1)


def test_a_prompt_tuning_init_text_with_an_unknown_word_is_an_input_error():
    tok = word_tokenizer()
    with pytest.raises(InputError, match=r"prompt_tuning.init='text:zebra'.*'zebra'"):
        initial_prompt(build_model("gpt2", tok), tok, 4, "text:zebra")


def test_rendering_chat_without_a_template_names_the_row():
    with pytest.raises(InputError, match=r"^row 2: .*no chat template"):
        render(word_tokenizer(), [{"role": "user", "content": "hi"}], True, "row 2")
