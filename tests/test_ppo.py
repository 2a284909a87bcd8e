"""PPO: the pure pieces against their published definitions, and the ppo objective end to end.

TRL 1.16 no longer ships a PPO trainer, so the oracle is the textbook form of each formula
written independently here (sums over future steps, per-element loops), not a copy of the
recursions in ``lmtune.objectives.ppo``.
"""

from __future__ import annotations

import math

import pytest
import torch

from lmtune.objectives.ppo import gae, masked_whiten, per_token_rewards, policy_loss, value_loss


def _rollout(seed: int = 0, b: int = 3, t: int = 5):
    g = torch.Generator().manual_seed(seed)
    lengths = [t, 2, 1][:b]
    mask = torch.zeros(b, t, dtype=torch.float64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    rand = lambda: torch.randn(b, t, generator=g, dtype=torch.float64)  # noqa: E731
    return mask, lengths, rand


def test_gae_matches_the_discounted_sum_of_td_errors():
    mask, lengths, rand = _rollout()
    rewards, values = rand(), rand()
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for i, n in enumerate(lengths):
        v = values[i, :n].tolist() + [0.0]  # the value after the last token is 0
        deltas = [rewards[i, s].item() + gamma * v[s + 1] - v[s] for s in range(n)]
        for s in range(n):
            expected = sum((gamma * lam) ** k * deltas[s + k] for k in range(n - s))
            assert adv[i, s].item() == pytest.approx(expected, abs=1e-12)
            assert ret[i, s].item() == pytest.approx(expected + v[s], abs=1e-12)
        assert adv[i, n:].abs().sum() == 0 and ret[i, n:].abs().sum() == 0


def test_gae_with_lambda_one_and_gamma_one_gives_reward_to_go_minus_value():
    mask, lengths, rand = _rollout(1)
    rewards, values = rand(), rand()
    adv, _ = gae(rewards, values, mask, 1.0, 1.0)
    for i, n in enumerate(lengths):
        for s in range(n):
            assert adv[i, s].item() == pytest.approx(rewards[i, s:n].sum().item() - values[i, s].item(), abs=1e-12)


def test_per_token_rewards_put_the_score_on_the_last_token_and_penalise_kl():
    mask, lengths, rand = _rollout(2)
    logp, ref = rand(), rand()
    scores = torch.tensor([1.5, -2.0, 0.25], dtype=torch.float64)
    rewards, kl = per_token_rewards(scores, logp, ref, mask, kl_coef=0.3)
    for i, n in enumerate(lengths):
        for s in range(n):
            expected = -0.3 * (logp[i, s] - ref[i, s]).item() + (scores[i].item() if s == n - 1 else 0.0)
            assert rewards[i, s].item() == pytest.approx(expected, abs=1e-12)
            assert kl[i, s].item() == pytest.approx((logp[i, s] - ref[i, s]).item(), abs=1e-12)
        assert rewards[i, n:].abs().sum() == 0 and kl[i, n:].abs().sum() == 0


def test_whitening_gives_zero_mean_unit_unbiased_variance_on_the_mask():
    mask, _, rand = _rollout(3)
    x = rand() * 5 + 3
    w = masked_whiten(x, mask)
    kept = w[mask.bool()]
    assert kept.mean().item() == pytest.approx(0.0, abs=1e-9)
    assert kept.var(unbiased=True).item() == pytest.approx(1.0, abs=1e-6)
    assert w[~mask.bool()].abs().sum() == 0
    raw = x[mask.bool()]
    assert torch.allclose(kept, (raw - raw.mean()) / torch.sqrt(raw.var(unbiased=True) + 1e-8))


def test_policy_loss_matches_the_clipped_surrogate_elementwise():
    mask, _, rand = _rollout(4)
    new, old, adv = rand() * 0.5, rand() * 0.5, rand()
    eps = 0.2
    loss, metrics = policy_loss(new, old, adv, mask, eps)
    terms, clipped = [], []
    for i, j in mask.nonzero().tolist():
        ratio = math.exp(new[i, j].item() - old[i, j].item())
        a = adv[i, j].item()
        unclipped_term, clipped_term = -a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)
        terms.append(max(unclipped_term, clipped_term))
        clipped.append(clipped_term > unclipped_term)
    assert loss.item() == pytest.approx(sum(terms) / len(terms), abs=1e-12)
    assert metrics["clip_fraction"] == pytest.approx(sum(clipped) / len(clipped), abs=1e-12)
    assert 0 < metrics["clip_fraction"] < 1  # the inputs exercise both branches


