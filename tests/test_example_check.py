"""The pre-training check of one rendered example, and --show-example."""

from __future__ import annotations

import json

import pytest

from chat_helpers import chatml_tokenizer
from conftest import build_model
from lmtune.cli import main
from lmtune.data.example_check import GREEN, check_example, show_example
from lmtune.data.examples import IGNORE, BuildStats
from lmtune.errors import InputError
from lmtune.models.loading import save_model
from lmtune.objectives.sft_task import sft_examples
from sft_helpers import records

ROW = {"prompt": "the cat sat on", "completion": "the mat"}


def example(tok):
    return sft_examples(records([ROW]), "prompt_completion", tok, 128, "response", BuildStats(), templated=True)[0][0]


def test_a_correct_example_passes_and_is_shown_by_mask():
    tok = chatml_tokenizer("qwen")
    ex = example(tok)
    assert check_example(tok, ex, ["the mat"], "response", False, "row 1") == []
    plain = show_example(tok, ex, color=False)
    assert plain.endswith("\n<|im_start|>assistant\n[[the mat<|im_end|>]]\n")  # the response and its end only
    assert plain.count("[[") == 1
    colored = show_example(tok, ex, color=True)
    assert colored.count(GREEN) == sum(label != IGNORE for label in ex["labels"])


def test_an_unlabelled_end_of_turn_is_an_error():
    tok = chatml_tokenizer("qwen")
    ex = example(tok)
    last = max(i for i, label in enumerate(ex["labels"]) if label != IGNORE)
    ex["labels"][last] = IGNORE  # <|im_end|> no longer trained
    with pytest.raises(InputError, match="never learn to stop"):
        check_example(tok, ex, ["the mat"], "response", False, "row 1")


def test_doubled_bos_and_labelled_prompt_text_are_warnings_naming_them():
    tok = chatml_tokenizer("llama")
    ex = example(tok)
    doubled = {"input_ids": [tok.bos_token_id, *ex["input_ids"]], "labels": [IGNORE, *ex["labels"]]}
    assert "BOS twice" in check_example(tok, doubled, ["the mat"], "response", False, "row 1")[0]
    last = max(i for i, label in enumerate(ex["labels"]) if label != IGNORE)
    labels = [IGNORE] + ex["input_ids"][1:last + 1] + [IGNORE] * (len(ex["labels"]) - last - 1)
    leaky = {"input_ids": ex["input_ids"], "labels": labels}  # the prompt labelled too
    warnings = check_example(tok, leaky, ["the mat"], "response", False, "row 1")
    assert any("not a response" in w and "the cat sat on" in w for w in warnings)


def test_train_show_example_prints_it_once(tmp_path, capsys):
    tok = chatml_tokenizer("llama")
    folder = tmp_path / "m"
    save_model(build_model("llama", tok), tok, folder)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(ROW) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    assert main(["train", f"model={folder}", f"data.train={data}", f"output_dir={out}", "train.steps=1",
                 "--show-example"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("first training example") == 1 and "[[the mat<|im_end|>]]" in printed
    assert "warning" not in printed
    assert "[[the mat<|im_end|>]]" in json.loads((out / "summary.json").read_text())["example"]


def test_api_train_show_example_prints_it_as_the_cli_does(tmp_path, capsys):
    import lmtune

    tok = chatml_tokenizer("llama")
    folder = tmp_path / "m"
    save_model(build_model("llama", tok), tok, folder)
    result = lmtune.train(str(folder), data=[ROW], output_dir=str(tmp_path / "run"), train={"steps": 1},
                          show_example=True)
    printed = capsys.readouterr().out
    assert printed.count("first training example") == 1 and "[[the mat<|im_end|>]]" in printed
    assert "[[the mat<|im_end|>]]" in result.summary["example"]
