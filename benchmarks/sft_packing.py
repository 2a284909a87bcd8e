"""Tokens per second of SFT with packing (per-example attention) against padding, same examples.

    OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 python benchmarks/sft_packing.py [--steps 12] [--layers 4]

A Llama-style model built from a config (seeded, no download), instruction examples of variable
length (prompt 10-250 tokens, response 10-250 tokens, response-only labels), pre-tokenized once.
Both arms train on the same examples in the same order: padding batches ``--batch`` examples to
the longest; packing fills rows of ``--max-length`` with whole examples, so a step holds a
different number of examples. Throughput is therefore normalised by real tokens: tokens that
carry loss. Arms are interleaved, the first window of each is warm-up,
and the median of the remaining windows is reported.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch

from lmtune.data.batching import pad_batch
from lmtune.data.examples import IGNORE
from lmtune.data.packing import collate_packed, pack_examples, packed_attention
from lmtune.objectives.lm import lm_loss


def make_examples(n: int, vocab: int, seed: int) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        p, r = (int(x) for x in torch.randint(10, 250, (2,), generator=g))
        ids = torch.randint(1, vocab, (p + r,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE] * p + ids[p:]})
    return examples


def build_model(layers: int, vocab: int, max_length: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=max_length)
    return LlamaForCausalLM(cfg)


def batches(examples, packing: bool, batch: int, max_length: int, pad_id: int) -> list[dict]:
    if packing:
        rows = pack_examples(examples, max_length)
        per_step = max(1, round(batch * sum(len(e["input_ids"]) for e in examples) / len(examples) / max_length))
        return [collate_packed(rows[i:i + per_step], pad_id) for i in range(0, len(rows), per_step)]
    return [pad_batch(examples[i:i + batch], pad_id) for i in range(0, len(examples), batch)]


def window(model, opt, batch_list, attention: str | None) -> tuple[float, int]:
    t0 = time.perf_counter()
    loss_tokens = 0
    for b in batch_list:
        if attention is None:
            loss_sum, _ = lm_loss(model, b)
        else:
            with packed_attention(model, attention):
                loss_sum, _ = lm_loss(model, b)
        (loss_sum / b["num_loss_tokens"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_tokens += b["num_loss_tokens"]
    return time.perf_counter() - t0, loss_tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=96)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--windows", type=int, default=4)
    args = ap.parse_args()
    examples = make_examples(args.examples, args.vocab, seed=0)
    packed = batches(examples, True, args.batch, args.max_length, 0)
    arms = {"padding": batches(examples, False, args.batch, args.max_length, 0),
            "packing, per-example attention calls": packed, "packing, block-diagonal mask": packed}
    attention = {"padding": None, "packing, per-example attention calls": "lmtune_segments",
                 "packing, block-diagonal mask": "lmtune_block_mask"}
    results: dict[str, list[tuple[float, int]]] = {k: [] for k in arms}
    models = {k: build_model(args.layers, args.vocab, args.max_length) for k in arms}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    for _ in range(args.windows + 1):  # interleaved; window 0 is warm-up
        for name, batch_list in arms.items():
            results[name].append(window(models[name], opts[name], batch_list, attention[name]))
    n_params = sum(p.numel() for p in models["padding"].parameters())
    print(f"# {' '.join(sys.argv)}")
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}, Llama {args.layers} layers d=256 V={args.vocab} ({n_params / 1e6:.1f}M params), "
          f"{args.examples} examples of 20-500 tokens, max_length {args.max_length}, fp32")
    print("| arm | rows per pass | token slots per pass | loss tokens/s (median) | ratio |")
    print("| --- | --- | --- | --- | --- |")
    base = None
    for name, runs in results.items():
        steady = runs[1:]
        loss_tps = statistics.median(lt / s for s, lt in steady)
        base = base or loss_tps
        rows = sum(b["input_ids"].shape[0] for b in arms[name])
        cells = sum(b["input_ids"].numel() for b in arms[name])
        print(f"| {name} | {rows} | {cells} | {loss_tps:,.0f} | {loss_tps / base:.2f}x |")


if __name__ == "__main__":
    main()
