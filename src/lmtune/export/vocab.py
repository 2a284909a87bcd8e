"""A ``transformers`` byte-level BPE tokenizer as llama.cpp's GGUF tokenizer keys.

llama.cpp's ``gpt2`` tokenizer model (Llama 3, SmolLM2, Qwen2/3, Mistral's tekken all use it)
is described by: ``tokenizer.ggml.tokens`` (one string per id, the byte-level spelling),
``token_type`` (normal, control for special added tokens, user-defined for other added
tokens, unused for padding rows), ``merges`` (``"a b"`` strings in rank order), the
special-token ids, whether BOS/EOS are added, and ``tokenizer.ggml.pre``: the name of the
pre-tokenizer (the regex that splits text before merging). llama.cpp names it from a table of
known tokenizers; here it is read off the pre-tokenizer the tokenizer *actually runs*, so the
exported model splits text as training did.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from lmtune.errors import InputError

# Pre-tokenizer regexes by the name llama.cpp gives them (see llama.cpp's llama-vocab.cpp).
_LLAMA3_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                 "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN2_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_SPLITS = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


@dataclass
class GGUFVocab:
    """What the GGUF tokenizer keys hold."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    bos: int | None
    eos: int | None
    pad: int | None
    unk: int | None
    add_bos: bool
    add_eos: bool


def _pre_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer.

    Raises:
        InputError: a pre-tokenizer that is not byte-level, or one llama.cpp has no name for.
    """
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [s.get("type") for s in steps]
    if "ByteLevel" not in kinds:
        raise InputError(f"the tokenizer's pre-tokenizer ({', '.join(map(str, kinds)) or 'none'}) is not byte-level "
                         "BPE; GGUF export supports byte-level BPE tokenizers (Llama 3, SmolLM2, Qwen, Mistral)")
    byte_level = steps[kinds.index("ByteLevel")]
    if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not byte_level.get("use_regex", True):
        pattern = steps[0].get("pattern", {}).get("Regex")
        if pattern in _SPLITS:
            return _SPLITS[pattern]
    raise InputError(f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) is not one llama.cpp knows by name "
                     "(gpt-2, smollm, llama-bpe, qwen2); the exported model would split text differently")


def gguf_vocab(tokenizer: Any, n_vocab: int) -> GGUFVocab:
    """The GGUF tokenizer keys for ``tokenizer``, padded to the model's ``n_vocab`` embedding rows.

    Raises:
        InputError: not a byte-level BPE (e.g. sentencepiece or word-level), or more tokens than
            the model has embedding rows.
    """
    from gguf import TokenType

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise InputError("the tokenizer is not a fast (tokenizers) tokenizer; GGUF export needs its BPE model")
    state = json.loads(backend.to_str())
    model = state["model"]
    if model.get("type") != "BPE":
        raise InputError(f"the tokenizer is a {model.get('type')} model; GGUF export supports byte-level BPE "
                         "tokenizers (Llama 3, SmolLM2, Qwen, Mistral)")
    pre = _pre_name(state.get("pre_tokenizer"))
    vocab = tokenizer.get_vocab()
    if len(vocab) > n_vocab or max(vocab.values()) >= n_vocab:
        raise InputError(f"the tokenizer has {len(vocab)} tokens but the model only {n_vocab} embedding rows")
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:  # an embedding row no token uses (vocabularies padded to a multiple)
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    probe = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return GGUFVocab(tokens=tokens, types=[int(t) for t in types], merges=merges, pre=pre, bos=bos, eos=eos,
                     pad=tokenizer.pad_token_id, unk=tokenizer.unk_token_id,
                     add_bos=bos is not None and probe[:1] == [bos],
                     add_eos=eos is not None and len(probe) > 1 and probe[-1] == eos)


def add_vocab(writer: Any, vocab: GGUFVocab, chat_template: str | None) -> None:
    """Write the tokenizer keys (and the chat template) with a ``gguf.GGUFWriter``."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for value, add in ((vocab.bos, writer.add_bos_token_id), (vocab.eos, writer.add_eos_token_id),
                       (vocab.pad, writer.add_pad_token_id), (vocab.unk, writer.add_unk_token_id)):
        if value is not None:
            add(value)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if chat_template:
        writer.add_chat_template(chat_template)
