"""Objective sft end to end: counts in the log and summary, EOS kept, new chat tokens, packing, generate --chat."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_model, word_tokenizer
from lmtune.config import load_config
from lmtune.data.batching import pad_batch
from lmtune.data.examples import BuildStats
from lmtune.data.formats import DROP_CUT, DROP_EMPTY, prompt_completion_ids
from lmtune.errors import InputError
from lmtune.objectives.sft_task import sft_collate, train_new_token_rows
from lmtune.objectives.task import TrainingError
from lmtune.run import run_training
from lmtune.runlog import RunLog

TURN = [{"role": "user", "content": "can the cat run ?"}, {"role": "assistant", "content": "the cat can run ."}]
LONG_PROMPT = "the dog can jump . " * 5 + "can the cat run ?"


def chat_rows() -> list[dict]:
    return ([{"messages": TURN}] * 6
            + [{"messages": [{"role": "user", "content": "where is the red ball ?"},
                             {"role": "assistant", "content": "the red ball is big . " * 4}]}]  # truncated
            + [{"messages": [{"role": "user", "content": LONG_PROMPT}, TURN[1]]}]  # response cut off entirely
            + [{"conversations": [{"from": "human", "value": "i see"}, {"from": "gpt", "value": " "}]}])  # empty


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run(model_dir, data, out, quiet=True, **extra):
    cfg = load_config(overrides={"model": str(model_dir), "data.train": str(data), "output_dir": str(out),
                                 "train.steps": 2, "train.batch_size": 4, "train.max_length": 24, **extra})
    return run_training(cfg, log=RunLog(out, quiet=quiet, tensorboard=False)).summary


def test_truncated_and_dropped_examples_are_counted_in_log_and_summary(gpt2_dir, tmp_path, capsys):
    summary = run(gpt2_dir, write_jsonl(tmp_path / "chat.jsonl", chat_rows()), tmp_path / "out", quiet=False)
    assert summary["data"] == {"examples": 7, "truncated": 1, "dropped": {DROP_CUT: 1, DROP_EMPTY: 1}}
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["dropped"] == 2
    log = capsys.readouterr().out
    assert "truncated 1 examples" in log and f"dropped 1 examples: {DROP_CUT}" in log
    assert f"dropped 1 examples: {DROP_EMPTY}" in log


def test_no_usable_examples_is_an_error(gpt2_dir, tmp_path):
    data = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "the cat", "completion": ""}] * 3)
    with pytest.raises(InputError, match=r"no usable examples.*empty response"):
        run(gpt2_dir, data, tmp_path / "out")


def test_eos_keeps_its_label_when_padding_shares_its_id():
    tok = word_tokenizer()
    assert tok.pad_token_id == tok.eos_token_id
    short = prompt_completion_ids(tok, "the dog", "can jump .", 64, BuildStats())
    long = prompt_completion_ids(tok, "where is the red ball ?", "the red ball is big .", 64, BuildStats())
    batch = pad_batch([short, long], tok.pad_token_id)
    n = len(short["input_ids"])
    assert batch["labels"][0, n - 1] == tok.eos_token_id  # the real EOS trains
    assert (batch["labels"][0, n:] == -100).all()  # padding with the same id does not


def test_batch_without_loss_tokens_names_the_cause():
    collate = sft_collate(0, "every label is -100 (train.loss_on=response)")
    with pytest.raises(TrainingError, match=r"no token that carries loss: every label is -100"):
        collate([{"input_ids": [1, 2, 3], "labels": [-100, -100, -100]}])


def test_new_token_rows_train_alone_when_the_method_freezes_embeddings():
    model = build_model("llama", word_tokenizer())
    model.requires_grad_(False)
    vocab = model.get_input_embeddings().weight.shape[0]
    rows = train_new_token_rows(model, [vocab - 2, vocab - 1], vocab)
    assert rows == 4  # two rows in the input embedding and two in the untied output head
    ids = torch.tensor([[vocab - 1, 3, vocab - 2, 5]])
    model(input_ids=ids, labels=ids).loss.backward()
    for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        assert weight.grad[: vocab - 2].abs().sum() == 0
        assert weight.grad[vocab - 2:].abs().sum() > 0


def test_chatml_run_with_frozen_embeddings_changes_only_new_rows(gpt2_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": TURN}] * 8)
    run(gpt2_dir, data, tmp_path / "out", quiet=False, method="freeze", **{"freeze.layers": 1, "train.lr": 1e-2})
    before, after = load_file(gpt2_dir / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    old = before["transformer.wte.weight"].shape[0]
    assert after["transformer.wte.weight"].shape[0] == old + 5
    torch.testing.assert_close(after["transformer.wte.weight"][:old], before["transformer.wte.weight"], rtol=0, atol=0)
    assert "training only the 5 embedding rows" in capsys.readouterr().out


def test_weight_decay_with_frozen_embeddings_and_new_tokens_is_refused(gpt2_dir, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": TURN}] * 4)
    with pytest.raises(InputError, match="train.weight_decay=0"):
        run(gpt2_dir, data, tmp_path / "out", method="freeze", **{"train.weight_decay": 0.1})


def test_packed_run_saves_the_model_with_its_own_attention(model_dir, tmp_path, capsys):
    rows = [{"prompt": "the dog", "completion": "can jump ."},
            {"prompt": "where is the red ball ?", "completion": "the red ball is big ."}]
    data = write_jsonl(tmp_path / "pc.jsonl", rows * 4)
    summary = run(model_dir, data, tmp_path / "out", quiet=False, **{"train.packing": True})
    assert summary["packing"] is True and summary["tokens_trained"] > 0
    assert "packed 8 examples into" in capsys.readouterr().out
    assert "lmtune_segments" not in (tmp_path / "out" / "config.json").read_text()


def test_packing_with_prompt_tuning_is_refused(gpt2_dir, tmp_path):
    data = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "the dog", "completion": "can jump ."}])
    with pytest.raises(InputError, match="prompt_tuning"):
        run(gpt2_dir, data, tmp_path / "out", method="prompt_tuning", **{"train.packing": True})


def test_generate_chat_uses_the_saved_template_and_stops_at_end_of_turn(gpt2_dir, tmp_path, capsys):
    from lmtune.cli import main
    from lmtune.data.chat import IM_END, render_generation_prompt
    from lmtune.models.loading import load_tokenizer

    run(gpt2_dir, write_jsonl(tmp_path / "chat.jsonl", [{"messages": TURN}] * 8), tmp_path / "out")
    tok = load_tokenizer(tmp_path / "out")
    _, stops = render_generation_prompt(tok, "can the cat run ?")
    assert stops[0] == tok.convert_tokens_to_ids(IM_END)
    capsys.readouterr()
    code = main(["generate", "--model", str(tmp_path / "out"), "--chat", "--prompt", "can the cat run ?",
                 "--max-new-tokens", "4"])
    assert code == 0 and "<|im_start|>" not in capsys.readouterr().out


@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
def test_adapter_methods_train_sft(gpt2_dir, tmp_path, method):
    rows = [{"prompt": "the dog", "completion": "can jump ."}, {"prompt": "i see", "completion": "a big dog ."}]
    extra = {"train.packing": True} if method == "lora" else {}
    summary = run(gpt2_dir, write_jsonl(tmp_path / "pc.jsonl", rows * 4), tmp_path / "out", method=method, **extra)
    assert summary["tokens_trained"] > 0 and (tmp_path / "out" / "adapter_model.safetensors").exists()
