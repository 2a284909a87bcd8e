"""GGUF out and in on tiny Llama-family models; oracles: transformers' own GGUF reader and gguf.GGUFReader."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from gguf_helpers import CHATML, chatml_bpe_tokenizer, tiny_model
from lmtune.cli import main
from lmtune.errors import InputError
from lmtune.export.command import export_command
from lmtune.export.gguf import permute, write_gguf
from lmtune.models.loading import load_model_and_tokenizer, read_meta, resolve_model_dir, save_model

X = torch.tensor([[1, 5, 40, 77, 120, 3, 9, 200, 31]])  # (1, T)


def read_back(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X).logits


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


def bf16_rounded(model):
    """The model with its matrices rounded to bf16 (what a bf16 file stores; norms stay f32)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(p.to(torch.bfloat16).float())
    return model


@pytest.fixture(scope="module")
def tok():
    return chatml_bpe_tokenizer()


@pytest.mark.parametrize("model_type,tied", [("llama", False), ("llama", True), ("qwen2", True), ("qwen3", False),
                                             ("mistral", False)])
def test_f32_export_reads_back_with_the_same_logits(tmp_path, tok, model_type, tied):
    model = tiny_model(model_type, tok, tied=tied)
    out = write_gguf(model, tok, tmp_path / "m.gguf", "f32")
    assert rel(logits(model), logits(read_back(out))) < 1e-5


def test_bf16_equals_bf16_weights_and_q8_0_stays_within_its_bound(tmp_path, tok):
    model = tiny_model("llama", tok)
    q8 = logits(read_back(write_gguf(model, tok, tmp_path / "q8.gguf", "q8_0")))
    # Measured 1.1e-2 on these std-0.2 random weights (1.2e-2 for qwen3): Q8_0's per-block 8-bit rounding.
    assert rel(logits(model), q8) < 3e-2
    back = logits(read_back(write_gguf(model, tok, tmp_path / "bf16.gguf", "bf16")))
    assert rel(logits(bf16_rounded(model)), back) < 1e-4


