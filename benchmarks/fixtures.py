"""Build the benchmark's fixed inputs once per invocation (outside every timed window).

``build_fixtures(work, rungs, n_pairs)`` writes into ``work``:

- ``tok-<V>/``: byte-level BPE trained on generated text (one per vocabulary size)
- ``model-<rung>/``: a seeded random Llama from the ladder with its tokenizer (safetensors)
- ``lora-init-<rung>/``: one LoRA initialisation in PEFT format that every LoRA arm loads
- ``sft.jsonl`` / ``pref.jsonl``: the text records (what a user would hand lmtune)
- ``sft-<rung>.json`` / ``pref-<rung>.json``: the same records pre-tokenized (20–500 tokens)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common import LADDER, LORA, SEED, TextGen, make_pairs, pref_ids, sft_ids, train_tokenizer, write_jsonl

MIN_TOKENS, MAX_TOKENS = 20, 500


def _tokenizer(work: Path, vocab: int, texts: list[str]) -> Any:
    from transformers import AutoTokenizer

    folder = work / f"tok-{vocab}"
    if (folder / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(folder)
    # The pair texts alone are too little text for a 32k vocabulary; add more of the same language.
    extra_words = {4096: 150_000, 32000: 1_500_000}.get(vocab, 1_500_000)
    gen = TextGen(SEED + 7)
    corpus = texts + [gen.text(200) for _ in range(extra_words // 200)]
    return train_tokenizer(corpus, vocab, folder)


def _keep(tok: Any, sft: list[dict[str, str]], pref: list[dict[str, str]]) -> tuple[list, list]:
    """Records whose tokenized length lies in [20, 500] under ``tok`` (so no arm truncates anything)."""
    sft_keep = []
    for r in sft:
        prompt = len(tok.encode(r["prompt"], add_special_tokens=False))
        completion = len(tok.encode(" " + r["completion"], add_special_tokens=False))
        if MIN_TOKENS <= 1 + prompt + completion + 1 <= MAX_TOKENS:
            sft_keep.append(r)
    pref_keep = []
    for r in pref:
        ex = pref_ids(tok, r["prompt"], r["chosen"], r["rejected"])
        longest = len(ex["prompt_ids"]) + max(len(ex["chosen_ids"]), len(ex["rejected_ids"]))
        if MIN_TOKENS <= longest <= MAX_TOKENS:
            pref_keep.append(r)
    return sft_keep, pref_keep


def _lora_init(work: Path, rung: str) -> None:
    """One seeded PEFT LoRA initialisation (B = 0, A Kaiming-uniform) saved for every arm."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = work / f"lora-init-{rung}"
    if (folder / "adapter_model.safetensors").exists():
        return
    base = AutoModelForCausalLM.from_pretrained(work / f"model-{rung}", dtype="float32")
    torch.manual_seed(SEED)
    cfg = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                     target_modules=LORA["targets"], bias="none", task_type="CAUSAL_LM")
    get_peft_model(base, cfg).save_pretrained(folder)


def build_fixtures(work: Path, rungs: list[str], n_pairs: int, log: Any = print) -> dict[str, Any]:
    """Everything the arms read. Tokenizers, models and LoRA inits already in ``work`` are reused
    (they depend only on the seed and ``n_pairs``, which name the folder: see ``run_bench.py``)."""
    from common import build_model_folder

    work.mkdir(parents=True, exist_ok=True)
    sft, pref = make_pairs(int(n_pairs * 1.3) + 16)  # some fall outside 20-500 tokens under each tokenizer
    texts = [r["prompt"] + " " + r["completion"] for r in sft] + [r["prompt"] + " " + r["chosen"] for r in pref]
    vocabs = sorted({LADDER[r]["vocab"] for r in rungs})
    toks = {}
    for v in vocabs:
        log(f"fixtures: tokenizer V={v}")
        toks[v] = _tokenizer(work, v, texts)
    # One record set for every rung: keep what fits under every tokenizer in use.
    for tok in toks.values():
        sft, pref = _keep(tok, sft, pref)
    sft, pref = sft[:n_pairs], pref[:n_pairs]
    write_jsonl(work / "sft.jsonl", sft)
    write_jsonl(work / "pref.jsonl", pref)
    summary: dict[str, Any] = {"sft_records": len(sft), "pref_records": len(pref)}
    for rung in rungs:
        tok = toks[LADDER[rung]["vocab"]]
        if not (work / f"model-{rung}" / "model.safetensors").exists():
            log(f"fixtures: model {rung}")
            build_model_folder(rung, tok, work / f"model-{rung}")
        _lora_init(work, rung)
        examples = [sft_ids(tok, r["prompt"], r["completion"]) for r in sft]
        (work / f"sft-{rung}.json").write_text(json.dumps({"examples": examples}))
        pairs = [pref_ids(tok, r["prompt"], r["chosen"], r["rejected"]) for r in pref]
        (work / f"pref-{rung}.json").write_text(json.dumps({"examples": pairs, "records": pref}))
        lengths = [len(e["input_ids"]) for e in examples]
        summary[rung] = {"sft_len_min": min(lengths), "sft_len_max": max(lengths),
                         "sft_len_mean": sum(lengths) / len(lengths),
                         "loss_frac": sum(sum(x != -100 for x in e["labels"]) for e in examples) / sum(lengths)}
    (work / "fixtures.json").write_text(json.dumps(summary, indent=2))
    return summary
