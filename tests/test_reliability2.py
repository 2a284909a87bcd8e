"""Reliability, round two (issue 16): crashes, hangs and silent wrong results an adversarial pass found.

Each test failed before its fix. Through ``lmtune.cli.main`` where a user would meet the problem:
exit 2, one ``lmtune: error:`` line naming the file (or key, or row) and what is wrong, no traceback.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapter_helpers import saved_adapter
from conftest import fails
from lmtune.cli import main
from lmtune.data.chat import conversation_ids, ensure_chat_template, render
from lmtune.data.examples import BuildStats
from lmtune.data.formats import parse_records
from lmtune.data.readers import Record
from lmtune.errors import InputError
from lmtune.runlog import RunLog


def generate(model: Path, *extra: str) -> list[str]:
    return ["generate", "--model", str(model), "--prompt", "the cat", "--max-new-tokens", "2", *extra]


def chat_file(path: Path, rows: list[list[dict]]) -> Path:
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows), encoding="utf-8")
    return path


TURN = [{"role": "user", "content": "can the cat run ?"}, {"role": "assistant", "content": "the cat can run ."}]


# ---- QLoRA on chat data with a templateless Llama base -----------------------------------------

def test_qlora_trains_on_chat_data_with_a_templateless_llama_base(llama_dir, tmp_path, capsys):
    # The 4-bit layers' wrapped nn.Linear has weight None; making ChatML's new rows trainable
    # used to read .shape off it (AttributeError).
    data = chat_file(tmp_path / "chat.jsonl", [TURN] * 8)
    out = tmp_path / "out"
    rc = main(["train", f"model={llama_dir}", f"data.train={data}", f"output_dir={out}", "method=qlora",
               "quant.double_quant=false", "train.weight_decay=0", "train.steps=2", "train.batch_size=4",
               "train.max_length=24"])
    assert rc == 0, capsys.readouterr().err
    config = json.loads((out / "adapter_config.json").read_text())
    # The new chat tokens' rows travel with the adapter, as PEFT's trainable_token_indices (rows only).
    assert config["trainable_token_indices"], config


# ---- untrusted chat templates: time and size bounds, reasons ----------------------------------

@pytest.fixture()
def chat_tokenizer():
    from conftest import word_tokenizer

    tok = word_tokenizer()
    ensure_chat_template(tok)
    tok.name_or_path = "evil-model"
    return tok


@pytest.mark.parametrize(("template", "why"), [
    # each range is within the sandbox's 100,000 limit; together 10**10 iterations
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "ran longer than"),
    # no call inside the loops at all: only the interval timer can stop it
    ("{% set r = range(100000) %}{% for i in r %}{% for j in r %}{% for k in r %}{% endfor %}{% endfor %}"
     "{% endfor %}", "ran longer than"),
    ("{{ messages|tojson(indent=1000000000) }}", "indent of 1000000000"),
    ("{{ 'x' * 10000000000 }}", "'*' would make a value of 10,000,000,000"),
    ("{% for i in range(100000) %}{{ 'abcdefghij' * 100 }}{% endfor %}", "more than 2,000,000 characters"),
])
def test_a_hostile_template_is_stopped_with_the_bound_it_hit(chat_tokenizer, monkeypatch, template, why):
    monkeypatch.setattr("lmtune.data.template_sandbox.MAX_SECONDS", 0.5)
    chat_tokenizer.chat_template = template
    start = time.monotonic()
    with pytest.raises(InputError, match="row 7: the chat template of evil-model was stopped") as e:
        render(chat_tokenizer, TURN, False, "row 7")
    assert why in str(e.value)
    assert time.monotonic() - start < 10


def test_a_refused_render_says_why(chat_tokenizer):
    chat_tokenizer.chat_template = "{{ raise_exception('') }}"  # the message used to be empty
    with pytest.raises(InputError, match=r"row 2: the chat template of evil-model refused to render this "
                                         r"conversation \(TemplateError: it gave no reason\)"):
        render(chat_tokenizer, TURN, False, "row 2")


def test_bounded_rendering_gives_transformers_own_text(chat_tokenizer):
    # The oracle: tokenizer.apply_chat_template outside the bounded sandbox.
    chat_tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] ~ ': ' ~ m['content'] ~ '\n' }}"
                                    "{{ {'n': loop.index, 'r': m['role']}|tojson(indent=2) }}{% endfor %}"
                                    "{% if add_generation_prompt %}{{ 'assistant:' * 2 }}{% endif %}")
    for gen in (False, True):
        assert render(chat_tokenizer, TURN, gen, "row") == chat_tokenizer.apply_chat_template(
            TURN, tokenize=False, add_generation_prompt=gen)


# ---- out-of-vocabulary words in generate and prompt_tuning.init --------------------------------

def test_generate_names_out_of_vocabulary_words_on_the_shipped_model(capsys):
    fails(capsys, ["generate", "--prompt", "the zorblax cat qwfp"], "--prompt", "'zorblax'", "'qwfp'")


def test_prompt_tuning_text_init_names_out_of_vocabulary_words(capsys, corpus, tmp_path):
    fails(capsys, ["train", f"data.train={corpus}", f"output_dir={tmp_path / 'out'}", "method=prompt_tuning",
                   "prompt_tuning.init=text:the zorblax", "train.steps=1"],
          "prompt_tuning.init", "'zorblax'")


# ---- generate options that passed the checks and then crashed -----------------------------------

@pytest.mark.parametrize(("extra", "needle"), [
    (["--temperature", "nan"], "--temperature must be 0 (greedy) or a finite positive number, got nan"),
    (["--temperature", "inf"], "--temperature must be 0 (greedy) or a finite positive number, got inf"),
    (["--seed", str(2**64)], "--seed must be in [0, 2**64)"),
    (["--seed", "-1"], "--seed must be in [0, 2**64)"),
])
def test_generate_refuses_non_finite_or_out_of_range_options(gpt2_dir, capsys, extra, needle):
    fails(capsys, generate(gpt2_dir, *extra), needle)


# ---- malformed metadata files in a model folder -------------------------------------------------

def _edit_json(name: str, edit):
    def apply(folder: Path) -> None:
        path = folder / name
        value = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps(edit(value)))
    return apply


def _set(key, value):
    return lambda c: {**c, key: value}


def _tensors(edit):
    def apply(folder: Path) -> None:
        t = load_file(folder / "model.safetensors")
        edit(t)
        save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return apply


def _symlink_to_text(folder: Path) -> None:
    target = folder.parent / "notes.txt"
    target.write_text("these are not weights\n" * 100)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(target)


FC = "transformer.h.0.mlp.c_fc.weight"
MALFORMED = {
    "config-list": (_edit_json("config.json", lambda c: [c]), ["config.json", "must hold a JSON object"]),
    "config-string": (_edit_json("config.json", lambda c: "gpt2"), ["config.json", "must hold a JSON object"]),
    "config-string-size": (_edit_json("config.json", _set("n_embd", "32")),
                           ["config.json", "'n_embd' must be a positive integer, got '32'"]),
    "config-negative-size": (_edit_json("config.json", _set("n_layer", -2)),
                             ["config.json", "'n_layer' must be a positive integer, got -2"]),
    "config-vocab-mismatch": (_edit_json("config.json", lambda c: {**c, "vocab_size": c["vocab_size"] + 7}),
                              ["model.safetensors", "do not fit config.json", "transformer.wte.weight"]),
    "tokenizer-json-model-type": (
        _edit_json("tokenizer.json", lambda t: {**t, "model": {**t["model"], "type": "Bogus"}}),
        ["tokenizer.json", "model type 'Bogus'"]),
    "tokenizer-config-list": (_edit_json("tokenizer_config.json", lambda c: [c]),
                              ["tokenizer_config.json", "must hold a JSON object"]),
    "generation-config-string": (_edit_json("generation_config.json", lambda c: "greedy"),
                                 ["generation_config.json", "must hold a JSON object"]),
    "lmtune-json-list": (_edit_json("lmtune.json", lambda m: [m]), ["lmtune.json", "must hold a JSON object"]),
    "wrong-shape-tensor": (_tensors(lambda t: t.__setitem__(FC, torch.zeros(3, 3))),
                           ["model.safetensors", FC, "(3, 3)"]),
    "missing-tensor": (_tensors(lambda t: t.pop(FC)), ["model.safetensors", "lacks 1 tensor", FC]),
    "symlink-to-text": (_symlink_to_text, ["model.safetensors", "symlink to", "not a safetensors file"]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_model_folder_gets_one_message_naming_the_file(gpt2_dir, tmp_path, capsys, case):
    folder = tmp_path / "model"
    shutil.copytree(gpt2_dir, folder)
    damage, needles = MALFORMED[case]
    damage(folder)
    fails(capsys, generate(folder), *needles)


def test_qlora_refuses_a_weight_of_the_wrong_shape(llama_dir, tmp_path, capsys, corpus):
    # load_quantized reads tensors itself (streaming into 4 bits): the shape check is its own.
    folder = tmp_path / "model"
    shutil.copytree(llama_dir, folder)
    t = load_file(folder / "model.safetensors")
    key = next(k for k in sorted(t) if t[k].dim() == 2 and "embed" not in k and "wte" not in k and "head" not in k)
    t[key] = torch.zeros(4, 4)
    save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})
    fails(capsys, ["train", f"model={folder}", f"data.train={corpus}", f"output_dir={tmp_path / 'out'}",
                   "method=qlora", "quant.double_quant=false", "train.steps=1"], key, "(4, 4)")


# ---- tampered or malformed adapters -------------------------------------------------------------

def _adapter_config(edit):
    def apply(folder: Path) -> None:
        path = folder / "adapter_config.json"
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    return apply


def _nan_tensor(folder: Path) -> None:
    t = load_file(folder / "adapter_model.safetensors")
    key = sorted(t)[0]
    t[key] = torch.full_like(t[key], math.nan)
    save_file(t, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


BAD_ADAPTERS = {
    "config-list": (_adapter_config(lambda c: [c]), ["adapter_config.json", "must hold a JSON object"]),
    "string-alpha": (_adapter_config(_set("lora_alpha", "16")), ["'lora_alpha' must be a number, got '16'"]),
    "nan-alpha": (_adapter_config(_set("lora_alpha", math.nan)), ["'lora_alpha' must be a finite number"]),
    "huge-alpha": (_adapter_config(_set("lora_alpha", 1e308)), ["'lora_alpha' must be in (0, 1e+06]"]),
    "dropout-one": (_adapter_config(_set("lora_dropout", 1.0)), ["'lora_dropout' must be in [0, 1), got 1"]),
    "string-dora": (_adapter_config(_set("use_dora", "false")), ["'use_dora' must be true or false"]),
    "nan-tensor": (_nan_tensor, ["adapter_model.safetensors", "NaN or infinite"]),
}


@pytest.mark.parametrize("case", sorted(BAD_ADAPTERS))
def test_a_tampered_adapter_is_refused_on_load(gpt2_dir, tmp_path, capsys, case):
    folder, _ = saved_adapter(tmp_path, "gpt2")
    damage, needles = BAD_ADAPTERS[case]
    damage(folder)
    err = fails(capsys, generate(gpt2_dir, "--adapter", str(folder)), *needles)
    assert "adapter_" in err


def test_merge_refuses_an_adapter_with_nan_tensors(gpt2_dir, tmp_path, capsys):
    folder, _ = saved_adapter(tmp_path, "gpt2")
    _nan_tensor(folder)
    fails(capsys, ["merge", "--model", str(gpt2_dir), "--adapter", str(folder), "--out", str(tmp_path / "m")],
          "NaN or infinite")
    assert not (tmp_path / "m").exists()


# ---- metrics.jsonl with a byte that is not UTF-8 ------------------------------------------------

def test_truncating_metrics_skips_a_line_that_is_not_utf8(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "loss": 2.0}\n{"step": 2, "loss": \xff}\n{"step": 3, "loss": 1.5}\n')
    RunLog(tmp_path, tensorboard=False).truncate_after(3)
    assert [json.loads(line)["step"] for line in path.read_text(encoding="utf-8").splitlines()] == [1, 3]


def test_a_fresh_run_into_a_folder_with_a_damaged_metrics_file_runs(gpt2_dir, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_bytes(b'{"step": 1, "loss": \xfe\xff}\n')
    rc = main(["train", f"model={gpt2_dir}", f"data.train={corpus}", f"output_dir={out}", "train.steps=2",
               "train.batch_size=4"])
    assert rc == 0, capsys.readouterr().err
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


# ---- conversations: a leading assistant turn, content given as parts ----------------------------

def test_a_conversation_starting_with_an_assistant_turn_says_so(chat_tokenizer):
    messages = [{"role": "assistant", "content": "the cat"}, *TURN]
    with pytest.raises(InputError, match="row 4: the conversation starts with an assistant turn"):
        conversation_ids(chat_tokenizer, messages, "row 4")


def _parts(*parts) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]},
            {"role": "assistant", "content": [{"type": "text", "text": "the cat can run ."}]}]


def test_content_given_as_text_parts_is_joined():
    stats = BuildStats()
    [sample] = parse_records([Record({"messages": _parts("can the cat", "run ?")}, "f line 1")], "messages", stats)
    assert sample.messages == [{"role": "user", "content": "can the cat\nrun ?"},
                               {"role": "assistant", "content": "the cat can run ."}]


def test_content_parts_train_end_to_end(gpt2_dir, tmp_path, capsys):
    data = tmp_path / "parts.jsonl"
    data.write_text("".join(json.dumps({"messages": _parts("can the cat run ?")}) + "\n" for _ in range(8)))
    rc = main(["train", f"model={gpt2_dir}", f"data.train={data}", f"output_dir={tmp_path / 'out'}",
               "train.steps=1", "train.batch_size=4", "train.max_length=24"])
    assert rc == 0, capsys.readouterr().err


@pytest.mark.parametrize(("part", "needle"), [
    ({"type": "image_url", "image_url": {"url": "http://x/cat.png"}},
     "content part of type 'image_url' is not supported"),
    (["a list"], "a content part must be an object"),
    ({"type": "text", "text": 3}, "field 'text' must be a string"),
])
def test_other_content_parts_are_refused_naming_the_part(part, needle):
    rec = Record({"messages": _parts("can the cat", part)}, "f line 2")
    with pytest.raises(InputError, match=r"f line 2, messages\[0\]\.content\[1\]") as e:
        parse_records([rec], "messages", BuildStats())
    assert needle in str(e.value)



# ---- config numbers that passed the checks and then crashed -------------------------------------

@pytest.mark.parametrize(("override", "needle"), [
    ("train.lr=1e300", "'train.lr' must be at most 1e+09 in magnitude"),  # Adam: "cannot be converted to float"
    ("train.lr=5", "'train.lr' must be in (0, 1]"),
    ("lora.alpha=1e300", "'lora.alpha' must be at most 1e+09 in magnitude"),
    ("train.epochs=1e12", "'train.epochs' must be at most 1e+09 in magnitude"),
])
def test_config_refuses_out_of_range_numbers(capsys, corpus, tmp_path, override, needle):
    fails(capsys, ["train", f"data.train={corpus}", f"output_dir={tmp_path / 'o'}", override], needle)
    assert not (tmp_path / "o").exists()


def test_clip_grad_norm_zero_is_documented_as_off_and_is_off(gpt2_dir, corpus, tmp_path, capsys):
    from lmtune.config import describe_keys

    assert "clip the global gradient norm (0 or null: off)" in describe_keys()
    out = tmp_path / "o"
    assert main(["train", f"model={gpt2_dir}", f"data.train={corpus}", f"output_dir={out}", "train.steps=1",
                 "train.clip_grad_norm=0"]) == 0, capsys.readouterr().err
    assert "grad_norm" not in json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
