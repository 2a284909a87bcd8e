"""Tiny classification data and a tiny BERT for the classify tests (nothing downloaded)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

ANIMALS = ["cat", "dog", "bird"]
THINGS = ["ball", "hat", "cup"]
FRAMES = ["the {} is big .", "i see the {} .", "where is the red {} ?", "the {} ."]
VERBS = {"run": "the {} can run .", "jump": "the {} can jump .", "see": "i see the {} ."}


def topic_records(n: int, seed: int = 0) -> list[dict]:
    """Two classes: is the noun an animal or a thing (words all in conftest's vocabulary)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = "animal" if i % 2 == 0 else "thing"
        noun = rng.choice(ANIMALS if label == "animal" else THINGS)
        out.append({"text": rng.choice(FRAMES).format(noun), "label": label})
    return out


def verb_records(n: int, seed: int = 0) -> list[dict]:
    """Three classes: which verb the sentence uses."""
    rng = random.Random(seed)
    labels = list(VERBS)
    return [{"text": VERBS[labels[i % 3]].format(rng.choice(ANIMALS + THINGS)), "label": labels[i % 3]}
            for i in range(n)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def bert_folder(folder: Path, seed: int = 0) -> Path:
    """A 2-layer BERT body (``BertModel``, like MiniLM's checkpoint) with a WordPiece tokenizer."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from lmtune.models.loading import save_model

    words = sorted({w for f in FRAMES + list(VERBS.values()) for w in f.split() if w != "{}"} |
                   set(ANIMALS + THINGS) | {"the", "a", "red"})
    folder.mkdir(parents=True, exist_ok=True)
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])})
    assert tok.unk_token_id not in tok("the cat")["input_ids"]
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, pad_token_id=0)
    save_model(BertModel(cfg), tok, folder)
    return folder
