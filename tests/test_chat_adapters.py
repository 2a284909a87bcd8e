"""Adapters trained on chat data with a tokenizer that needed ChatML's tokens: the new rows travel with them.

The adapter folder carries the resized embedding (and an untied head) as PEFT ``modules_to_save``,
plus the grown tokenizer; PEFT, loading it the usual way (resize the base to the adapter's
tokenizer, then ``PeftModel.from_pretrained``), is the oracle.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lmtune.cli import main
from lmtune.config import load_config
from lmtune.methods.adapter_files import adapter_tokenizer
from lmtune.methods.adapters import load_adapter
from lmtune.models.loading import load_model_and_tokenizer
from lmtune.run import prepare
from lmtune.runlog import RunLog
from lmtune.train import train

TOL = 1e-5
TURN = [{"role": "user", "content": "can the cat run ?"}, {"role": "assistant", "content": "the cat can run ."}]
PROBE = "<|im_start|>user\ncan the cat run ?<|im_end|>\n<|im_start|>assistant\nthe cat can run .<|im_end|>"


def train_on_chat(model_dir, tmp, method: str):
    """An SFT run on chat data with ``method``: (base folder, adapter folder, trained model, summary)."""
    data = tmp / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": TURN}) + "\n" for _ in range(8)), encoding="utf-8")
    out = tmp / "out"
    cfg = load_config(overrides={"model": str(model_dir), "data.train": str(data), "output_dir": str(out),
                                 "method": method, "train.steps": 3, "train.batch_size": 4, "train.max_length": 24,
                                 "train.lr": 5e-2})
    log = RunLog(out, quiet=True, tensorboard=False)
    task, ctx = prepare(cfg, log)
    summary = train(task, ctx.cfg.train, out, device=torch.device("cpu"), log=log)
    return model_dir, out, task.model.eval(), summary


@pytest.fixture(scope="module")
def chat_run(model_dir, tmp_path_factory):
    return train_on_chat(model_dir, tmp_path_factory.mktemp("chat-lora"), "lora")


@pytest.fixture(scope="module")
def prompt_run(model_dir, tmp_path_factory):
    return train_on_chat(model_dir, tmp_path_factory.mktemp("chat-prompt"), "prompt_tuning")


def probe_ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer(PROBE, add_special_tokens=False)["input_ids"]])  # (1, T), new tokens included


def logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out if torch.is_tensor(out) else out.logits


def test_adapter_folder_lists_the_embeddings_as_modules_to_save(chat_run):
    base, out, model, _ = chat_run
    config = json.loads((out / "adapter_config.json").read_text())
    keys = set(load_file(out / "adapter_model.safetensors"))
    emb = model.get_input_embeddings()
    tied = model.get_output_embeddings().weight is emb.weight
    embedding = "transformer.wte" if tied else "model.embed_tokens"
    assert config["modules_to_save"] == [embedding, "lm_head"]
    assert config.get("ensure_weight_tying", False) is tied  # GPT-2: PEFT ties its head copy to the embedding's
    assert {f"base_model.model.{embedding}.weight", "base_model.model.lm_head.weight"} <= keys
    rows = load_file(out / "adapter_model.safetensors")[f"base_model.model.{embedding}.weight"].shape[0]
    tok = adapter_tokenizer(out, load_model_and_tokenizer(base)[1])
    assert tok.chat_template and len(tok) == rows and "<|im_end|>" in tok.get_vocab()


def test_lmtune_reloads_the_chat_adapter_with_the_trained_logits(chat_run):
    base, out, trained, _ = chat_run
    model, tok, _ = load_model_and_tokenizer(base)
    tok = adapter_tokenizer(out, tok)
    model = load_adapter(model, out, tok).eval()
    x = probe_ids(tok)
    assert x.max() >= model.config.vocab_size - 5  # the probe uses the added tokens
    torch.testing.assert_close(logits(model, x), logits(trained, x), atol=TOL, rtol=0)
    if trained.get_output_embeddings().weight is trained.get_input_embeddings().weight:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # the tie survives


def peft_loaded(base, out):
    """The PEFT user's way: resize the base to the adapter's tokenizer, then ``PeftModel.from_pretrained``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(len(tok))
    return PeftModel.from_pretrained(model, out).eval(), tok


def test_peft_loads_the_chat_adapter_after_resizing_the_base(chat_run):
    base, out, trained, _ = chat_run
    peft_model, tok = peft_loaded(base, out)
    x = probe_ids(tok)
    torch.testing.assert_close(logits(peft_model, x), logits(trained, x), atol=TOL, rtol=0)


def test_trainable_params_count_the_adapter_and_the_new_rows_only(chat_run):
    _, _, model, summary = chat_run
    hidden = model.get_input_embeddings().weight.shape[1]
    matrices = 1 if model.get_output_embeddings().weight is model.get_input_embeddings().weight else 2
    assert summary["trainable_params"] == summary["adapter_params"] + 5 * hidden * matrices


def test_generate_chat_runs_with_the_base_and_the_adapter(chat_run, capsys):
    base, out, _, _ = chat_run
    code = main(["generate", "--model", str(base), "--adapter", str(out), "--chat", "--prompt", "can the cat run ?",
                 "--max-new-tokens", "4"])
    assert code == 0 and "<|im_start|>" not in capsys.readouterr().out


def test_prompt_tuning_chat_adapter_reloads_with_the_trained_logits(prompt_run):
    base, out, trained, _ = prompt_run
    model, tok, _ = load_model_and_tokenizer(base)
    tok = adapter_tokenizer(out, tok)
    ours = load_adapter(model, out, tok).eval()
    x = probe_ids(tok)
    torch.testing.assert_close(logits(ours, x), logits(trained, x), atol=TOL, rtol=0)


def test_peft_reads_the_prompt_tuning_chat_adapter_embeddings(prompt_run):
    # PEFT's prompt learning looks inputs up in the *original* embedding, not the modules_to_save
    # copy, so its logits cannot be compared; the trained rows must still load into the copy.
    base, out, trained, _ = prompt_run
    theirs, _ = peft_loaded(base, out)
    copy = theirs.base_model.get_input_embeddings().modules_to_save["default"].weight
    torch.testing.assert_close(copy, trained.get_input_embeddings().weight, atol=0, rtol=0)
