"""The small word-level GPT that ships with lmtune, and ``lmtune pretrain`` that rebuilds it.

The tokenizer is built the way the story builds it: the unique words of the pre-training
corpus, sorted, plus a BOS token that both starts and ends every sentence. It is saved as a
normal ``transformers`` folder (``tokenizer.json`` with a WordLevel model), so any tool that
reads Hugging Face tokenizers reads it. Fine-tuning must reuse this tokenizer: the embedding
at index 89 means "cat" only because pre-training made it so.
"""

from __future__ import annotations

import re
from pathlib import Path
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


PRETRAIN_DEFAULTS = {
    "method": "full", "objective": "lm",
    "train.steps": 1500, "train.batch_size": 32, "train.lr": 1e-2,  # from scratch: move fast
    "train.schedule": "linear", "train.warmup_steps": 50, "train.betas": [0.85, 0.99],
    "train.log_every": 100, "train.max_length": 64,
}


def pretrain(corpus: str | Path, out: str | Path, overrides: list[str] | None = None, quiet: bool = False,
             tensorboard: bool = True) -> dict[str, Any]:
    """Build the word tokenizer from ``corpus`` and pre-train a small GPT on it with ``train()``.

    Returns:
        The run summary; ``out`` becomes a ``transformers`` model folder.
    """
    from lmtune.config import load_config
    from lmtune.data.batching import pad_batch
    from lmtune.data.readers import read_records
    from lmtune.methods.full import apply as apply_full
    from lmtune.objectives.lm import lm_loss
    from lmtune.objectives.lm_task import text_examples
    from lmtune.run import check_output_dir, pick_device
    from lmtune.runlog import RunLog
    from lmtune.train import Task, train

    cfg = load_config(base={**PRETRAIN_DEFAULTS, "output_dir": str(out), "data.train": str(corpus)},
                      overrides=overrides)
    out = check_output_dir(cfg)
    records = read_records(cfg["data.train"])
    tokenizer = build_word_tokenizer([r.fields["text"] for r in records])
    log = RunLog(out, quiet=quiet, tensorboard=tensorboard)
    examples, stats = text_examples(records, tokenizer, cfg["train.max_length"])
    model = random_model(tokenizer, cfg["train.seed"])
    n_words = len(tokenizer) - 1
    log.say(f"vocab size: {len(tokenizer)} ({n_words} words + BOS)")
    log.say(f"pre-training sentences: {len(examples)}")
    log.say(f"model: {sum(p.numel() for p in model.parameters()):,} params")
    prepared = apply_full(model, tokenizer, cfg, Path(corpus))
    pad_id = tokenizer.pad_token_id
    task = Task(model=prepared.model, train_examples=examples, collate=lambda exs: pad_batch(exs, pad_id),
                loss=lm_loss, save=prepared.save, summary={"data": stats.as_dict()})
    summary = train(task, cfg, out, device=pick_device(), log=log)
    log.say(f"model saved to {out}")
    return summary
