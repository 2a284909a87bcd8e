"""Throughput and progress: token counts against hand counts, elapsed time across a resume, the console line,
DPO's held-out reward accuracy against a hand computation, and in-memory eval rows in the Python API."""

from __future__ import annotations

import datetime
import json
import re
import signal
import time

import pytest
import torch

import lmtune
from conftest import SENTENCES, word_tokenizer
from lmtune.runlog import clock_time, console_line
from test_dpo import PAIRS as DPO_PAIRS

ROWS = [{"prompt": " ".join(s.split()[:2]), "completion": " ".join(s.split()[2:])} for s in SENTENCES]
PAIRS = DPO_PAIRS[:5]


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def hand_counts(tok) -> tuple[int, int]:
    """(loss-carrying, input) tokens of one pass over ROWS, from the tokenizer alone.

    Prompt/completion SFT masks the prompt: the completion and its EOS carry loss; the model reads
    BOS + prompt too. No padding counts.
    """
    prompt = [1 + len(tok(r["prompt"], add_special_tokens=False)["input_ids"]) for r in ROWS]  # BOS + prompt
    completion = [len(tok(r["completion"], add_special_tokens=False)["input_ids"]) + 1 for r in ROWS]  # + EOS
    return sum(completion), sum(p + c for p, c in zip(prompt, completion, strict=True))


@pytest.mark.parametrize("packing", [False, True])
def test_input_tokens_are_every_non_padding_token_and_tokens_only_the_loss_carrying(gpt2_dir, tmp_path, packing):
    steps = 3
    out = tmp_path / "run"
    # One batch holds every example, so each step is one pass over ROWS (padded to the longest, or packed).
    result = lmtune.train(gpt2_dir, data=ROWS, output_dir=out,
                          train={"steps": steps, "batch_size": len(ROWS), "packing": packing})
    loss_tokens, inputs = hand_counts(word_tokenizer())
    assert loss_tokens < inputs  # the prompts are read, not trained on
    rows = records(out)
    assert [r["tokens"] for r in rows] == [k * loss_tokens for k in range(1, steps + 1)]
    assert [r["input_tokens"] for r in rows] == [k * inputs for k in range(1, steps + 1)]
    s = result.summary
    assert s["tokens_trained"] == steps * loss_tokens and s["input_tokens_processed"] == steps * inputs
    # Both rates divide by the same seconds: their ratio is the ratio of the counts.
    assert s["input_tokens_per_second"] / s["tokens_per_second"] == pytest.approx(inputs / loss_tokens)
    assert s == json.loads((out / "summary.json").read_text())


def test_kto_counts_its_mismatched_rows_as_input(gpt2_dir, tmp_path):
    from lmtune.data.readers import records_from_rows
    from lmtune.objectives.kto_task import build_examples

    rows = [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
            for p in PAIRS for side in ("chosen", "rejected")]
    result = lmtune.train(gpt2_dir, data=rows, output_dir=tmp_path / "run", objective="kto",
                          train={"steps": 2, "batch_size": len(rows)})
    examples, _ = build_examples(records_from_rows(rows), result.tokenizer, 64)
    # One batch holds every example; its mismatched rows pair each prompt with another example's
    # completion, so they hold the same tokens again: twice the examples' tokens per step.
    per_step = 2 * sum(len(e["prompt_ids"]) + len(e["completion_ids"]) for e in examples)
    assert [r["input_tokens"] for r in records(tmp_path / "run")] == [per_step, 2 * per_step]
    assert result.summary["tokens_trained"] == 2 * sum(len(e["completion_ids"]) for e in examples)


