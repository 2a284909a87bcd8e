"""The small word-level GPT that ships with lmtune (``lmtune.pretrain`` rebuilds it).

The tokenizer is built the way the story builds it: the unique words of the pre-training
corpus, sorted, plus a BOS token that both starts and ends every sentence. It is saved as a
normal ``transformers`` folder (``tokenizer.json`` with a WordLevel model), so any tool that
reads Hugging Face tokenizers reads it. Fine-tuning must reuse this tokenizer: the embedding
at index 89 means "cat" only because pre-training made it so.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from lmtune.errors import InputError

BOS = "<bos>"
_WORD = re.compile(r"\w+|[^\w\s]+")


def corpus_words(lines: list[str]) -> list[str]:
    """Sorted unique lowercase words (punctuation marks count as words) of ``lines``."""
    return sorted({w for line in lines for w in _WORD.findall(line.lower())})


def build_word_tokenizer(lines: list[str]) -> Any:
    """A WordLevel tokenizer: ids 0..V-2 are the sorted words, id V-1 is BOS (also EOS and pad)."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = corpus_words(lines)
    if not words:
        raise InputError("the pre-training corpus has no words")
    vocab = {w: i for i, w in enumerate(words)}
    vocab[BOS] = len(words)
    core = Tokenizer(WordLevel(vocab, unk_token=None))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+|[^\w\s]+, like corpus_words
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=BOS, pad_token=BOS,
                                   model_max_length=64)


def small_gpt_config(vocab_size: int, bos_id: int, n_embd: int = 48, n_layer: int = 2, n_head: int = 4,
                     n_positions: int = 64) -> Any:
    """The shipped architecture: a GPT-2 small enough to pre-train in seconds on two cores."""
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                      n_head=n_head, bos_token_id=bos_id, eos_token_id=bos_id, pad_token_id=bos_id,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)


def random_model(tokenizer: Any, seed: int, **arch: int) -> Any:
    """A freshly initialised model of the shipped architecture for ``tokenizer``."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(small_gpt_config(len(tokenizer), tokenizer.bos_token_id, **arch))
