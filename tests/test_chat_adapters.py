"""Adapters trained on chat data with a tokenizer that needed ChatML's tokens: the new rows travel with them.

A LoRA adapter trains and carries only the new tokens' rows of the embedding (and of an untied
head) as PEFT ``trainable_token_indices``; a prompt-tuning adapter carries the embeddings whole
(``modules_to_save``). Both carry the grown tokenizer. PEFT, loading the adapter the usual way
(resize the base to the adapter's tokenizer, then ``PeftModel.from_pretrained``), is the oracle.
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


def test_adapter_folder_holds_only_the_new_rows(chat_run):
    base, out, model, _ = chat_run
    config = json.loads((out / "adapter_config.json").read_text())
    tensors = load_file(out / "adapter_model.safetensors")
    tok = adapter_tokenizer(out, load_model_and_tokenizer(base)[1])
    new_ids = sorted(tok.convert_tokens_to_ids(json.loads((out / "lmtune.json").read_text())["added_tokens"]))
    hidden = model.get_input_embeddings().weight.shape[1]
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    embedding = "transformer.wte" if tied else "model.embed_tokens"
    expected = {embedding: new_ids, **({} if tied else {"lm_head": new_ids})}  # PEFT re-ties a tied head itself
    assert config["trainable_token_indices"] == expected and not config.get("modules_to_save")
    assert len(new_ids) == 5 and new_ids[-1] == len(tok) - 1
    rows = {k: v.shape for k, v in tensors.items() if "lora_" not in k}
    assert rows == {f"base_model.model.{m}.token_adapter.trainable_tokens_delta": (5, hidden) for m in expected}
    assert tok.chat_template and "<|im_end|>" in tok.get_vocab()


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


def test_merged_chat_adapter_gives_the_trained_logits(chat_run):
    from lmtune.methods.adapters import merged_model

    base, out, trained, _ = chat_run
    merged, tok, _ = merged_model(base, out)
    x = probe_ids(tok)
    assert type(merged.get_input_embeddings()) is type(load_model_and_tokenizer(base)[0].get_input_embeddings())
    torch.testing.assert_close(logits(merged.eval(), x), logits(trained, x), atol=TOL, rtol=0)


def test_gradients_reach_only_the_adapter_and_the_new_rows(chat_run):
    base, out, trained, _ = chat_run
    original = load_model_and_tokenizer(base)[0].get_input_embeddings().weight
    emb = trained.get_input_embeddings()
    assert not emb.weight.requires_grad and torch.equal(emb.weight[:original.shape[0]], original)  # old rows unchanged
    trained.zero_grad()
    x = probe_ids(adapter_tokenizer(out, load_model_and_tokenizer(base)[1]))
    trained(x).logits.sum().backward()
    grads = {n for n, p in trained.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(".lora_" in n or n.endswith(".token_rows") for n in grads), grads
    assert any(n.endswith(".token_rows") for n in grads)
    trained.zero_grad()


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


def test_saved_adapter_configs_hold_only_keys_peft_knows(chat_run, prompt_run):
    # A key PEFT's config class lacks is ignored with a warning on every load (prompt tuning
    # once carried LoRA's ensure_weight_tying for a tied head).
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING

    for _, out, _, _ in (chat_run, prompt_run):
        config = json.loads((out / "adapter_config.json").read_text())
        known = PEFT_TYPE_TO_CONFIG_MAPPING[config["peft_type"]].__dataclass_fields__
        assert set(config) <= set(known) | {"peft_type"}, set(config) - set(known)


def test_qlora_chat_adapter_saves_and_reloads_the_new_rows(llama_dir, tmp_path):
    from lmtune.methods.token_rows import token_row_layers

    base, out, trained, summary = train_on_chat(llama_dir, tmp_path, "qlora")
    config = json.loads((out / "adapter_config.json").read_text())
    assert set(config["trainable_token_indices"]) == {"model.embed_tokens", "lm_head"}
    model, tok, _ = load_model_and_tokenizer(base)
    ours = load_adapter(model, out, adapter_tokenizer(out, tok))
    for name, layer in token_row_layers(trained).items():
        torch.testing.assert_close(token_row_layers(ours)[name].token_rows, layer.token_rows, atol=0, rtol=0)
    hidden = trained.get_input_embeddings().weight.shape[1]
    assert summary["trainable_params"] == summary["adapter_params"] + 2 * 5 * hidden


def test_inspect_counts_the_new_rows_as_summary_json_does(chat_run, tmp_path):
    from lmtune.footprint import run_inspect

    base, _, _, summary = chat_run
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": TURN}) + "\n", encoding="utf-8")
    row = run_inspect(str(base), [f"data.train={data}", "method=lora"])["methods"]["lora"]
    assert (row["total_params"], row["trainable_params"]) == (summary["total_params"], summary["trainable_params"])
