"""DPO: the pure loss against TRL's own DPOTrainer code, and the dpo objective end to end."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lmtune.objectives.dpo import dpo_loss

B, T = 4, 6
METRIC_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected")


def _trl_dpo(per_token: torch.Tensor, completion_mask: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, loss_type: str, beta: float, label_smoothing: float):
    """Run TRL 1.16's ``DPOTrainer._compute_loss`` on given per-token log-probs.

    The model is a stand-in returning ``log_probs`` (what TRL's fused LM head returns); the
    reference log-probs come in precomputed, so every number TRL computes is its own code's.
    """
    from trl import DPOTrainer

    def model(**kwargs):
        zeros = torch.zeros_like(per_token)
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=label_smoothing, use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    n = per_token.shape[0]
    inputs = {"input_ids": torch.zeros(n, T, dtype=torch.long), "attention_mask": torch.ones(n, T, dtype=torch.long),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = DPOTrainer._compute_loss(trainer, model, inputs, False)
    return loss, {k: v[0] for k, v in trainer._metrics["train"].items()}


def _pairs(seed: int = 0):
    """Per-token log-probs for B chosen then B rejected rows with completions of 1..T-1 tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T, (2 * B,), generator=g)  # (2B,)
    completion_mask = (torch.arange(T) >= T - lengths[:, None]).long()  # (2B, T) completion at the end
    per_token = -torch.rand(2 * B, T - 1, generator=g, dtype=torch.float64) * 4 * completion_mask[:, 1:]
    ref_chosen = -torch.rand(B, generator=g, dtype=torch.float64) * 8
    ref_rejected = -torch.rand(B, generator=g, dtype=torch.float64) * 8
    return per_token, completion_mask, ref_chosen, ref_rejected, lengths


@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0),
                                                       ("robust", 0.1), ("robust", 0.0)])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_loss_matches_trl_dpo_trainer(loss_type, label_smoothing, beta):
    per_token, mask, ref_c, ref_r, lengths = _pairs()
    trl_loss, trl_metrics = _trl_dpo(per_token, mask, ref_c, ref_r, loss_type, beta, label_smoothing)
    logps = per_token.sum(-1)  # (2B,)
    loss, metrics = dpo_loss(logps[:B], logps[B:], ref_c, ref_r, beta, loss_type, label_smoothing,
                             chosen_lengths=lengths[:B], rejected_lengths=lengths[B:])
    assert abs(loss.item() - trl_loss.item()) < 1e-6
    for key in METRIC_KEYS:
        assert abs(metrics[key] - trl_metrics[key]) < 1e-6, key


def test_label_smoothed_sigmoid_is_conservative_dpo():
    """cDPO's published form (TRL's sigmoid loss before 1.0): (1-ε)·BCE(label 1) + ε·BCE(label 0)."""
    per_token, _, ref_c, ref_r, _ = _pairs(1)
    logps = per_token.sum(-1)
    beta, eps = 0.2, 0.15
    logits = (logps[:B] - ref_c) - (logps[B:] - ref_r)
    expected = (-F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps).mean()
    loss, _ = dpo_loss(logps[:B], logps[B:], ref_c, ref_r, beta, "sigmoid", eps)
    assert abs(loss.item() - expected.item()) < 1e-12


def test_sigmoid_loss_is_ln2_and_margins_zero_when_policy_is_reference():
    logps = torch.tensor([-3.0, -7.5, -1.25])
    loss, metrics = dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert metrics["rewards/margins"] == 0.0
    assert metrics["rewards/accuracies"] == 0.0  # ties do not count as correct


def test_loss_gradient_raises_chosen_and_lowers_rejected():
    chosen = torch.tensor([-4.0], requires_grad=True)
    rejected = torch.tensor([-4.0], requires_grad=True)
    loss, _ = dpo_loss(chosen, rejected, torch.tensor([-4.0]), torch.tensor([-4.0]), beta=0.5)
    loss.backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()  # descent raises log π_c, lowers log π_r


