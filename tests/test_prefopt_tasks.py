"""dpo.loss=orpo / simpo and objective=kto end to end on tiny models.

The losses are checked against TRL in test_prefopt_losses.py; here: reference-free losses
build no reference and run no reference forward, the first step's numbers are the closed
forms at policy == reference, training moves the implicit rewards the right way, and bad
input exits 2 naming the line.
"""

from __future__ import annotations

import json
import math

import pytest

from test_dpo import PAIRS, read_metrics, run, write_jsonl

UNPAIRED = [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
            for p in PAIRS for side in ("chosen", "rejected")]


@pytest.mark.parametrize("loss_type", ["orpo", "simpo"])
def test_reference_free_losses_never_build_a_reference(gpt2_dir, tmp_path, monkeypatch, loss_type):
    import lmtune.objectives.dpo_task as dpo_task

    def no_reference(*args, **kwargs):
        raise AssertionError("a reference-free loss built a reference model")

    monkeypatch.setattr(dpo_task, "Reference", no_reference)
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "run"
    assert run(f"model={gpt2_dir}", f"data.train={data}", f"data.eval={data}", f"output_dir={out}",
               "train.steps=15", "train.batch_size=6", "train.lr=1e-2", f"dpo.loss={loss_type}", "dpo.beta=2.0") == 0
    records = read_metrics(out)
    assert records[-1]["rewards/margins"] > records[0]["rewards/margins"]  # chosen pulled above rejected
    assert records[-1]["rewards/accuracies"] > 0.5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dpo"]["reference_model"] is False


def test_simpo_first_step_loss_is_the_closed_form_of_its_margins(gpt2_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "run"
    beta, gamma = 2.0, 0.5
    assert run(f"model={gpt2_dir}", f"data.train={data}", f"output_dir={out}", "train.steps=1", "train.batch_size=1",
               "dpo.loss=simpo", f"dpo.beta={beta}", f"dpo.simpo_gamma={gamma}") == 0
    first = read_metrics(out)[0]  # one pair: the loss is −log σ(margin − γ)
    expected = -math.log(1 / (1 + math.exp(-(first["rewards/margins"] - gamma))))
    assert first["loss"] == pytest.approx(expected, abs=1e-5)


def test_precompute_ref_with_a_reference_free_loss_is_refused(gpt2_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    assert run(f"model={gpt2_dir}", f"data.train={data}", f"output_dir={tmp_path / 'run'}", "dpo.loss=orpo",
               "dpo.precompute_ref=true") == 2
    assert "dpo.precompute_ref has no effect with dpo.loss=orpo" in capsys.readouterr().err


def test_kto_first_step_is_at_the_reference_and_training_separates_the_labels(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "unpaired.jsonl", UNPAIRED)
    out = tmp_path / "run"
    assert run(f"model={model_dir}", f"data.train={data}", f"output_dir={out}", "train.steps=15",
               "train.batch_size=12", "train.lr=1e-2", "kto.beta=0.5") == 0  # objective from the data format
    records = read_metrics(out)
    first = records[0]
    # policy == reference: every log-ratio and z are 0, so each example's loss is 1 − σ(0) = ½
    assert first["loss"] == pytest.approx(0.5, abs=1e-6) and first["kl"] == 0.0
    assert first["rewards/chosen"] == first["rewards/rejected"] == 0.0
    assert records[-1]["rewards/margins"] > 0.1
    assert json.loads((out / "summary.json").read_text())["objective"] == "kto"


def test_kto_with_lora_uses_the_adapter_disabled_reference(gpt2_dir, tmp_path):
    data = write_jsonl(tmp_path / "unpaired.jsonl", UNPAIRED)
    out = tmp_path / "run"
    assert run(f"model={gpt2_dir}", f"data.train={data}", f"output_dir={out}", "method=lora", "train.steps=6",
               "train.batch_size=12", "train.lr=2e-2", "kto.desirable_weight=1.33") == 0
    records = read_metrics(out)
    assert records[0]["loss"] == pytest.approx((6 * 1.33 * 0.5 + 6 * 0.5) / 12, abs=1e-6)
    assert records[-1]["rewards/margins"] > 0
    assert (out / "adapter_config.json").is_file()


def test_kto_reads_csv_labels_and_evaluates_held_out_examples(gpt2_dir, tmp_path):
    path = tmp_path / "unpaired.csv"
    path.write_text("prompt,completion,label\n" + "".join(
        f"{r['prompt']},{r['completion']},{str(r['label']).lower()}\n" for r in UNPAIRED), encoding="utf-8")
    out = tmp_path / "run"
    assert run(f"model={gpt2_dir}", f"data.train={path}", f"data.eval={path}", f"output_dir={out}", "train.steps=1",
               "train.batch_size=12") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["desirable"] == 6
    assert 0 < summary["eval_loss"] < 1  # each example's KTO loss lies in (0, max weight)


@pytest.mark.parametrize("row,message", [
    ({"prompt": "the cat", "completion": "can run .", "label": "maybe"}, "line 2: a KTO example needs 'label'"),
    ({"prompt": "the cat", "completion": "", "label": True}, "line 2: the completion is empty"),
    ({"prompt": "the cat", "completion": ["x"], "label": True}, "line 2: 'prompt' and 'completion' must both"),
])
def test_kto_bad_input_exits_2_naming_the_line(gpt2_dir, tmp_path, capsys, row, message):
    data = write_jsonl(tmp_path / "unpaired.jsonl", [UNPAIRED[0], row])
    assert run(f"model={gpt2_dir}", f"data.train={data}", f"output_dir={tmp_path / 'run'}", "objective=kto") == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["dpo.simpo_gamma=1.0"], "dpo.simpo_gamma=1.0 has no effect with dpo.loss=sigmoid: only dpo.loss=simpo reads it"),
    (["dpo.loss=orpo", "dpo.simpo_gamma=1.0"], "has no effect with dpo.loss=orpo"),
    (["kto.beta=0.5"], "kto.beta=0.5 has no effect with method=full objective=dpo: only objective=kto reads it"),
    (["grpo.num_generations=8"], "grpo.num_generations=8 has no effect with method=full objective=dpo: only "
                                 "objective=grpo reads it"),
])
def test_keys_of_another_loss_are_refused_not_ignored(gpt2_dir, tmp_path, capsys, extra, message):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "run"
    assert run(f"model={gpt2_dir}", f"data.train={data}", f"output_dir={out}", *extra) == 2
    assert message in capsys.readouterr().err
    assert not (out / "summary.json").exists()


def test_dpo_keys_are_refused_under_kto(gpt2_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "unpaired.jsonl", UNPAIRED)
    assert run(f"model={gpt2_dir}", f"data.train={data}", f"output_dir={tmp_path / 'run'}", "dpo.beta=0.5") == 2
    assert "dpo.beta=0.5 has no effect with method=full objective=kto" in capsys.readouterr().err
