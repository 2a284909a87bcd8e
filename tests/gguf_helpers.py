"""Tiny Llama-family models with a byte-level BPE ChatML tokenizer (SmolLM2's shape), built locally."""

from __future__ import annotations

import torch

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXT = ["the cat sat on the mat", "a dog ran to the park", "is this review positive? yes", "12 apples and 7 pears"] * 20


def chatml_bpe_tokenizer():
    """Byte-level BPE (GPT-2 pre-tokenizer) with ChatML's tokens; pad == eos == <|im_end|>, as in SmolLM2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    core.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tok.chat_template = CHATML
    return tok


def tiny_model(model_type: str, tokenizer, seed: int = 0, tied: bool = False):
    """A random tiny causal LM of ``model_type`` (llama, mistral, qwen2, qwen3) sized to the tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    kw = dict(vocab_size=len(tokenizer) + 4, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
              tie_word_embeddings=tied, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
              pad_token_id=tokenizer.pad_token_id)
    if model_type == "qwen3":
        kw["head_dim"] = 128  # transformers' GGUF reader takes Qwen3's default head width, not the file's
    if model_type == "mistral":
        kw["sliding_window"] = None
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw), dtype=torch.float32)
    with torch.no_grad():  # visible weights: q/k permutation mistakes then change the logits
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()
