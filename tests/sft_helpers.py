"""Tokenizers and records shared by the SFT tests: a merging BPE and a templated tokenizer, built locally."""

from __future__ import annotations

from lmtune.data.readers import Record

BPE_TEXT = ["the cat sat on the mat", "the cat sat down", "a dog sat on the cat", "the cat sat here"] * 30


def merging_bpe_tokenizer():
    """A BPE with no pre-tokenizer: merges cross spaces, so "the cat sat" becomes few tokens."""
    from tokenizers import Tokenizer, decoders, models, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.decoder = decoders.Fuse()  # tokens hold their own spaces: decode by concatenation
    core.train_from_iterator(BPE_TEXT, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"],
                                                           initial_alphabet=list("\n:"), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


# A Zephyr-like template with its own end-of-turn marker (EOS) and a refusal of system turns.
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns') }}"
            "{% endif %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


def templated_tokenizer():
    """The merging BPE given a Jinja chat template of its own."""
    from tokenizers import AddedToken

    tok = merging_bpe_tokenizer()
    tok.add_tokens([AddedToken(t, special=True) for t in ("<|user|>", "<|assistant|>", "<|system|>")],
                   special_tokens=True)
    tok.chat_template = TEMPLATE
    return tok


def records(rows: list[dict], name: str = "data.jsonl") -> list[Record]:
    return [Record(r, f"{name} line {i}") for i, r in enumerate(rows, 1)]
