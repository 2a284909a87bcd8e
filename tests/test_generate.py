"""Tests for lmtune.generate: sampling rules and generation against hand-made oracles."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lmtune.errors import InputError
from lmtune.generate import generate, generate_text, sample_next

VOCAB = 50


@pytest.fixture(scope="module")
def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=64
    )
    return GPT2LMHeadModel(config)


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


class NoCache(nn.Module):
    """Hides the cache arguments of a transformers model, forcing full recomputation."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None
    ) -> Tensor:
        return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits


class Bigram(nn.Module):
    """A plain module returning a logits tensor; its forward has no other arguments."""

    def __init__(self, table: Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table)  # (V, V)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.table[input_ids]  # (B, T, V)


def argmax_chain(model: nn.Module, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation using the model's plain forward on the whole sequence."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids])).logits  # (1, T, V)
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_greedy_matches_hand_argmax(name: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(name)
    model.eval()
    prompt = [3, 14, 15, 9, 2]
    expected = argmax_chain(model, prompt, 12)
    assert generate(model, prompt, max_new_tokens=12) == [expected]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_cache_path_equals_recompute_path(
    name: str, request: pytest.FixtureRequest
) -> None:
    model = request.getfixturevalue(name)
    prompts = torch.tensor([[1, 2, 3, 4], [7, 7, 8, 9]])
    cached = generate(model, prompts, max_new_tokens=10)
    recomputed = generate(NoCache(model), prompts, max_new_tokens=10)
    assert cached == recomputed
    sampled = generate(model, prompts, max_new_tokens=10, temperature=0.9, seed=3)
    assert sampled == generate(NoCache(model), prompts, 10, temperature=0.9, seed=3)


def test_batch_rows_match_single_prompts(gpt2: GPT2LMHeadModel) -> None:
    prompts = [[1, 2, 3], [4, 5, 6]]
    batched = generate(gpt2, prompts, max_new_tokens=6)
    assert batched == [generate(gpt2, p, max_new_tokens=6)[0] for p in prompts]


def test_left_padded_row_matches_unpadded(gpt2: GPT2LMHeadModel) -> None:
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    padded = generate(gpt2, ids, max_new_tokens=6, attention_mask=mask)
    assert padded[0] == generate(gpt2, [5, 6, 7], max_new_tokens=6)[0]


def test_plain_module_returning_tensor() -> None:
    # Each token's best successor is token + 1 (mod V), so greedy counts upwards.
    table = torch.zeros(VOCAB, VOCAB)
    table[torch.arange(VOCAB), (torch.arange(VOCAB) + 1) % VOCAB] = 5.0
    assert generate(Bigram(table), [10], max_new_tokens=4) == [[11, 12, 13, 14]]


class PassThrough(nn.Module):
    """A wrapper whose forward only forwards *args and **kwargs, as PEFT's does."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Tensor, **kwargs: Tensor) -> Tensor:
        return self.inner(*args, **kwargs)


def test_wrapper_falls_back_when_inner_rejects_extras(gpt2: GPT2LMHeadModel) -> None:
    table = torch.zeros(VOCAB, VOCAB)
    table[torch.arange(VOCAB), (torch.arange(VOCAB) + 1) % VOCAB] = 5.0
    assert generate(PassThrough(Bigram(table)), [10], 3) == [[11, 12, 13]]
    # Wrapping a transformers model keeps the cache path and its results.
    expected = generate(gpt2, [3, 4, 5], max_new_tokens=6)
    assert generate(PassThrough(gpt2), [3, 4, 5], max_new_tokens=6) == expected


def test_top_k_one_equals_greedy(gpt2: GPT2LMHeadModel) -> None:
    prompt = [4, 8, 15, 16]
    greedy = generate(gpt2, prompt, max_new_tokens=8)
    assert generate(gpt2, prompt, 8, temperature=1.5, top_k=1, seed=1) == greedy


def test_top_p_keeps_exactly_the_nucleus() -> None:
    # Probabilities 0.5, 0.3, 0.15, 0.05. With p = 0.8 the nucleus is {0, 1}
    # (0.5 < 0.8, 0.5 + 0.3 = 0.8 >= 0.8), so tokens 2 and 3 are never drawn.
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(4000, 1)  # (4000, 4)
    draws = sample_next(logits, 1.0, None, 0.8, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1}
    # Renormalised within the nucleus token 0 has 0.5 / 0.8 = 0.625.
    assert abs((draws == 0).float().mean().item() - 0.625) < 0.03
    # p just above 0.8 needs the third token too; a tiny p keeps only the top one.
    draws = sample_next(logits, 1.0, None, 0.81, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1, 2}
    draws = sample_next(logits, 1.0, None, 1e-6, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0}


def test_top_k_keeps_k_largest() -> None:
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]]).repeat(2000, 1)  # (2000, 4)
    draws = sample_next(logits, 1.0, 2, None, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {1, 2}


def test_zero_temperature_is_argmax() -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])  # (2, 3)
    assert sample_next(logits, 0.0, None, None, None).tolist() == [1, 0]


def test_seed_reproducible_and_distinct() -> None:
    flat = Bigram(torch.zeros(VOCAB, VOCAB))
    first = generate(flat, [1], max_new_tokens=20, temperature=1.0, seed=7)
    assert first == generate(flat, [1], max_new_tokens=20, temperature=1.0, seed=7)
    # 20 uniform draws over 50 tokens coincide with probability 50**-20.
    assert first != generate(flat, [1], max_new_tokens=20, temperature=1.0, seed=8)


def test_stop_id_ends_row(gpt2: GPT2LMHeadModel) -> None:
    prompts = torch.tensor([[1, 2, 3], [9, 8, 7]])
    full = generate(gpt2, prompts, max_new_tokens=10)
    stop = full[0][3]
    cut = full[0].index(stop)
    out = generate(gpt2, prompts, max_new_tokens=10, stop_ids=[stop])
    assert out[0] == full[0][: cut + 1]
    other = full[1]
    assert out[1] == (other[: other.index(stop) + 1] if stop in other else other)


def test_max_context_respected(gpt2: GPT2LMHeadModel) -> None:
    assert len(generate(gpt2, [1] * 60, max_new_tokens=20)[0]) == 4
    assert generate(gpt2, [1] * 64, max_new_tokens=5) == [[]]
    with pytest.raises(InputError, match="context"):
        generate(gpt2, [1] * 65, max_new_tokens=1)


def test_mode_restored(gpt2: GPT2LMHeadModel) -> None:
    gpt2.train()
    generate(gpt2, [1, 2], max_new_tokens=2)
    assert gpt2.training
    gpt2.eval()
    generate(gpt2, [1, 2], max_new_tokens=2)
    assert not gpt2.training


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"temperature": -0.1}, "--temperature"),
        ({"top_k": 0}, "--top-k"),
        ({"top_p": 0.0}, "--top-p"),
        ({"top_p": 1.5}, "--top-p"),
        ({"max_new_tokens": -1}, "--max-new-tokens"),
    ],
)
def test_invalid_options(gpt2: GPT2LMHeadModel, kwargs: dict, option: str) -> None:
    with pytest.raises(InputError, match=option):
        generate(gpt2, [1, 2], **kwargs)


def test_malformed_prompts(gpt2: GPT2LMHeadModel) -> None:
    with pytest.raises(InputError, match="equal length"):
        generate(gpt2, [[1, 2], [3]])
    with pytest.raises(InputError, match="empty"):
        generate(gpt2, [])


def make_tokenizer():
    """A word-level tokenizer built offline: <s>=0, </s>=1, <unk>=2, then words."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({f"w{i}": i for i in range(3, VOCAB)})
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_generate_text_adds_bos_and_stops_at_eos(gpt2: GPT2LMHeadModel) -> None:
    tokenizer = make_tokenizer()
    new = generate(gpt2, [0, 5, 6], max_new_tokens=8, stop_ids=[1])[0]
    expected = " ".join(f"w{t}" for t in new if t > 2)
    assert generate_text(gpt2, tokenizer, "w5 w6", max_new_tokens=8) == expected
    # A prompt already starting with BOS gets no second one.
    assert generate_text(gpt2, tokenizer, "<s> w5 w6", max_new_tokens=8) == expected
    plain = generate(gpt2, [5, 6], max_new_tokens=8, stop_ids=[1])[0]
    without = generate_text(gpt2, tokenizer, "w5 w6", max_new_tokens=8, add_bos=False)
    assert without == " ".join(f"w{t}" for t in plain if t > 2)
