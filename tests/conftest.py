"""Shared fixtures: tiny GPT-2 and Llama model folders built from configs (nothing downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Tiny models run fastest single-threaded, and xdist workers then don't fight over cores.
torch.set_num_threads(1)

SENTENCES = [
    "the cat can run .", "the dog can jump .", "a bird sat on the tree .", "the red ball is big .",
    "can the cat run ?", "where is the red ball ?", "i see a big dog .", "the girl has a hat .",
    "the boy can see the bird .", "my mom likes the cat .", "the fish is in the cup .",
]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def fails(capsys, args: list[str], *needles: str) -> str:
    """Run the CLI; it must exit 2 with one message holding every needle and no traceback."""
    from lmtune.cli import main

    rc = main(args)
    out, err = capsys.readouterr()
    assert rc == 2, out + err
    assert "Traceback" not in out + err
    assert err.count("lmtune: error:") == 1, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in: {err}"
    return err


def word_tokenizer():
    from lmtune.models.shipped import build_word_tokenizer

    return build_word_tokenizer(SENTENCES)


def build_model(arch: str, tokenizer, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    v, bos = len(tokenizer), tokenizer.bos_token_id
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=v, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=bos,
                         eos_token_id=bos, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return GPT2LMHeadModel(cfg)
    cfg = LlamaConfig(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=bos, eos_token_id=bos, pad_token_id=bos, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def saved_model(tmp_path_factory, arch: str, name: str) -> Path:
    """A tiny random ``arch`` model folder with a word-level tokenizer (no chat template)."""
    from lmtune.models.loading import save_model

    tok = word_tokenizer()
    folder = tmp_path_factory.mktemp(name)
    save_model(build_model(arch, tok), tok, folder)
    return folder


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def model_dir(request, tmp_path_factory) -> Path:
    """A tiny random model folder (GPT-2 and Llama) with a word-level tokenizer."""
    return saved_model(tmp_path_factory, request.param, f"tiny-{request.param}")


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    return saved_model(tmp_path_factory, "gpt2", "tiny-gpt2-only")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama: untied head and nn.Linear layers (QLoRA stores them in 4 bits)."""
    return saved_model(tmp_path_factory, "llama", "tiny-llama-only")


@pytest.fixture()
def corpus(tmp_path) -> Path:
    return write_lines(tmp_path / "corpus.txt", SENTENCES * 3)


@pytest.fixture()
def eval_corpus(tmp_path) -> Path:
    return write_lines(tmp_path / "eval.txt", SENTENCES[:4])
