"""Build the benchmark's fixed inputs once per invocation (outside every timed window).

``build_fixtures(work, rungs, n_pairs)`` writes into ``work``:

- ``tok-<V>/``: byte-level BPE trained on generated text (one per vocabulary size)
- ``model-<rung>/``: a seeded random Llama from the ladder with its tokenizer (safetensors)
- ``lora-init-<rung>/``: one LoRA initialisation in PEFT format that every LoRA arm loads
- ``sft-V<V>.jsonl`` / ``pref-V<V>.jsonl``: the text records (what a user would hand lmtune)
- ``sft-<rung>.json`` / ``pref-<rung>.json``: the same records pre-tokenized (20–500 tokens)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common import LADDER, LORA, SEED, TextGen, make_pairs, pref_ids, sft_ids, train_tokenizer, write_jsonl

MIN_TOKENS, MAX_TOKENS = 20, 500


def _tokenizer(work: Path, vocab: int) -> Any:
    """BPE of ``vocab`` tokens trained on generated text (a 32k vocabulary needs ~1.5M words)."""
    from transformers import AutoTokenizer

    folder = work / f"tok-{vocab}"
    if (folder / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(folder)
    words = 200_000 if vocab <= 4096 else 1_500_000
    gen = TextGen(SEED + 7)
    return train_tokenizer([gen.text(200) for _ in range(words // 200)], vocab, folder)


def _tokens_per_word(tok: Any) -> float:
    text = TextGen(SEED + 11).text(5000)
    return len(tok.encode(text, add_special_tokens=False)) / 5000


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


def data_file(work: Path, rung: str, kind: str) -> Path:
    """The text records (``sft`` or ``pref``) a user would hand lmtune, for ``rung``'s tokenizer."""
    return work / f"{kind}-V{LADDER[rung]['vocab']}.jsonl"


def build_fixtures(work: Path, rungs: list[str], n_pairs: int, log: Any = print) -> dict[str, Any]:
    """Everything the arms read. Tokenizers, models and LoRA inits already in ``work`` are reused
    (they depend only on the seed; ``n_pairs`` names the folder: see ``run_bench.py``).

    Records are generated per vocabulary so that each tokenizer sees 20-500 tokens per example.
    """
    from common import build_model_folder

    work.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}
    records: dict[int, tuple[list, list]] = {}
    for vocab in sorted({LADDER[r]["vocab"] for r in rungs}):
        log(f"fixtures: tokenizer and records for V={vocab}")
        tok = _tokenizer(work, vocab)
        sft, pref = _keep(tok, *make_pairs(int(n_pairs * 1.25) + 16, _tokens_per_word(tok)))
        if len(sft) < n_pairs or len(pref) < n_pairs:
            raise RuntimeError(f"only {len(sft)}/{len(pref)} records of 20-500 tokens; raise the oversampling")
        sft, pref = sft[:n_pairs], pref[:n_pairs]
        records[vocab] = (sft, pref)
        write_jsonl(work / f"sft-V{vocab}.jsonl", sft)
        # lmtune (like TRL) encodes the completions as given, so the separating space is part of the data.
        write_jsonl(work / f"pref-V{vocab}.jsonl", [{"prompt": r["prompt"], "chosen": " " + r["chosen"],
                                                     "rejected": " " + r["rejected"]} for r in pref])
        summary[f"V{vocab}"] = {"sft_records": len(sft), "pref_records": len(pref)}
    for rung in rungs:
        vocab = LADDER[rung]["vocab"]
        tok = _tokenizer(work, vocab)
        sft, pref = records[vocab]
        if not (work / f"model-{rung}" / "model.safetensors").exists():
            log(f"fixtures: model {rung}")
            build_model_folder(rung, tok, work / f"model-{rung}")
        _lora_init(work, rung)
        examples = [sft_ids(tok, r["prompt"], r["completion"]) for r in sft]
        (work / f"sft-{rung}.json").write_text(json.dumps({"examples": examples}))
        pairs = [pref_ids(tok, r["prompt"], r["chosen"], r["rejected"]) for r in pref]
        (work / f"pref-{rung}.json").write_text(json.dumps({"examples": pairs, "records": pref}))
        lengths = [len(e["input_ids"]) for e in examples]
        pair_lengths = [len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs]
        summary[rung] = {"sft_len_min": min(lengths), "sft_len_max": max(lengths),
                         "sft_len_mean": sum(lengths) / len(lengths),
                         "loss_frac": sum(sum(x != -100 for x in e["labels"]) for e in examples) / sum(lengths),
                         "pref_len_min": min(pair_lengths), "pref_len_max": max(pair_lengths),
                         "pref_len_mean": sum(pair_lengths) / len(pair_lengths)}
    (work / "fixtures.json").write_text(json.dumps(summary, indent=2))
    return summary
