"""objective=grpo end to end on tiny models: metrics, learning, reward-function errors, resume.

The loss itself is checked against TRL in test_prefopt_losses.py; here the objective is.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import SENTENCES

REWARDS = '''
def brevity(prompts, completions, **columns):
    return [-float(len(c.split())) for c in completions]

def has_cat(completions):
    return [float("cat" in c.split()) for c in completions]

def aligned(prompts, completions, answer):
    # the answer column must arrive in the order of the prompts (one group after another)
    assert all(p.split()[0] == a for p, a in zip(prompts, answer)), (prompts, answer)
    return [0.0] * len(completions)

def raises(prompts, completions):
    raise ValueError("no score for you")

def short(prompts, completions):
    return [0.0] * (len(completions) - 1)

def nan(prompts, completions):
    return [float("nan")] * len(completions)

def text(prompts, completions):
    return ["good"] * len(completions)
'''


@pytest.fixture()
def rewards_module(tmp_path, monkeypatch):
    (tmp_path / "grpo_test_rewards.py").write_text(REWARDS, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "grpo_test_rewards"


@pytest.fixture()
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": s.rsplit(" ", 2)[0], "answer": s.split()[0]} for s in SENTENCES]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run(*args: str) -> int:
    from lmtune.cli import main

    return main(["train", *args])


def read_metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def grpo_args(model, prompts, out, *extra):
    return [f"model={model}", "objective=grpo", f"data.train={prompts}", f"output_dir={out}",
            "grpo.generation_batch_size=4", "grpo.num_generations=4", "train.batch_size=8",
            "grpo.max_completion_length=6", *extra]


def test_first_step_logs_the_grpo_metrics_and_is_on_policy(model_dir, tmp_path, prompts, rewards_module):
    out = tmp_path / "run"
    assert run(*grpo_args(model_dir, prompts, out, "train.steps=3", "grpo.beta=0.1",
                          f"grpo.reward_fns=[{rewards_module}:brevity,{rewards_module}:has_cat]",
                          "grpo.reward_weights=[1.0,2.0]")) == 0
    first = read_metrics(out)[0]
    for key in ("reward", "reward_std", "rewards/brevity/mean", "rewards/brevity/std", "rewards/has_cat/mean",
                "completions/mean_length", "completions/max_length", "completions/clipped_ratio",
                "frac_reward_zero_std", "clip_ratio/region_mean", "kl"):
        assert key in first, key
    assert first["reward"] == pytest.approx(first["rewards/brevity/mean"] + 2 * first["rewards/has_cat/mean"])
    assert first["completions/max_length"] <= 6
    # the first micro-batch is scored by the policy that sampled it, which is still the reference
    assert first["clip_ratio/region_mean"] == 0.0 and abs(first["kl"]) < 1e-6
    assert abs(read_metrics(out)[-1]["kl"]) > 0  # two updates later the policy has moved


def test_grpo_learns_a_verifiable_reward(gpt2_dir, tmp_path, prompts, rewards_module):
    out = tmp_path / "run"
    assert run(*grpo_args(gpt2_dir, prompts, out, "train.steps=30", "train.lr=1e-2",
                          f"grpo.reward_fns={rewards_module}:brevity")) == 0
    rewards = [r["reward"] for r in read_metrics(out)]
    assert sum(rewards[-6:]) / 6 > sum(rewards[:3]) / 3 + 1.0  # completions got shorter by over a word


def test_reward_functions_get_the_extra_columns_in_prompt_order(gpt2_dir, tmp_path, prompts, rewards_module):
    out = tmp_path / "run"
    assert run(*grpo_args(gpt2_dir, prompts, out, "train.steps=2", f"grpo.reward_fns=[{rewards_module}:aligned]",
                          f"data.eval={prompts}")) == 0
    first = read_metrics(out)[0]
    assert first["frac_reward_zero_std"] == 1.0  # a constant reward ties every group
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_reward_before"] == summary["eval_reward_after"] == 0.0


@pytest.mark.parametrize("extra,message", [
    (["grpo.reward_fns={m}:raises"], "grpo_test_rewards:raises raised ValueError: no score for you"),
    (["grpo.reward_fns={m}:short"], "grpo_test_rewards:short returned 15 values for 16 completions"),
    (["grpo.reward_fns={m}:nan"], "grpo_test_rewards:nan returned nan for completion 0"),
    (["grpo.reward_fns={m}:text"], "grpo_test_rewards:text returned 'good'"),
    (["grpo.reward_fns={m}:missing"], "has no function 'missing'"),
    (["grpo.reward_fns=no_such_module_xyz:f"], "cannot import module"),
    (["grpo.reward_fns=[{m}:brevity]", "grpo.reward_weights=[1,2]"], "must be 1 numbers"),
    (["grpo.reward_fns=[{m}:brevity,{m}:brevity]"], "names a function twice"),
    ([], "objective=grpo needs a reward"),
    (["grpo.reward_fns={m}:brevity", "grpo.num_generations=1"], "at least 2"),
    (["grpo.reward_fns={m}:brevity", "grpo.epsilon_high=0.1"], "below grpo.epsilon"),
])
def test_bad_input_exits_2_naming_the_function(gpt2_dir, tmp_path, prompts, rewards_module, capsys, extra, message):
    out = tmp_path / "run"
    extra = [e.format(m=rewards_module) for e in extra]
    assert run(*grpo_args(gpt2_dir, prompts, out, "train.steps=1", *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (out / "summary.json").exists()


def test_prompts_with_different_columns_are_refused(gpt2_dir, tmp_path, rewards_module, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "the cat", "answer": "x"}\n{"prompt": "the dog"}\n', encoding="utf-8")
    assert run(*grpo_args(gpt2_dir, path, tmp_path / "run", f"grpo.reward_fns={rewards_module}:brevity")) == 2
    assert "p.jsonl line 2: has columns" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_adapter_policy_trains_against_the_adapter_disabled_reference(tmp_path, prompts, rewards_module, method):
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import word_tokenizer
    from lmtune.models.loading import save_model

    tok = word_tokenizer()
    torch.manual_seed(0)  # hidden 128: big enough for NF4 blocks
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.bos_token_id, tie_word_embeddings=False))
    folder = tmp_path / "llama"
    save_model(model, tok, folder)
    out = tmp_path / "run"
    assert run(*grpo_args(folder, prompts, out, f"method={method}", "train.steps=4", "train.lr=2e-2",
                          "grpo.beta=0.1", "grpo.num_iterations=2", f"grpo.reward_fns={rewards_module}:brevity")) == 0
    records = read_metrics(out)
    assert abs(records[0]["kl"]) < 1e-6 and records[-1]["kl"] > 0
    assert (out / "adapter_config.json").is_file()


def test_resume_mid_generation_batch_replays_the_saved_buffer(gpt2_dir, tmp_path, prompts, rewards_module):
    from rollout_helpers import run_killed_after

    # 16 completions × 2 iterations / batch 8 = 4 micro-batches per generation batch: the step-3
    # checkpoint is taken with one micro-batch of the first generation batch still unused.
    common = ["train.steps=6", "train.save_every=3", "grpo.num_iterations=2", "grpo.beta=0.05",
              f"grpo.reward_fns={rewards_module}:brevity"]
    assert run(*grpo_args(gpt2_dir, prompts, tmp_path / "a", *common)) == 0

    run_killed_after(4, lambda: run(*grpo_args(gpt2_dir, prompts, tmp_path / "b", *common)))
    assert run(*grpo_args(gpt2_dir, prompts, tmp_path / "b", *common, "train.resume=true")) == 0
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-6) and rb["reward"] == ra["reward"]
        assert rb["kl"] == pytest.approx(ra["kl"], abs=1e-6)


def test_top_k_one_samples_identical_completions_so_every_group_ties(gpt2_dir, tmp_path, prompts, rewards_module):
    out = tmp_path / "run"
    assert run(*grpo_args(gpt2_dir, prompts, out, "train.steps=1", "grpo.top_k=1",
                          f"grpo.reward_fns={rewards_module}:brevity")) == 0
    first = read_metrics(out)[0]
    assert first["frac_reward_zero_std"] == 1.0 and first["rewards/brevity/std"] == 0.0
    assert first["loss"] == 0.0  # all advantages are 0


def test_chat_prompts_need_a_chat_template(gpt2_dir, tmp_path, rewards_module, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "the cat"}]}) + "\n", encoding="utf-8")
    assert run(*grpo_args(gpt2_dir, path, tmp_path / "run", f"grpo.reward_fns={rewards_module}:brevity")) == 2
    err = capsys.readouterr().err
    assert "p.jsonl line 1: the prompt is chat messages but the tokenizer has no chat template" in err


def test_a_reward_model_folder_is_one_more_weighted_reward_source(gpt2_dir, tmp_path, prompts, rewards_module):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "the cat", "chosen": "can run .", "rejected": "is big ."}) + "\n")
    assert run(f"model={gpt2_dir}", "objective=reward", f"data.train={pairs}", f"output_dir={tmp_path / 'rm'}",
               "train.steps=1") == 0
    out = tmp_path / "run"
    assert run(*grpo_args(gpt2_dir, prompts, out, "train.steps=1", f"grpo.reward_fns={rewards_module}:brevity",
                          f"grpo.reward_model={tmp_path / 'rm'}", "grpo.reward_weights=[1.0,0.5]")) == 0
    first = read_metrics(out)[0]
    assert first["rewards/reward_model/std"] > 0  # the reward model scores completions differently
    assert first["reward"] == pytest.approx(first["rewards/brevity/mean"] + 0.5 * first["rewards/reward_model/mean"],
                                            abs=1e-6)


def test_epochs_count_passes_over_the_prompts(gpt2_dir, tmp_path, prompts, rewards_module):
    # 11 prompts / 4 per generation batch = 2.75 batches per epoch; 16 completions / batch 8 = 2 steps
    # each: ceil(5.5) = 6 steps.
    out = tmp_path / "run"
    assert run(*grpo_args(gpt2_dir, prompts, out, "train.epochs=1", f"grpo.reward_fns={rewards_module}:brevity")) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5, 6]


def test_grpo_refuses_compile(gpt2_dir, tmp_path, prompts, rewards_module, capsys):
    assert run(*grpo_args(gpt2_dir, prompts, tmp_path / "run", f"grpo.reward_fns={rewards_module}:brevity",
                          "train.compile=true")) == 2
    assert "train.compile does not work with objective=grpo" in capsys.readouterr().err