def test_metadata_tokenizer_and_template_as_llama_cpp_reads_them(tmp_path, tok):
    model = tiny_model("llama", tok)
    out = write_gguf(model, tok, tmp_path / "m.gguf", "q8_0")
    reader = gguf.GGUFReader(out)

    def field(key):
        return reader.fields[key].contents()

    assert field("general.architecture") == "llama"
    assert field("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert field("llama.block_count") == 2 and field("llama.attention.head_count_kv") == 2
    assert field("tokenizer.chat_template") == CHATML
    assert field("tokenizer.ggml.eos_token_id") == tok.convert_tokens_to_ids("<|im_end|>")
    assert field("tokenizer.ggml.padding_token_id") == tok.pad_token_id
    assert field("tokenizer.ggml.bos_token_id") == tok.bos_token_id
    assert field("tokenizer.ggml.add_bos_token") is False  # the tokenizer adds none; the template writes its own
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == model.config.vocab_size and tokens[-1] == f"[PAD{model.config.vocab_size - 1}]"
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    # q rows are stored in llama.cpp's order
    q = next(t for t in reader.tensors if t.name == "blk.1.attn_q.weight")
    stored = gguf.quants.dequantize(q.data, q.tensor_type).reshape(64, 64)
    expected = permute(model.model.layers[1].self_attn.q_proj.weight.detach(), 4).numpy()
    assert np.abs(stored - expected).max() < 0.2 * 2 ** -6

    from transformers import AutoTokenizer

    back = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    text = "the cat sat, 12 apples!<|im_end|>"
    assert back(text)["input_ids"] == tok(text)["input_ids"]
    conversation = [{"role": "user", "content": "hi"}]
    rendered = [t.apply_chat_template(conversation, tokenize=False) for t in (back, tok)]
    assert rendered[0] == rendered[1]


@pytest.fixture()
def tiny_gguf(tmp_path, tok) -> tuple[Path, torch.nn.Module]:
    model = tiny_model("llama", tok)
    return write_gguf(model, tok, tmp_path / "src" / "tiny.gguf", "f32"), model


def test_model_source_can_be_a_gguf_file_or_its_folder(tiny_gguf):
    path, model = tiny_gguf
    assert resolve_model_dir(path.parent) == path
    lm, tokenizer, source = load_model_and_tokenizer(path)
    assert source == path and tokenizer.chat_template == CHATML
    assert rel(logits(model), logits(lm)) < 1e-5
    (path.parent / "other.gguf").write_bytes(path.read_bytes())
    with pytest.raises(InputError, match="several GGUF files"):
        resolve_model_dir(path.parent)


def test_convert_writes_a_plain_folder_that_records_its_source(tmp_path, tiny_gguf, capsys):
    from transformers import AutoModelForCausalLM

    path, model = tiny_gguf
    assert main(["convert", "--model", str(path), "--out", str(tmp_path / "hf")]) == 0
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", use_safetensors=True)
    assert rel(logits(model), logits(plain)) < 1e-5
    assert read_meta(tmp_path / "hf")["base_model"] == str(path)
    assert main(["convert", "--model", str(path), "--out", str(tmp_path / "hf")]) == 2  # never over a model
    assert "not empty" in capsys.readouterr().err


def test_damaged_and_unsupported_gguf_are_input_errors_naming_the_file(tmp_path, tiny_gguf, capsys):
    path, _ = tiny_gguf
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert main(["convert", "--model", str(damaged), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert str(damaged) in err and "damaged" in err and not (tmp_path / "a").exists()
    odd = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(odd, "rwkv7")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(InputError, match=r"rwkv7.*not supported.*architectures: .*llama"):
        load_model_and_tokenizer(odd)
    assert list(tmp_path.glob(".a.*")) == []


def test_export_merges_the_adapter_and_refuses_what_it_cannot_write(tmp_path, tok):
    from lmtune.methods.adapters import inject, merge_and_unload, save_adapter
    from lmtune.methods.lora_layer import LoRASpec
    from lmtune.methods.targets import resolve_targets

    base = tiny_model("qwen2", tok, tied=True)
    save_model(base, tok, tmp_path / "base")
    inject(base, resolve_targets(base, "all-linear"), LoRASpec(r=4, alpha=8.0))
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    save_adapter(base, tmp_path / "adapter", tok)
    merged = merge_and_unload(base)
    out = export_command(tmp_path / "base", tmp_path / "m.gguf", "gguf", tmp_path / "adapter", "f32")
    assert rel(logits(merged), logits(read_back(out))) < 1e-5

    from conftest import build_model, word_tokenizer

    words = word_tokenizer()
    save_model(build_model("gpt2", words), words, tmp_path / "gpt2")
    with pytest.raises(InputError, match="Llama family.*'gpt2'"):
        export_command(tmp_path / "gpt2", tmp_path / "g.gguf")
    assert not (tmp_path / "g.gguf").exists()
    assert main(["export", "--model", str(tmp_path / "base"), "--out", str(out)]) == 2  # exists: never overwritten


def test_ollama_modelfile_for_chatml_and_a_clear_error_otherwise(tmp_path, tok):
    from lmtune.export.ollama import CHATML_GO, modelfile

    save_model(tiny_model("llama", tok), tok, tmp_path / "base")
    out = export_command(tmp_path / "base", tmp_path / "ollama", "ollama", dtype="q8_0")
    text = (out / "Modelfile").read_text()
    assert text.startswith("FROM ./model.gguf\n") and CHATML_GO in text and 'PARAMETER stop "<|im_end|>"' in text
    assert "SYSTEM" not in text and (out / "model.gguf").is_file()
    smol = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>"
            "system\nYou are SmolLM.<|im_end|>\n' }}{% endif %}" + CHATML.split("{% for message in messages %}")[1])
    assert 'SYSTEM """You are SmolLM."""' in modelfile("m.gguf", tok, smol)
    from sft_helpers import TEMPLATE

    tok = chatml_bpe_tokenizer()
    tok.chat_template = TEMPLATE  # Zephyr-like: not ChatML
    save_model(tiny_model("llama", tok), tok, tmp_path / "zephyr")
    with pytest.raises(InputError, match="Ollama"):  # it refuses system turns: the probe already fails
        export_command(tmp_path / "zephyr", tmp_path / "z", "ollama")
    assert not (tmp_path / "z").exists() and list(tmp_path.glob(".z.*")) == []
    tok.chat_template = TEMPLATE.split("{% if m['role'] == 'system' %}")[0] + TEMPLATE.split("{% endif %}", 1)[1]
    with pytest.raises(InputError, match=r"not ChatML.*<\|system\|>"):
        modelfile("m.gguf", tok, tok.chat_template)
