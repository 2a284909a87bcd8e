"""Chat-aware training examples and evaluation: data.chat_template, templated prompt/completion data,
generation metrics on chat records; the oracle is transformers' ``apply_chat_template``."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from chat_helpers import ScriptedLM, chatml_tokenizer, oracle_ids
from conftest import build_model, fails
from lmtune.cli import main
from lmtune.data.eval_cases import generation_cases
from lmtune.data.examples import IGNORE
from lmtune.data.templates import NAMED, apply_chat_setting
from lmtune.errors import InputError
from lmtune.evaluate import run_eval
from lmtune.models.loading import save_model
from lmtune.objectives.sft_task import sft_examples
from sft_helpers import merging_bpe_tokenizer, records

PAIRS = [{"prompt": "the cat sat on", "completion": "the mat"}, {"prompt": "a dog sat", "completion": "on the cat"}]
CHATS = [{"messages": [{"role": "user", "content": "the cat sat on"}, {"role": "assistant", "content": "the mat"},
                       {"role": "user", "content": "a dog sat"}, {"role": "assistant", "content": "the cat sat"}]}]


def turns(row: dict) -> list[dict[str, str]]:
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]


@pytest.mark.parametrize("style", ["qwen", "llama"])
def test_prompt_completion_is_rendered_with_the_models_template_and_labels_come_from_ids(style):
    tok = chatml_tokenizer(style)
    choice = apply_chat_setting(tok, "auto", "prompt_completion")
    assert choice.templated and choice.added == ()
    examples, _ = sft_examples(records(PAIRS), "prompt_completion", tok, 128, "response", templated=True)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for row, ex in zip(PAIRS, examples):
        assert ex["input_ids"] == oracle_ids(tok, turns(row))  # the rendering transformers gives, token for token
        labelled = [t for t in ex["labels"] if t != IGNORE]
        assert labelled == tok(row["completion"], add_special_tokens=False)["input_ids"] + [im_end]
    if style == "llama":
        assert examples[0]["input_ids"][:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("<|im_start|>")]


def test_none_keeps_raw_text_and_refuses_chat_data():
    tok = chatml_tokenizer("llama")
    assert not apply_chat_setting(tok, "none", "prompt_completion").templated
    ex = sft_examples(records(PAIRS[:1]), "prompt_completion", tok, 128, "response")[0][0]
    raw = tok("the cat sat on the mat", add_special_tokens=False)["input_ids"]
    assert tok.decode(ex["input_ids"]) == tok.decode([tok.bos_token_id, *raw, tok.eos_token_id])
    with pytest.raises(InputError, match="data.chat_template=none .*chat turns"):
        apply_chat_setting(tok, "none", "messages")


def test_named_template_is_used_when_the_tokenizer_has_its_tokens_and_detected_for_chat_data():
    tok = chatml_tokenizer("llama", template=False)
    size = len(tok)
    choice = apply_chat_setting(tok, "auto", "messages")  # no template, but ChatML's tokens: nothing added
    assert choice.added == () and "chatml" in choice.source and len(tok) == size
    msgs = CHATS[0]["messages"]
    ex = sft_examples(records(CHATS), "messages", tok, 128, "response")[0][0]
    assert ex["input_ids"] == oracle_ids(tok, msgs, template=NAMED["chatml"][0])
    assert not apply_chat_setting(chatml_tokenizer("llama", template=False), "auto", "prompt_completion").templated


def test_named_template_whose_tokens_the_tokenizer_lacks_is_refused_naming_them():
    tok = chatml_tokenizer("llama", template=False)
    with pytest.raises(InputError, match=r"llama3 writes <\|start_header_id\|>.*data.chat_template=chatml"):
        apply_chat_setting(tok, "llama3", "prompt_completion")
    with pytest.raises(InputError, match="gemma writes <start_of_turn>.*data.chat_template=auto"):
        apply_chat_setting(merging_bpe_tokenizer(), "gemma", "messages")


def test_jinja_file_is_rendered_as_transformers_renders_it(tmp_path):
    template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + ' ' + m['content'] + '<|im_end|>' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant ' }}{% endif %}")
    path = tmp_path / "t.jinja"
    path.write_text(template, encoding="utf-8")
    tok = chatml_tokenizer("qwen")
    assert apply_chat_setting(tok, str(path), "prompt_completion").templated
    ex = sft_examples(records(PAIRS[:1]), "prompt_completion", tok, 128, "response", templated=True)[0][0]
    assert ex["input_ids"] == oracle_ids(tok, turns(PAIRS[0]), template=template)
    assert tok.unk_token_id not in ex["input_ids"]
    with pytest.raises(InputError, match="no such file"):
        apply_chat_setting(tok, str(tmp_path / "missing.jinja"), "prompt_completion")


def test_generation_prompts_equal_apply_chat_template_with_the_generation_prompt():
    tok = chatml_tokenizer("qwen")
    cases = generation_cases(records(PAIRS), "prompt_completion", tok, ["", ""], templated=True)
    assert [c.prompt_ids for c in cases] == [oracle_ids(tok, turns(r)[:1], generation=True) for r in PAIRS]
    chat = generation_cases(records(CHATS), "messages", tok, [""], templated=True)[0]
    assert chat.prompt_ids == oracle_ids(tok, CHATS[0]["messages"][:-1], generation=True)
    assert chat.reference == "the cat sat"  # the last assistant turn


def scripted(tok, answer: str) -> ScriptedLM:
    cue = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    return ScriptedLM(len(tok), cue, tok(answer, add_special_tokens=False)["input_ids"],
                      tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("the"))


@pytest.mark.parametrize("style", ["qwen", "llama"])
def test_exact_match_scores_a_model_that_answers_only_after_the_template(style):
    tok = chatml_tokenizer(style)
    rows = [{"prompt": "the cat sat on", "completion": "the mat"}, {"prompt": "a dog sat", "completion": "the mat"}]
    model = scripted(tok, "the mat")
    assert run_eval(model, None, records(rows), "exact_match", tokenizer=tok)["exact_match"] == 1.0
    raw = run_eval(model, None, records(rows), "exact_match,token_f1", tokenizer=tok, chat=False)
    assert raw["exact_match"] == 0.0 and raw["chat_template"] is False
    chats = [{"messages": [*CHATS[0]["messages"][:-1], {"role": "assistant", "content": "the mat"}]}]
    on_chat = run_eval(model, None, records(chats), "exact_match,token_f1,bleu,rouge", tokenizer=tok)
    assert on_chat["exact_match"] == 1.0 and on_chat["token_f1"] == 1.0 and on_chat["rouge"] == 1.0


def test_chat_records_with_no_chat_are_refused():
    tok = chatml_tokenizer("qwen")
    with pytest.raises(InputError, match="chat records.*--no-chat"):
        run_eval(scripted(tok, "the mat"), None, records(CHATS), "exact_match", tokenizer=tok, chat=False)


def hf_loss_sum(model, ids: list[int], labels: list[int]) -> tuple[float, int]:
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
    n = sum(label != IGNORE for label in labels[1:])
    return float(loss) * n, n


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    tok = chatml_tokenizer("llama")
    folder = tmp_path_factory.mktemp("chatml_llama")
    save_model(build_model("llama", tok), tok, folder)
    return folder


def test_eval_perplexity_of_prompt_completion_data_is_scored_through_the_template(chat_model_dir, tmp_path, capsys):
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS), encoding="utf-8")
    assert main(["eval", "--model", str(chat_model_dir), "--data", str(data), "--json"]) == 0
    templated = json.loads(capsys.readouterr().out)
    assert main(["eval", "--model", str(chat_model_dir), "--data", str(data), "--json", "--no-chat"]) == 0
    raw = json.loads(capsys.readouterr().out)
    assert templated["chat_template"] is True and raw["chat_template"] is False

    from lmtune.models.loading import load_model_and_tokenizer

    model, tok, _ = load_model_and_tokenizer(chat_model_dir)
    total, count = 0.0, 0
    for row in PAIRS:  # oracle labels: the tokens the full rendering adds after the generation prompt, to <|im_end|>
        full, prompt = oracle_ids(tok, turns(row)), oracle_ids(tok, turns(row)[:1], generation=True)
        end = full.index(tok.convert_tokens_to_ids("<|im_end|>"), len(prompt)) + 1
        labels = [IGNORE] * len(prompt) + full[len(prompt):end] + [IGNORE] * (len(full) - end)
        s, n = hf_loss_sum(model, full, labels)
        total, count = total + s, count + n
    assert templated["tokens"] == count
    assert templated["loss"] == pytest.approx(total / count, abs=1e-5)
    assert raw["loss"] != pytest.approx(templated["loss"], abs=1e-4)


def test_bad_chat_template_values_exit_2(capsys, chat_model_dir, tmp_path):
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS), encoding="utf-8")
    base = ["train", f"model={chat_model_dir}", f"data.train={data}", f"output_dir={tmp_path / 'o'}"]
    fails(capsys, [*base, "data.chat_template=vicuna"], "data.chat_template", "chatml")
    fails(capsys, [*base, "data.chat_template=llama3"], "<|start_header_id|>", "data.chat_template=chatml")
    fails(capsys, [*base, f"data.chat_template={tmp_path / 'no.jinja'}"], "no such file")


@pytest.mark.parametrize("setting", ["auto", "none"])
def test_sft_trains_what_eval_scores_with_and_without_the_template(chat_model_dir, tmp_path, setting):
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS), encoding="utf-8")
    out = tmp_path / "run"
    assert main(["train", f"model={chat_model_dir}", f"data.train={data}", f"data.eval={data}", f"output_dir={out}",
                 "train.steps=1", f"data.chat_template={setting}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["chat_template"] == ("the tokenizer's own" if setting == "auto" else "none: raw text")
    scored = run_eval(str(out), None, str(data), chat=setting == "auto")
    assert scored["loss"] == pytest.approx(summary["eval_loss"], abs=1e-5)


def test_an_adapter_trained_with_a_named_template_is_evaluated_and_asked_with_it(tmp_path, capsys):
    tok = chatml_tokenizer("llama", template=False)  # ChatML's tokens, no template
    base = tmp_path / "base"
    save_model(build_model("llama", tok), tok, base)
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS), encoding="utf-8")
    run = tmp_path / "run"
    assert main(["train", f"model={base}", f"data.train={data}", f"output_dir={run}", "method=lora",
                 "train.steps=1", "data.chat_template=chatml"]) == 0
    capsys.readouterr()
    assert run_eval(str(base), None, str(data))["chat_template"] is False
    assert run_eval(str(base), str(run), str(data))["chat_template"] is True
    assert main(["generate", "--model", str(base), "--adapter", str(run), "--prompt", "the cat", "--chat",
                 "--max-new-tokens", "2"]) == 0
    # merge (and so export) writes the rendering the adapter learned, not the base's missing template
    assert main(["merge", "--model", str(base), "--adapter", str(run), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert merged.chat_template == AutoTokenizer.from_pretrained(run).chat_template is not None