def test_robust_refuses_label_smoothing_of_one_half():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="0.5"):
        dpo_loss(x, x, x, x, 0.1, "robust", 0.5)


def test_unknown_loss_type_is_refused():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="sigmoid"):
        dpo_loss(x, x, x, x, 0.1, "kto")


def read_metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


PAIRS = [
    {"prompt": "the cat", "chosen": "can run .", "rejected": "is in the cup ."},
    {"prompt": "the dog", "chosen": "can jump .", "rejected": "sat on the tree ."},
    {"prompt": "where is", "chosen": "the red ball ?", "rejected": "my mom ?"},
    {"prompt": "i see", "chosen": "a big dog .", "rejected": "the fish ."},
    {"prompt": "the girl", "chosen": "has a hat .", "rejected": "can see the bird ."},
    {"prompt": "the boy", "chosen": "can see the bird .", "rejected": "is big ."},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run(*args: str) -> int:
    from lmtune.cli import main

    return main(["train", *args])


def test_first_step_loss_is_ln2_with_zero_margins(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "run"
    assert run(f"model={model_dir}", f"data.train={data}", f"output_dir={out}", "train.steps=2",
               "train.batch_size=4") == 0
    first = read_metrics(out)[0]
    assert abs(first["loss"] - math.log(2)) < 1e-6
    assert abs(first["rewards/margins"]) < 1e-7 and first["rewards/chosen"] == first["rewards/rejected"] == 0.0
    for key in METRIC_KEYS:
        assert key in first
    assert json.loads((out / "summary.json").read_text())["objective"] == "dpo"


def test_precomputed_reference_gives_the_same_training(gpt2_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    common = [f"model={gpt2_dir}", f"data.train={data}", "train.steps=4", "train.batch_size=3", "train.lr=1e-2"]
    assert run(*common, f"output_dir={tmp_path / 'live'}") == 0
    assert run(*common, f"output_dir={tmp_path / 'pre'}", "dpo.precompute_ref=true") == 0
    live, pre = read_metrics(tmp_path / "live"), read_metrics(tmp_path / "pre")
    assert len(live) == len(pre) == 4
    for a, b in zip(live, pre, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5)
    assert live[-1]["rewards/margins"] != 0.0  # the policy did move away from the reference


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
def test_training_prefers_chosen_on_held_out_loss(gpt2_dir, tmp_path, loss_type):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "run"
    extra = ["dpo.label_smoothing=0.1"] if loss_type == "robust" else []
    assert run(f"model={gpt2_dir}", f"data.train={data}", f"data.eval={data}", f"output_dir={out}",
               "train.steps=15", "train.batch_size=6", "train.lr=1e-2", f"dpo.loss={loss_type}",
               "dpo.beta=0.5", *extra) == 0
    last = read_metrics(out)[-1]
    assert last["rewards/margins"] > 0 and last["rewards/accuracies"] > 0.5
    first_eval = dpo_loss(*(torch.zeros(1),) * 4, beta=0.5, loss_type=loss_type, label_smoothing=0.1 if extra else 0,
                          chosen_lengths=torch.ones(1), rejected_lengths=torch.ones(1))[0].item()
    assert last["eval_loss"] < first_eval  # below the loss of policy == reference


def test_reference_copy_stays_frozen_while_the_policy_trains(gpt2_dir):
    from lmtune.models.loading import load_causal_lm
    from lmtune.objectives.reference import Reference

    policy = load_causal_lm(gpt2_dir)
    ref = Reference(policy, adapter=False)
    with torch.no_grad():
        policy.transformer.wte.weight.add_(1.0)
    with ref.model() as m:
        assert not torch.equal(m.transformer.wte.weight, policy.transformer.wte.weight)
        assert not any(p.requires_grad for p in m.parameters())


def test_identical_pairs_are_counted_in_the_summary(gpt2_dir, tmp_path):
    rows = PAIRS + [{"prompt": "the cat", "chosen": "can run .", "rejected": "can run ."}]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "run"
    assert run(f"model={gpt2_dir}", f"data.train={data}", f"output_dir={out}", "train.steps=1") == 0
    assert json.loads((out / "summary.json").read_text())["data"]["dropped"] == {"identical chosen and rejected": 1}


@pytest.mark.parametrize("rows,extra,message", [
    ([{"prompt": "the cat", "chosen": "can run .", "rejected": "can run ."}], [], "no usable preference pairs"),
    ([{"prompt": "the cat", "chosen": "can run .", "rejected": ""}], [],
     "pairs.jsonl line 1: the rejected completion is empty"),
    ([{"prompt": "the cat can run", "chosen": ".", "rejected": "?"}], ["train.max_length=5"], "fills train.max_length"),
    (PAIRS, ["dpo.loss=robust", "dpo.label_smoothing=0.5"], "below 0.5"),
])
def test_bad_input_exits_2_with_a_clear_message(gpt2_dir, tmp_path, capsys, rows, extra, message):
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "run"
    assert run(f"model={gpt2_dir}", f"data.train={data}", f"output_dir={out}", "train.steps=1", *extra) == 2
    assert message in capsys.readouterr().err
    assert not (out / "summary.json").exists()


@pytest.mark.parametrize("precompute", ["false", "true"])
def test_lora_policy_uses_the_adapter_disabled_model_as_reference(model_dir, tmp_path, precompute):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "run"
    assert run(f"model={model_dir}", "method=lora", f"data.train={data}", f"output_dir={out}", "train.steps=6",
               "train.batch_size=6", "train.lr=2e-2", f"dpo.precompute_ref={precompute}") == 0
    records = read_metrics(out)
    assert abs(records[0]["loss"] - math.log(2)) < 1e-6  # B = 0 at init: policy == base == reference
    assert records[-1]["rewards/margins"] > 0
    assert (out / "adapter_config.json").is_file()


def test_adapter_reference_returns_base_log_probs_after_training(gpt2_dir):
    from lmtune.config import load_config
    from lmtune.data.preference import build_pairs, collate_pairs
    from lmtune.data.readers import Record
    from lmtune.methods.registry import METHODS
    from lmtune.models.loading import load_causal_lm, load_tokenizer
    from lmtune.objectives.lm import completion_logps
    from lmtune.objectives.reference import Reference

    tok = load_tokenizer(gpt2_dir)
    base = load_causal_lm(gpt2_dir).eval()
    policy = METHODS["lora"].prepare(load_causal_lm(gpt2_dir), tok, gpt2_dir, load_config(method="lora")).model
    with torch.no_grad():  # stand in for training: move every adapter weight
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    pairs, _ = build_pairs([Record(p, "x") for p in PAIRS], tok, 64)
    batch = collate_pairs(pairs, tok.pad_token_id)
    with torch.no_grad(), Reference(policy, adapter=True).model() as ref:
        ref_logps = completion_logps(ref, batch)
        base_logps = completion_logps(base, batch)
    with torch.no_grad():
        policy_logps = completion_logps(policy, batch)
    assert torch.allclose(ref_logps, base_logps, atol=1e-5)
    assert not torch.allclose(policy_logps, base_logps, atol=1e-3)


def test_tokens_trained_counts_completion_tokens_of_both_sides(gpt2_dir, tmp_path):
    from lmtune.models.loading import load_tokenizer

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "run"
    # One step over all six pairs: every completion token (plus its EOS) of chosen and rejected.
    assert run(f"model={gpt2_dir}", f"data.train={data}", f"output_dir={out}", "train.steps=1",
               "train.batch_size=6") == 0
    tok = load_tokenizer(gpt2_dir)
    expected = sum(len(tok(p[side], add_special_tokens=False)["input_ids"]) + 1
                   for p in PAIRS for side in ("chosen", "rejected"))
    assert json.loads((out / "summary.json").read_text())["tokens_trained"] == expected
