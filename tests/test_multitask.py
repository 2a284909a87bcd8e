"""Multi-task classification: one body, one head per task, mixed batches, per-task metrics."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from classify_helpers import topic_records, verb_records, write_jsonl
from lmtune.cli import main
from lmtune.config import load_config
from lmtune.data.readers import read_records
from lmtune.errors import InputError
from lmtune.run import prepare
from lmtune.runlog import RunLog
from lmtune.train import train


@pytest.fixture()
def files(tmp_path):
    """topic (2 classes) and verb (3 classes): one file each, eval files with a task field."""
    topic, verb = write_jsonl(tmp_path / "topic.jsonl", topic_records(24)), write_jsonl(tmp_path / "verb.jsonl",
                                                                                        verb_records(24))
    evals = write_jsonl(tmp_path / "eval.jsonl", [{**r, "task": "topic"} for r in topic_records(6, seed=1)] +
                        [{**r, "task": "verb"} for r in verb_records(6, seed=1)])
    return topic, verb, evals


def _cfg(model, train_file, out, **extra):
    base = {"model": str(model), "data.train": train_file, "output_dir": str(out), "objective": "classify",
            "train.steps": 4, "train.batch_size": 8, "train.lr": 1e-2}
    base.update(extra)
    return load_config(overrides=base)


def _train(cfg):
    task, ctx = prepare(cfg, RunLog(cfg.output_dir, quiet=True, tensorboard=False))
    return task, train(task, ctx.cfg.train, ctx.output_dir, log=ctx.log)


def test_each_task_gets_its_own_head_and_label_map(gpt2_dir, files, tmp_path):
    _, summary = _train(_cfg(gpt2_dir, [str(files[0]), str(files[1])], tmp_path / "out",
                             **{"data.eval": str(files[2])}))
    meta = json.loads((tmp_path / "out" / "lmtune.json").read_text())["classify"]
    assert meta["tasks"] == {"topic": ["animal", "thing"], "verb": ["jump", "run", "see"]}
    heads = load_file(tmp_path / "out" / "classify_heads.safetensors")
    assert heads["topic.weight"].shape[0] == 2 and heads["verb.weight"].shape[0] == 3
    assert {"eval_accuracy_topic_before", "eval_accuracy_topic_after", "eval_accuracy_verb_before",
            "eval_accuracy_verb_after"} <= set(summary)
    assert summary["classify"]["tasks"]["verb"]["eval_examples"] == 6


def test_a_task_field_in_one_file_trains_exactly_like_one_file_per_task(gpt2_dir, files, tmp_path):
    one = write_jsonl(tmp_path / "both.jsonl", [{**r.fields, "task": "topic"} for r in read_records(files[0])] +
                      [{**r.fields, "task": "verb"} for r in read_records(files[1])])
    _, a = _train(_cfg(gpt2_dir, [str(files[0]), str(files[1])], tmp_path / "a"))
    _, b = _train(_cfg(gpt2_dir, str(one), tmp_path / "b"))
    assert a["final_loss"] == pytest.approx(b["final_loss"], rel=1e-6)
    assert json.loads((tmp_path / "a" / "lmtune.json").read_text())["classify"]["tasks"] == \
        json.loads((tmp_path / "b" / "lmtune.json").read_text())["classify"]["tasks"]


def test_batches_mix_tasks_and_each_row_trains_only_its_own_head(gpt2_dir, files, tmp_path):
    from lmtune.objectives.classify_task import classification_loss, classify_loss

    task, _ = prepare(_cfg(gpt2_dir, [str(files[0]), str(files[1])], tmp_path / "out"))
    batch = task.batches.collate(task.batches.examples[20:28])  # straddles the two tasks
    assert set(batch["task"].tolist()) == {0, 1}
    model = task.model
    loss, _ = classify_loss(model, batch)
    # Oracle: each task's rows scored alone by its own head, summed.
    rows = task.batches.examples[20:28]
    expected = sum(classification_loss(model(task.batches.collate([e for e in rows if e["task"] == t]), t),
                                       batch["labels"][batch["task"] == t])[0] for t in (0, 1))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    only_topic = task.batches.collate([e for e in task.batches.examples if e["task"] == 0][:4])
    model.zero_grad(set_to_none=True)
    classify_loss(model, only_topic)[0].backward()
    assert model.heads[0].weight.grad is not None and model.heads[0].weight.grad.abs().sum() > 0
    assert model.heads[1].weight.grad is None


def test_predict_uses_the_named_task_and_the_first_task_loads_in_transformers(gpt2_dir, files, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from lmtune.models.heads import predict

    task, _ = _train(_cfg(gpt2_dir, [str(files[0]), str(files[1])], tmp_path / "out"))
    verb = [r for r in read_records(files[2]) if r.fields["task"] == "verb"]
    _, _, probs, names = predict(tmp_path / "out", None, verb)
    assert names == ["jump", "run", "see"] and len(probs[0]) == 3
    # The first task's head is the model's own `score` layer, so transformers runs task 'topic'.
    batch = task.batches.collate([e for e in task.batches.examples if e["task"] == 0][:6])
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    task.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                   task.model(batch, 0), rtol=1e-5, atol=1e-5)


def test_predict_refuses_records_of_several_tasks(gpt2_dir, files, tmp_path):
    from lmtune.models.heads import predict

    _train(_cfg(gpt2_dir, [str(files[0]), str(files[1])], tmp_path / "out", **{"train.steps": 1}))
    with pytest.raises(InputError, match="one at a time"):
        predict(tmp_path / "out", None, read_records(files[2]))


def test_a_multi_task_eval_file_without_task_fields_is_refused(gpt2_dir, files, tmp_path, capsys):
    code = main(["train", f"model={gpt2_dir}", f"data.train=[{files[0]}, {files[1]}]", f"data.eval={files[0]}",
                 f"output_dir={tmp_path / 'o'}"])
    assert code == 2
    assert "needs a 'task' field" in capsys.readouterr().err


def test_records_missing_their_task_are_refused_by_line(gpt2_dir, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "t.jsonl", [{**r, "task": "topic"} for r in topic_records(4)] + topic_records(1))
    code = main(["train", f"model={gpt2_dir}", f"data.train={bad}", f"output_dir={tmp_path / 'o'}"])
    assert code == 2
    assert "line 5: no 'task' field" in capsys.readouterr().err


def test_a_task_with_one_class_is_named(gpt2_dir, files, tmp_path, capsys):
    one = write_jsonl(tmp_path / "one.jsonl", [r for r in topic_records(8) if r["label"] == "thing"])
    code = main(["train", f"model={gpt2_dir}", f"data.train=[{files[0]}, {one}]", f"output_dir={tmp_path / 'o'}"])
    assert code == 2
    assert "task 'one'" in capsys.readouterr().err
