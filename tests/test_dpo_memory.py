"""A lean DPO step under bf16 autocast: same loss and gradients as before, a bounded peak.

Oracles: the step in its earlier order (policy forward, then the reference) with the head's
log-probs from full logits (``log_softmax`` + autograd), and the resident-set high-water mark
of one step measured in a fresh process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lmtune.objectives import lm
from lmtune.objectives.dpo import dpo_loss
from lmtune.objectives.dpo_task import reference_loss
from lmtune.objectives.reference import Reference

PAIRS = [
    {"prompt": "the cat", "chosen": "can run .", "rejected": "is in the cup ."},
    {"prompt": "the dog", "chosen": "can jump .", "rejected": "sat on the tree ."},
    {"prompt": "where is", "chosen": "the red ball ?", "rejected": "my mom ?"},
]


def _full_logits_head(head, h, y, chunk_rows=0):
    """log p(y | h) from all logits at once, differentiated by autograd (no chunks, no fused gradient)."""
    return torch.log_softmax(head(h).float(), dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


def _lora_policy(llama_dir):
    from lmtune.config import load_config
    from lmtune.data.preference import build_pairs, collate_pairs
    from lmtune.data.readers import Record
    from lmtune.methods.registry import METHODS
    from lmtune.models.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer(llama_dir)
    policy = METHODS["lora"].prepare(load_causal_lm(llama_dir), tok, llama_dir, load_config(method="lora")).model
    torch.manual_seed(1)
    with torch.no_grad():  # B = 0 at init would make policy == reference; move the adapters
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    pairs, _ = build_pairs([Record(p, "x") for p in PAIRS], tok, 64)
    return policy, collate_pairs(pairs, tok.pad_token_id)


def _step(policy, loss_fn, batch, precision):
    policy.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss, _ = loss_fn(policy, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_dpo_step_equals_policy_first_full_logits_path(llama_dir, monkeypatch, precision):
    policy, batch = _lora_policy(llama_dir)
    reference = Reference(policy, adapter=True)
    loss, grads = _step(policy, reference_loss(reference, "sigmoid", 0.1, 0.0), batch, precision)

    def before(model, b):  # the earlier order: policy forward (graph alive), then the reference
        chosen, rejected = lm.completion_logps(model, b).chunk(2)
        with reference.model() as ref:
            ref_chosen, ref_rejected = lm.completion_logps(ref, b).chunk(2)
        mean, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, 0.1)
        return mean * b["num_loss_tokens"], {}

    monkeypatch.setattr(lm, "head_logprobs", _full_logits_head)
    want, want_grads = _step(policy, before, batch, precision)
    # fp32: only summation order differs. bf16: the fused head gradient rounds (onehot - softmax)
    # to bf16 before its matmul, as autocast rounds the full-logits backward's operands.
    atol = 1e-6 if precision == "fp32" else 2e-3
    torch.testing.assert_close(loss, want, rtol=0, atol=atol)
    assert grads.keys() == want_grads.keys() and grads
    for name, g in grads.items():
        scale = want_grads[name].abs().max().item()
        torch.testing.assert_close(g, want_grads[name], rtol=0, atol=atol * max(scale, 1.0), msg=name)


STEP = textwrap.dedent('''
    import json, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from lmtune.objectives.dpo_task import reference_loss
    from lmtune.objectives.reference import Reference

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         tie_word_embeddings=False))
    for name, p in model.named_parameters():
        p.requires_grad_("self_attn" in name)  # frozen head and embeddings, as under LoRA
    pairs, prompt = 2, 4
    loss_fn = reference_loss(Reference(model, adapter=False, keep_copy=False), "sigmoid", 0.1, 0.0)

    def kb(field):
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))

    def step(t):
        ids = torch.randint(0, 32000, (2 * pairs, t))
        labels = ids.clone()
        labels[:, :prompt] = -100
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                 "num_loss_tokens": pairs, "completion_lengths": torch.full((2 * pairs,), t - prompt)}
        model.zero_grad(set_to_none=True)
        before = kb("VmRSS:")
        open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS now
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = loss_fn(model, batch)
        loss.backward()
        return (kb("VmHWM:") - before) / 1024, float(loss)

    step(12)  # pages in the bf16 kernels' code (~25 MB of shared libraries), which is not the step's
    growth, loss = step(260)  # 1,020 rows reach the head: one 1,024-row chunk of 32k logits
    print(json.dumps({"growth_mb": growth, "loss": loss}))
''')


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="VmHWM reset is Linux-only")
def test_bf16_dpo_step_peak_stays_bounded():
    """One bf16 LoRA-style DPO step with 1,020 head rows and V=32,000, in a fresh process.

    Before: each head pass held the bf16 logits, their float32 copy and ``logsumexp``'s float32
    scratch (1,020 × 32,000 × (2 + 4 + 4) B ≈ 311 MB; this measure: 386 MB). Now a chunk is
    about 32 MiB of float32 logits reused in place (262 rows): 92 MB, so the bound is 150 MB.

    glibc's mmap threshold is fixed at 128 KiB for the child: by default it grows with each large
    free, after which freed tensors stay in the heap and the figure varied by ±25 MB between runs
    and machines (CI read 182 MB). Fixed, every tensor is its own mapping and the high-water mark is
    what the step holds at once.
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run([sys.executable, "-c", STEP], capture_output=True, text=True, timeout=300,
                          check=True, env=env)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["growth_mb"] < 150, result
