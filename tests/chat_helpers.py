"""Llama- and Qwen-style tokenizers with a ChatML template, and a scripted LM, built locally for the chat tests."""

from __future__ import annotations

import torch
from torch import nn

from sft_helpers import BPE_TEXT

# Qwen2's ChatML: no BOS, a default system turn when the conversation has none.
QWEN_TEMPLATE = ("{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
                 "{{ '<|im_start|>system\na dog sat here<|im_end|>\n' }}{% endif %}"
                 "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama-style: BOS written by the template, then ChatML turns.
LLAMA_TEMPLATE = ("{{ bos_token }}{% for message in messages %}"
                  "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
                  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def chatml_tokenizer(style: str, template: bool = True):
    """A byte-free BPE that merges across spaces, with ChatML's tokens and role names in its vocabulary;
    ``qwen``: no BOS, EOS = <|im_end|>; ``llama``: BOS <s>, EOS </s>."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    text = BPE_TEXT + ["user assistant system"] * 10
    core.train_from_iterator(text, trainers.BpeTrainer(vocab_size=160, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=list("\n:"), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="</s>")
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")],
                   special_tokens=True)
    if style == "qwen":
        tok.bos_token = None
        tok.eos_token = "<|im_end|>"
    if template:
        tok.chat_template = QWEN_TEMPLATE if style == "qwen" else LLAMA_TEMPLATE
    return tok


def oracle_ids(tok, messages, generation: bool = False, template: str | None = None) -> list[int]:
    """transformers' own ``apply_chat_template``, tokenized by transformers."""
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation, chat_template=template)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


class ScriptedLM(nn.Module):
    """Answers ``answer`` then ``end`` only after ``cue`` (the template's generation prompt); else repeats ``junk``."""

    def __init__(self, vocab: int, cue: list[int], answer: list[int], end: int, junk: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # evaluation asks for the device of a parameter
        self.vocab, self.cue, self.answer, self.end, self.junk = vocab, cue, answer, end, junk

    def next_token(self, row: list[int]) -> int:
        n = len(self.cue)
        starts = [i for i in range(len(row) - n + 1) if row[i:i + n] == self.cue]
        if not starts:
            return self.junk
        done = len(row) - (starts[-1] + n)
        return self.answer[done] if done < len(self.answer) else self.end

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: object):
        logits = torch.full((*input_ids.shape, self.vocab), -1e4)
        for b, row in enumerate(input_ids.tolist()):
            logits[b, :, self.next_token(row)] = 0.0
        return logits