def test_value_loss_matches_the_clipped_squared_error_elementwise():
    mask, _, rand = _rollout(5)
    v_new, v_old, ret = rand(), rand(), rand()
    eps = 0.2
    loss, metrics = value_loss(v_new, v_old, ret, mask, eps)
    terms, clipped = [], []
    for i, j in mask.nonzero().tolist():
        v, vo, r = v_new[i, j].item(), v_old[i, j].item(), ret[i, j].item()
        vc = min(max(v, vo - eps), vo + eps)
        terms.append(max((v - r) ** 2, (vc - r) ** 2))
        clipped.append((vc - r) ** 2 > (v - r) ** 2)
    assert loss.item() == pytest.approx(0.5 * sum(terms) / len(terms), abs=1e-12)
    assert metrics["value_clip_fraction"] == pytest.approx(sum(clipped) / len(clipped), abs=1e-12)


def test_policy_loss_at_the_rollout_policy_is_minus_mean_advantage():
    mask, _, rand = _rollout(6)
    logp, adv = rand(), rand()
    loss, metrics = policy_loss(logp, logp, adv, mask, 0.2)
    assert loss.item() == pytest.approx(-(adv * mask).sum().item() / mask.sum().item(), abs=1e-12)
    assert metrics["clip_fraction"] == 0.0 and metrics["approx_kl"] == 0.0


# --- the ppo objective end to end -------------------------------------------------------------

import json  # noqa: E402

from conftest import SENTENCES, write_lines  # noqa: E402

REWARDS = '''
def brevity(prompt, response):
    return -float(len(response.split()))

def one_arg(response):
    return 1.0

def raises(prompt, response):
    raise ValueError("no score for you")

def nan(prompt, response):
    return float("nan")

def text(prompt, response):
    return "good"
'''


@pytest.fixture()
def rewards_module(tmp_path, monkeypatch):
    (tmp_path / "ppo_test_rewards.py").write_text(REWARDS, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "ppo_test_rewards"


def run(*args: str) -> int:
    from lmtune.cli import main

    return main(["train", *args])


def read_metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def ppo_args(model, prompts, out, *extra):
    return [f"model={model}", "objective=ppo", f"data.train={prompts}", f"output_dir={out}",
            "ppo.rollout_batch_size=8", "train.batch_size=4", "ppo.epochs=2", "ppo.max_new_tokens=6", *extra]


def test_layout_points_each_response_token_at_the_position_that_predicts_it():
    from lmtune.objectives.ppo_task import layout

    prompts, responses = [[9, 1, 2], [9, 3]], [[4, 5, 9], [6]]
    b = layout(prompts, responses, pad_id=0)
    for i in range(2):
        for j in range(len(responses[i])):
            assert b["input_ids"][i, b["response_index"][i, j] + 1] == b["response_ids"][i, j] == responses[i][j]
    assert b["response_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]


def test_first_rollout_has_zero_kl_and_logs_the_ppo_metrics(model_dir, tmp_path, rewards_module):
    from transformers import AutoModelForCausalLM

    prompts = write_lines(tmp_path / "prompts.txt", [s.rsplit(" ", 2)[0] for s in SENTENCES])
    out = tmp_path / "run"
    assert run(*ppo_args(model_dir, prompts, out, "train.steps=5", f"ppo.reward_fn={rewards_module}:brevity")) == 0
    records = read_metrics(out)
    first = records[0]
    for key in ("score", "kl", "total_reward", "clip_fraction", "value_loss", "policy_loss", "response_length"):
        assert key in first, key
    assert abs(first["kl"]) < 1e-6  # the first rollout's policy is the reference
    assert first["approx_kl"] == 0.0 and first["clip_fraction"] == 0.0  # nor has it moved from the rollout policy
    assert records[-1]["kl"] != 0.0  # the second rollout (step 5) comes from a trained policy
    saved = AutoModelForCausalLM.from_pretrained(out)  # only the policy is saved, as a plain causal LM
    assert not any("value_head" in k for k in saved.state_dict())


def test_ppo_learns_a_dense_reward(gpt2_dir, tmp_path, rewards_module):
    prompts = write_lines(tmp_path / "prompts.txt", [s.rsplit(" ", 2)[0] for s in SENTENCES])
    out = tmp_path / "run"
    assert run(*ppo_args(gpt2_dir, prompts, out, "train.steps=40", "train.lr=1e-2", "ppo.kl_coef=0.0",
                         "ppo.missing_eos_penalty=0.0", f"ppo.reward_fn={rewards_module}:brevity")) == 0
    scores = [r["score"] for r in read_metrics(out)]
    assert sum(scores[-8:]) / 8 > sum(scores[:4]) / 4 + 1.0  # responses got shorter by over a word


def test_one_argument_reward_function_gets_the_response(gpt2_dir, tmp_path, rewards_module):
    prompts = write_lines(tmp_path / "prompts.txt", SENTENCES[:4])
    out = tmp_path / "run"
    assert run(*ppo_args(gpt2_dir, prompts, out, "train.steps=1", "ppo.missing_eos_penalty=0",
                         f"ppo.reward_fn={rewards_module}:one_arg")) == 0
    assert read_metrics(out)[0]["score"] == 1.0


def test_reward_model_folder_scores_rollouts(gpt2_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "the cat", "chosen": "can run .", "rejected": "is big ."}) + "\n")
    assert run(f"model={gpt2_dir}", "objective=reward", f"data.train={pairs}", f"output_dir={tmp_path / 'rm'}",
               "train.steps=1") == 0
    prompts = write_lines(tmp_path / "prompts.txt", SENTENCES[:4])
    out = tmp_path / "run"
    assert run(*ppo_args(gpt2_dir, prompts, out, "train.steps=2", f"ppo.reward_model={tmp_path / 'rm'}",
                         f"data.eval={prompts}")) == 0
    assert math.isfinite(read_metrics(out)[0]["score"])
    summary = json.loads((out / "summary.json").read_text())
    assert math.isfinite(summary["eval_score_before"]) and math.isfinite(summary["eval_score_after"])


