"""Forgetting: retain loss measured before/after, and each mitigation doing what it says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import SENTENCES, write_lines
from lmtune.cli import main
from lmtune.config import load_config
from lmtune.objectives.task import ExampleBatches
from lmtune.regularize import Replay, l2_init
from lmtune.run import prepare, run_training
from lmtune.runlog import RunLog
from lmtune.train import train

TASK = ["where is the red ball ?", "can the cat run ?", "where is the cat ?", "can the dog jump ?"]
RETAIN = ["the cat can run .", "the red ball is big .", "i see a big dog .", "the girl has a hat ."]


def config(model_dir: Path, out: Path, **overrides):
    return load_config(overrides={"model": str(model_dir), "output_dir": str(out), "train.steps": 4,
                                  "train.batch_size": 4, "train.lr": 0.01, **overrides})


def run(cfg) -> dict:
    return run_training(cfg, log=RunLog(Path(cfg.output_dir), quiet=True, tensorboard=False)).summary


def distance_from(model: torch.nn.Module, initial: dict[str, torch.Tensor]) -> float:
    return sum(float((p.detach() - initial[n]).pow(2).sum()) for n, p in model.named_parameters())


def test_l2_penalty_is_lambda_times_squared_distance_with_gradient_2_lambda_delta():
    model = torch.nn.Linear(3, 2)
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    model.register_parameter("frozen", frozen)
    penalty = l2_init(model, lam=0.5)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.weight.add_(0.3)
        model.frozen.add_(5.0)  # frozen: not anchored, not penalised
    value = penalty(model)
    value.backward()
    assert float(value.detach()) == pytest.approx(0.5 * 6 * 0.3**2)
    assert torch.allclose(model.weight.grad, 2 * 0.5 * (model.weight - initial["weight"]))
    assert torch.allclose(model.bias.grad, torch.zeros(2))


def test_l2_init_keeps_weights_closer_to_the_start_than_without(gpt2_dir, tmp_path):
    data = write_lines(tmp_path / "task.txt", TASK * 4)
    distances = {}
    for lam in (0.0, 10.0):
        cfg = config(gpt2_dir, tmp_path / f"l2-{lam}", **{"data.train": str(data), "regularize.l2_init": lam,
                                                          "train.steps": 6})
        out = Path(cfg.output_dir)
        task, ctx = prepare(cfg, RunLog(out, quiet=True, tensorboard=False))
        initial = {n: p.detach().clone() for n, p in task.model.named_parameters()}
        train(task, ctx.cfg.train, out, log=ctx.log)
        distances[lam] = distance_from(task.model, initial)
        assert (lam > 0) == bool(task.regularizers)
    assert distances[10.0] < 0.5 * distances[0.0]


def test_replay_examples_make_up_the_ratio_of_each_batch():
    replay = [{"input_ids": [0, i], "labels": [0, i], "replay": True} for i in range(5)]
    mix = Replay(ExampleBatches([], list, 6, 0), replay, ratio=0.25, grad_accum=2)
    shares = []
    for step in range(10):
        for _ in range(2):
            batch = mix.mix([{"input_ids": [1, 2], "labels": [1, 2]}] * 6, step)
            shares.append(sum("replay" in e for e in batch) / len(batch))
            assert len(batch) - sum("replay" in e for e in batch) == 6  # every task example stays
    # 6 task examples at ratio 1/4 owe 2 replay examples per batch, exactly.
    assert shares == [0.25] * 20


def test_replay_share_is_exact_in_the_long_run_when_not_whole_per_batch():
    replay = [{"input_ids": [0, i], "labels": [0, i], "replay": True} for i in range(7)]
    mix = Replay(ExampleBatches([], list, 4, 3), replay, ratio=0.1, grad_accum=1)
    batches = [mix.mix([{"input_ids": [1], "labels": [1]}] * 4, step) for step in range(90)]
    replayed = sum(sum("replay" in e for e in b) for b in batches)
    total = sum(len(b) for b in batches)
    assert replayed / total == pytest.approx(0.1, abs=0.005)
    seen = [e["input_ids"][1] for b in batches for e in b if "replay" in e]
    assert sorted(seen[:7]) == list(range(7))  # a full pass over the replay data before repeating


def test_replay_is_a_function_of_the_step_so_resume_replays_the_same():
    replay = [{"input_ids": [0, i], "labels": [0, i]} for i in range(9)]
    a = Replay(ExampleBatches([], list, 2, 0), replay, ratio=0.5, grad_accum=1)
    first = [a.mix([], s) for s in range(6)]
    b = Replay(ExampleBatches([], list, 2, 0), replay, ratio=0.5, grad_accum=1)
    assert [b.mix([], s) for s in range(3, 6)] == first[3:]


def test_replay_data_reaches_the_training_batches(gpt2_dir, tmp_path):
    data = write_lines(tmp_path / "task.txt", TASK)
    replay = write_lines(tmp_path / "pretrain.txt", RETAIN)
    cfg = config(gpt2_dir, tmp_path / "out", **{"data.train": str(data), "regularize.replay_data": str(replay),
                                                "regularize.replay_ratio": 0.5})
    task, _ = prepare(cfg, RunLog(tmp_path / "out", quiet=True, tensorboard=False))
    batch = task.batches.mix(task.batches.inner.examples[:4], 0)
    texts = [ex["input_ids"] for ex in batch]
    replay_ids = [ex["input_ids"] for ex in task.batches.examples]
    assert len(batch) == 8 and sum(ids in replay_ids for ids in texts) == 4
    assert task.batches.collate(batch)["input_ids"].shape[0] == 8


def test_retain_loss_before_and_after_are_recorded(gpt2_dir, tmp_path):
    from lmtune.models.loading import load_model_and_tokenizer

    data = write_lines(tmp_path / "task.txt", TASK * 4)
    retain = write_lines(tmp_path / "retain.txt", RETAIN)
    out = tmp_path / "out"
    run(config(gpt2_dir, out, **{"data.train": str(data), "data.retain": str(retain), "train.eval_every": 2,
                                 "train.lr": 0.05}))
    summary = json.loads((out / "summary.json").read_text())
    # Oracle for "before": transformers' mean loss of the untouched base model on the retain text.
    model, tok, _ = load_model_and_tokenizer(gpt2_dir)
    ids = [[tok.bos_token_id] + tok(s, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for s in RETAIN]
    with torch.no_grad():
        sums = [float(model(input_ids=torch.tensor([x]), labels=torch.tensor([x])).loss) * (len(x) - 1) for x in ids]
    assert summary["retain_loss_before"] == pytest.approx(sum(sums) / sum(len(x) - 1 for x in ids), abs=1e-5)
    assert summary["retain_loss_after"] != pytest.approx(summary["retain_loss_before"], abs=1e-4)
    assert summary["retain_loss_change"] == pytest.approx(summary["retain_loss_after"] - summary["retain_loss_before"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "retain_loss" in r] == [2, 4]
    assert records[-1]["retain_loss"] == pytest.approx(summary["retain_loss_after"], abs=1e-6)


def test_empty_retain_file_exits_2_before_training(gpt2_dir, tmp_path, capsys):
    data = write_lines(tmp_path / "task.txt", TASK)
    empty = tmp_path / "retain.txt"
    empty.write_text("\n\n", encoding="utf-8")
    out = tmp_path / "out"
    code = main(["train", f"model={gpt2_dir}", f"data.train={data}", f"data.retain={empty}", f"output_dir={out}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "data.retain" in err and "empty" in err
    assert not (out / "summary.json").exists()


@pytest.mark.parametrize("overrides, message", [
    (["regularize.replay_ratio=0.3"], "regularize.replay_data and regularize.replay_ratio go together"),
    (["regularize.replay_data=REPLAY"], "regularize.replay_data and regularize.replay_ratio go together"),
    (["regularize.replay_data=REPLAY", "regularize.replay_ratio=1.0"], "must be in [0, 1)"),
])
def test_inconsistent_replay_keys_exit_2(gpt2_dir, tmp_path, capsys, overrides, message):
    data = write_lines(tmp_path / "task.txt", TASK)
    replay = write_lines(tmp_path / "replay.txt", SENTENCES)
    args = [o.replace("REPLAY", str(replay)) for o in overrides]
    code = main(["train", f"model={gpt2_dir}", f"data.train={data}", f"output_dir={tmp_path / 'out'}", *args])
    assert code == 2
    assert message in capsys.readouterr().err


def test_retain_and_replay_work_for_the_sft_objective(gpt2_dir, tmp_path):
    rows = [{"prompt": q, "completion": a} for q, a in zip(TASK, RETAIN)]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    retain = write_lines(tmp_path / "retain.txt", RETAIN)
    replay = write_lines(tmp_path / "replay.txt", SENTENCES)
    out = tmp_path / "out"
    summary = run(config(gpt2_dir, out, **{"data.train": str(data), "objective": "sft", "data.retain": str(retain),
                                           "regularize.replay_data": str(replay), "regularize.replay_ratio": 0.5,
                                           "regularize.l2_init": 0.01}))
    assert summary["objective"] == "sft" and summary["replay_examples"] == len(SENTENCES)
    assert summary["retain_loss_change"] == pytest.approx(summary["retain_loss_after"] - summary["retain_loss_before"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("reg_loss" in r for r in records)
