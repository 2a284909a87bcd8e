"""PPO and GRPO on a chat model: prompts rendered with its template, sampling stops at its end-of-turn token,
and a warning when nearly every response runs into the length cap. Oracle: ``apply_chat_template``."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from chat_helpers import ScriptedLM, chatml_tokenizer, oracle_ids
from conftest import build_model
from lmtune.cli import main
from lmtune.config import load_config
from lmtune.models.loading import save_model
from lmtune.objectives.rollouts import load_prompts
from lmtune.objectives.task import RunContext
from sft_helpers import records

PROMPTS = [{"prompt": "the cat sat on"}, {"prompt": "a dog sat"}]


def context(tok, setting: str = "auto") -> RunContext:
    cfg = load_config(overrides={"data.chat_template": setting, "objective": "grpo"})
    return RunContext(cfg, None, None, tok, None, None, _records={"data.train": records(PROMPTS)})


@pytest.mark.parametrize("style", ["qwen", "llama"])
def test_string_prompts_are_rendered_with_the_template_and_scored_raw(style):
    tok = chatml_tokenizer(style)
    prompts = load_prompts(context(tok), "data.train", "GRPO")
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    for row, p in zip(PROMPTS, prompts):
        assert p.ids == oracle_ids(tok, [{"role": "user", "content": row["prompt"]}], generation=True)
        assert p.scored_ids == bos + tok(row["prompt"], add_special_tokens=False)["input_ids"]
        assert p.value == row["prompt"]  # reward functions get the file's text


def test_chat_template_none_keeps_rollout_prompts_raw():
    tok = chatml_tokenizer("llama")
    p = load_prompts(context(tok, "none"), "data.train", "GRPO")[0]
    assert p.ids == [tok.bos_token_id] + tok("the cat sat on", add_special_tokens=False)["input_ids"]


def scripted_policy(tok) -> ScriptedLM:
    cue = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    return ScriptedLM(len(tok), cue, tok("the mat", add_special_tokens=False)["input_ids"],
                      tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("the"))


def test_ppo_and_grpo_sampling_stop_at_the_end_of_turn_token_and_score_the_bare_answer():
    from lmtune.objectives.grpo_task import Generations
    from lmtune.objectives.ppo_task import Rollouts

    tok = chatml_tokenizer("llama")  # EOS is </s>: only the template's <|im_end|> ends an answer
    prompts = load_prompts(context(tok), "data.train", "GRPO")
    policy, cfg = scripted_policy(tok), load_config()
    im_end, answer = tok.convert_tokens_to_ids("<|im_end|>"), tok("the mat", add_special_tokens=False)["input_ids"]
    seen = []
    rollouts = Rollouts(SimpleNamespace(policy=policy), None, lambda p, r, *_: seen.extend(r) or torch.zeros(len(r)),
                        [(p.value, p.ids, p.scored_ids) for p in prompts], tok, cfg.ppo, 2, 0)
    responses = rollouts.sample([p.ids for p in prompts], 0.0, 0)
    assert responses == [answer + [im_end]] * 2
    rollouts.score([0, 1], responses)
    assert seen == ["the mat", "the mat"]
    generations = Generations(policy, None, [], None, torch.ones(1), prompts, tok, cfg.grpo, 2, 0)
    assert generations.sample([p.ids for p in prompts], 0.0, 0) == [answer + [im_end]] * 2


REWARD = "def length(prompt, response):\n    return float(len(response))\n"


def test_ppo_warns_when_nearly_every_response_misses_the_end_of_turn(tmp_path, monkeypatch, capsys):
    (tmp_path / "chat_rl_rewards.py").write_text(REWARD, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    tok = chatml_tokenizer("qwen")
    folder = tmp_path / "m"
    save_model(build_model("llama", tok), tok, folder)
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS * 4), encoding="utf-8")
    assert main(["train", f"model={folder}", "objective=ppo", f"data.train={data}", f"output_dir={tmp_path / 'o'}",
                 "ppo.reward_fn=chat_rl_rewards:length", "ppo.rollout_batch_size=8", "train.batch_size=8",
                 "ppo.epochs=1", "ppo.max_new_tokens=3", "train.steps=1"]) == 0
    out = capsys.readouterr().out
    assert out.count("warning: 100% of the responses reached ppo.max_new_tokens=3") == 1
    assert "ppo.missing_eos_penalty=1 lowered their scores" in out