@pytest.mark.parametrize("extra,message", [
    (["ppo.reward_fn={m}:raises"], "raised ValueError: no score for you"),
    (["ppo.reward_fn={m}:nan"], "returned nan"),
    (["ppo.reward_fn={m}:text"], "must return a finite number"),
    (["ppo.reward_fn={m}"], "must be module:function"),
    (["ppo.reward_fn={m}:missing"], "has no function 'missing'"),
    (["ppo.reward_fn=no_such_module_xyz:f"], "cannot import module"),
    ([], "exactly one reward source"),
    (["ppo.reward_model={model}"], "is not a reward model"),
    (["ppo.reward_model={tmp}/nowhere"], "does not exist"),
    (["ppo.reward_fn={m}:brevity", "train.max_length=3"], "fills train.max_length=3"),
])
def test_bad_input_exits_2_with_a_clear_message(gpt2_dir, tmp_path, rewards_module, capsys, extra, message):
    prompts = write_lines(tmp_path / "prompts.txt", SENTENCES[:4])
    out = tmp_path / "run"
    extra = [e.format(m=rewards_module, model=gpt2_dir, tmp=tmp_path) for e in extra]
    assert run(*ppo_args(gpt2_dir, prompts, out, "train.steps=1", *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (out / "summary.json").exists()


def test_lora_policy_trains_against_the_adapter_disabled_reference(gpt2_dir, tmp_path, rewards_module):
    prompts = write_lines(tmp_path / "prompts.txt", [s.rsplit(" ", 2)[0] for s in SENTENCES])
    out = tmp_path / "run"
    assert run(*ppo_args(gpt2_dir, prompts, out, "method=lora", "train.steps=5", "train.lr=2e-2",
                         f"ppo.reward_fn={rewards_module}:brevity")) == 0
    records = read_metrics(out)
    assert abs(records[0]["kl"]) < 1e-6 and records[-1]["kl"] != 0.0
    assert (out / "adapter_config.json").is_file()


def test_resume_mid_rollout_replays_the_saved_buffer(gpt2_dir, tmp_path, rewards_module):
    from rollout_helpers import run_killed_after

    prompts = write_lines(tmp_path / "prompts.txt", [s.rsplit(" ", 2)[0] for s in SENTENCES])
    # 8 prompts × 2 epochs / batch 4 = 4 micro-batches per rollout: the step-3 checkpoint is taken
    # with one micro-batch of the first rollout still unused.
    common = ["train.steps=6", "train.save_every=3", f"ppo.reward_fn={rewards_module}:brevity"]
    assert run(*ppo_args(gpt2_dir, prompts, tmp_path / "a", *common)) == 0

    run_killed_after(4, lambda: run(*ppo_args(gpt2_dir, prompts, tmp_path / "b", *common)))
    assert run(*ppo_args(gpt2_dir, prompts, tmp_path / "b", *common, "train.resume=true")) == 0
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-6) and rb["score"] == ra["score"]
