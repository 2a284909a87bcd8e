"""Seconds per DPO step (policy + reference log-probs, loss, backward) with the output head frozen.

    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/dpo_step.py [--steps 8]

Run it once per tree to compare (e.g. before/after a change to ``completion_logps``): it uses
``lmtune.objectives.lm.completion_logps`` where that exists and ``lmtune.data.preference``'s
otherwise. A Llama-style model from a config (seeded, no download) with a 32k vocabulary and an
untied head, so the head matmul is real work; only the attention projections train (the head and
embeddings stay frozen, as under LoRA). B pairs of random prompt + completion ids, completion-only
labels. The first step is warm-up; the median of the rest is reported, as wall time and as this
process's CPU time (steadier than wall time on a machine that others share).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmtune.data.examples import IGNORE
from lmtune.objectives.dpo import dpo_loss

try:
    from lmtune.objectives.lm import completion_logps
except ImportError:  # a tree from before completion_logps moved to objectives/lm.py
    from lmtune.data.preference import completion_logps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--completion", type=int, default=96)
    args = ap.parse_args()
    torch.manual_seed(0)
    vocab = 32000
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         tie_word_embeddings=False))
    for name, p in model.named_parameters():
        p.requires_grad_("self_attn" in name)
    n, t = 2 * args.pairs, args.prompt + args.completion
    ids = torch.randint(0, vocab, (n, t))  # (2B, T) chosen rows, then rejected rows
    labels = ids.clone()
    labels[:, :args.prompt] = IGNORE
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    times, cpu = [], []
    for _ in range(args.steps + 1):
        start, start_cpu = time.perf_counter(), time.process_time()
        chosen, rejected = completion_logps(model, batch).chunk(2)  # (B,), (B,)
        with torch.no_grad():
            ref_chosen, ref_rejected = completion_logps(model, batch).chunk(2)
        loss, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, 0.1)
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    print(f"completion_logps from {completion_logps.__module__}; torch {torch.__version__}; "
          f"{platform.processor() or platform.machine()}; threads {torch.get_num_threads()} "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}); pairs {args.pairs}, T {t}, V {vocab}")
    print(f"median step {statistics.median(times[1:]):.4f} s wall, {statistics.median(cpu[1:]):.4f} s CPU "
          f"over {args.steps} steps")


if __name__ == "__main__":
    main()