def test_records_carry_utc_time_and_elapsed_continues_across_a_resume(gpt2_dir, tmp_path, monkeypatch):
    import lmtune.runlog as runlog

    out, pause = tmp_path / "run", 0.3
    train = {"steps": 4, "batch_size": 4, "save_every": 2, "log_every": 1}
    real_step = runlog.RunLog.step

    def first_process(self, record, total):  # slow steps, then SIGINT after step 2 (checkpoint, then stop)
        time.sleep(pause)
        real_step(self, record, total)
        if record["step"] == 2:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(runlog.RunLog, "step", first_process)
    began = datetime.datetime.now(datetime.timezone.utc)
    with pytest.raises(lmtune.Interrupted):
        lmtune.train(gpt2_dir, data=ROWS, output_dir=out, train=train)
    before = records(out)
    assert [r["step"] for r in before] == [1, 2]
    assert before[1]["elapsed_s"] >= pause  # the first step's logging sleep is inside the loop's time

    monkeypatch.setattr(runlog.RunLog, "step", real_step)
    result = lmtune.train(gpt2_dir, data=ROWS, output_dir=out, train={**train, "resume": True})
    ended = datetime.datetime.now(datetime.timezone.utc)
    rows = records(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    elapsed = [r["elapsed_s"] for r in rows]
    assert elapsed == sorted(elapsed) and elapsed[2] > elapsed[1]  # continued from the checkpoint, not from 0
    times = [datetime.datetime.fromisoformat(r["time"]) for r in rows]
    assert all(t.utcoffset() == datetime.timedelta(0) for t in times)
    assert began <= times[0] <= times[1] <= times[2] <= times[3] <= ended
    s = result.summary
    assert s["elapsed_s"] >= elapsed[-1] and s["elapsed_s"] > s["wall_seconds"]  # wall_seconds: this process only
    assert s["steps"] == 4 and s["input_tokens_processed"] == rows[-1]["input_tokens"]


def test_console_line_from_a_record():
    record = {"step": 20, "loss": 2.31, "lr": 1e-4, "tokens": 400, "input_tokens": 30_000, "elapsed_s": 41.0}
    since = {"step": 10, "loss": 2.5, "input_tokens": 5_320, "elapsed_s": 21.0}
    # 24,680 tokens in 20 s; 2 s a step since step 10, 180 steps to go.
    assert console_line(record, 200, since) == \
        "step 20/200 | loss 2.3100 | lr 1.0e-04 | 1,234 tok/s | 0:00:41 | ETA 0:06:00"
    dpo = {**record, "rewards/accuracies": 0.75, "rewards/margins": 0.1234, "eval_loss": 0.5}
    assert console_line(dpo, 200, None).endswith("| acc 0.75 | margin 0.123 | eval_loss 0.5000")
    assert console_line({"step": 1, "loss": 1.0, "score": 0.5, "kl": 0.02}, 5, None) == \
        "step 1/5 | loss 1.0000 | score 0.500 | kl 0.020"
    assert clock_time(3600 * 30 + 61) == "30:01:01"


def test_the_console_shows_throughput_elapsed_and_eta_each_step(gpt2_dir, tmp_path, capsys):
    lmtune.train(gpt2_dir, data=ROWS, output_dir=tmp_path / "run", train={"steps": 3, "batch_size": 4})
    out = capsys.readouterr().out
    pattern = r"step {}/3 \| loss \d+\.\d{{4}} \| lr \d\.\de-\d\d \| [\d,]+ tok/s \| \d+:\d\d:\d\d \| ETA \d+:\d\d:\d\d"
    for step in (1, 2, 3):
        assert re.search(f"^{pattern.format(step)}$", out, re.M), out
    assert re.search(r"^trained 3 steps in \d+:\d\d:\d\d \| [\d,]+ input tok/s \([\d,]+ loss-carrying tok/s\)$",
                     out, re.M), out


def hand_logp(model, prompt: list[int], completion: list[int]) -> float:
    """Summed log-probability of ``completion`` after ``prompt``: one unpadded forward, no lmtune code."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)  # (T-1, V): predicts ids[1:]
    return sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(completion))


def test_dpo_eval_reward_accuracy_and_margin_equal_a_hand_computation(gpt2_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from lmtune.data.preference import build_pairs
    from lmtune.data.readers import records_from_rows
    from lmtune.objectives.dpo import dpo_loss

    beta, out = 0.5, tmp_path / "run"
    result = lmtune.train(gpt2_dir, data=PAIRS, eval_data=PAIRS, output_dir=out, dpo={"beta": beta},
                          train={"steps": 6, "batch_size": 5, "lr": 1e-2, "eval_every": 3})
    s = result.summary
    # Before training the policy is the reference: every implicit reward is 0, and ties are not correct.
    assert s["eval_reward_accuracy_before"] == 0.0 and s["eval_reward_margin_before"] == 0.0

    policy, reference = result.model.eval(), AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    pairs, _ = build_pairs(records_from_rows(PAIRS), result.tokenizer, 256)
    logps = {(who, side): torch.tensor([hand_logp(m, p["prompt_ids"], p[f"{side}_ids"]) for p in pairs])
             for who, m in (("policy", policy), ("ref", reference)) for side in ("chosen", "rejected")}
    chosen = beta * (logps["policy", "chosen"] - logps["ref", "chosen"])  # (B,) implicit rewards
    rejected = beta * (logps["policy", "rejected"] - logps["ref", "rejected"])
    assert s["eval_reward_accuracy_after"] == pytest.approx((chosen > rejected).float().mean().item())
    assert s["eval_reward_margin_after"] == pytest.approx((chosen - rejected).mean().item(), abs=1e-5)
    assert s["eval_reward_margin_after"] > 0  # it trained on these very pairs
    _, metrics = dpo_loss(logps["policy", "chosen"], logps["policy", "rejected"], logps["ref", "chosen"],
                          logps["ref", "rejected"], beta)  # the pure function agrees with the hand computation
    assert s["eval_reward_accuracy_after"] == pytest.approx(metrics["rewards/accuracies"])
    assert s["eval_reward_margin_change"] == pytest.approx(s["eval_reward_margin_after"])

    evals = [r for r in records(out) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert evals[-1]["eval_reward_accuracy"] == s["eval_reward_accuracy_after"]
    console = capsys.readouterr().out
    assert re.search(r"^step 6/6 .*\| acc \d\.\d\d \| margin -?\d+\.\d{3} \| eval_loss .* \| eval_acc \d\.\d\d "
                     r"\| eval_margin", console, re.M), console


def test_in_memory_eval_rows_satisfy_eval_every_and_patience(gpt2_dir, tmp_path):
    # The check once looked only at data.eval, so held-out rows given to lmtune.train were refused.
    result = lmtune.train(gpt2_dir, data=ROWS, eval_data=ROWS[:4], output_dir=tmp_path / "run",
                          train={"steps": 4, "batch_size": 4, "eval_every": 2, "patience": 3})
    assert [r["step"] for r in records(tmp_path / "run") if "eval_loss" in r] == [2, 4]
    assert result.summary["eval_loss"] is not None
    with pytest.raises(lmtune.InputError, match="train.eval_every=2 evaluates data.eval"):
        lmtune.train(gpt2_dir, data=ROWS, output_dir=tmp_path / "none", train={"steps": 4, "eval_every": 2})


def test_dpo_held_out_pairs_go_through_one_pass_per_eval(gpt2_dir, tmp_path, monkeypatch):
    # eval_loss and the reward accuracy/margin come from the same forward passes: before training
    # and at each eval (steps 3 and 6); the "after" values are step 6's eval (the same weights), so
    # 3 passes over the eval pairs, besides 6 steps of 5.
    from lmtune.objectives import dpo_task

    collated = []
    real = dpo_task.collate_pairs
    monkeypatch.setattr(dpo_task, "collate_pairs", lambda ps, pad: collated.append(len(ps)) or real(ps, pad))
    eval_rows = PAIRS[:3]
    lmtune.train(gpt2_dir, data=PAIRS, eval_data=eval_rows, output_dir=tmp_path / "run",
                 train={"steps": 6, "batch_size": 5, "eval_every": 3})
    assert sum(collated) == 6 * 5 + 3 * len(eval_rows)
