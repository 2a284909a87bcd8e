"""objective=classify on tiny BERT, GPT-2 and Llama: pooling, saved forms, freezing, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from classify_helpers import bert_folder, topic_records, write_jsonl
from lmtune.cli import main
from lmtune.config import load_config
from lmtune.data.readers import read_records
from lmtune.errors import InputError
from lmtune.run import prepare
from lmtune.runlog import RunLog
from lmtune.train import train


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory):
    return bert_folder(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(params=["bert", "gpt2", "llama"])
def any_dir(request, bert_dir, tmp_path_factory):
    """Each architecture family once: an encoder and two causal LMs."""
    if request.param == "bert":
        return bert_dir
    from conftest import build_model, word_tokenizer
    from lmtune.models.loading import save_model

    tok = word_tokenizer()
    folder = tmp_path_factory.mktemp(f"cls-{request.param}")
    save_model(build_model(request.param, tok), tok, folder)
    return folder


@pytest.fixture()
def data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", topic_records(48)), write_jsonl(tmp_path / "eval.jsonl",
                                                                                 topic_records(12, seed=1))


def _cfg(model, train_file, out, **extra):
    base = {"model": str(model), "data.train": train_file if isinstance(train_file, list) else str(train_file),
            "output_dir": str(out), "objective": "classify", "train.steps": 6, "train.batch_size": 8,
            "train.lr": 1e-2}
    base.update(extra)
    return load_config(overrides=base)


def _train(cfg):
    """Train and also return the in-memory task (whose model is the one that was saved)."""
    task, ctx = prepare(cfg, RunLog(cfg.output_dir, quiet=True, tensorboard=False))
    summary = train(task, ctx.cfg.train, ctx.output_dir, log=ctx.log)
    return task, summary


def _batch(task, n=8):
    return task.batches.collate(task.batches.examples[:n])


def test_pool_hidden_matches_hand_computation():
    from lmtune.models.heads import pool_hidden

    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)  # (B, T, H)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])  # right- and left-padded rows
    torch.testing.assert_close(pool_hidden(hidden, mask, "cls"), hidden[:, 0])
    torch.testing.assert_close(pool_hidden(hidden, mask, "mean"),
                               torch.stack([hidden[0, :3].mean(0), hidden[1, 1:].mean(0)]))
    torch.testing.assert_close(pool_hidden(hidden, mask, "last"), torch.stack([hidden[0, 2], hidden[1, 3]]))


def test_saved_full_model_gives_transformers_the_same_logits(any_dir, data, tmp_path):
    # Oracle: transformers' own AutoModelForSequenceClassification on the saved folder.
    from transformers import AutoModelForSequenceClassification

    cfg = _cfg(any_dir, data[0], tmp_path / "out")
    task, _ = _train(cfg)
    batch = _batch(task)
    assert batch["attention_mask"].min() == 0, "the batch must hold padding for the test to mean anything"
    task.model.eval()
    with torch.no_grad():
        ours = task.model(batch)
        hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
        theirs = hf(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert hf.config.id2label == {0: "animal", 1: "thing"}


def test_predict_reloads_the_saved_model_with_the_same_probabilities(any_dir, data, tmp_path):
    from lmtune.models.heads import predict

    cfg = _cfg(any_dir, data[0], tmp_path / "out", **{"classify.pool": "mean", "data.eval": str(data[1])})
    task, _ = _train(cfg)
    records = read_records(data[1])
    y_true, y_pred, probs, names = predict(tmp_path / "out", None, records)
    task.model.eval()
    with torch.no_grad():
        expected = torch.softmax(task.model(task.batches.collate(task.eval_examples)), -1)  # same records, same order
    torch.testing.assert_close(torch.tensor(probs), expected, rtol=1e-5, atol=1e-6)
    assert names == ["animal", "thing"]
    assert y_true == [0 if r.fields["label"] == "animal" else 1 for r in records]
    assert y_pred == expected.argmax(-1).tolist()
    meta = json.loads((tmp_path / "out" / "lmtune.json").read_text())["classify"]
    assert meta["pool"] == "mean" and meta["hf_native"] is False


def test_classifier_learns_the_topic(bert_dir, data, tmp_path):
    cfg = _cfg(bert_dir, data[0], tmp_path / "out", **{"data.eval": str(data[1]), "train.steps": 30,
                                                        "train.lr": 3e-3})
    _, summary = _train(cfg)
    assert summary["eval_accuracy_before"] <= 0.75
    assert summary["eval_accuracy_after"] == 1.0


def test_freeze_trains_only_the_later_blocks_and_the_head(bert_dir, data, tmp_path):
    cfg = _cfg(bert_dir, data[0], tmp_path / "out", method="freeze", **{"freeze.layers": 1})
    _train(cfg)
    before, after = load_file(bert_dir / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    for name, value in before.items():
        changed = not torch.equal(value, after[f"bert.{name}"])
        should_change = name.startswith(("encoder.layer.1.", "pooler.")) and "LayerNorm" not in name
        if should_change:
            assert changed, name
        elif name.startswith(("embeddings.", "encoder.layer.0.")):
            assert not changed, name
    assert "classifier.weight" in after


def test_integer_labels_match_their_string_form_in_a_csv_eval_file(gpt2_dir, tmp_path):
    from lmtune.data.classification import label_names

    assert label_names(["10", "2", "9"]) == ["2", "9", "10"]
    train_file = write_jsonl(tmp_path / "t.jsonl", [{**r, "label": int(r["label"] == "thing")}
                                                    for r in topic_records(16)])
    (tmp_path / "e.csv").write_text("text,label\nthe cat is big .,0\ni see the cup .,1\n", encoding="utf-8")
    cfg = _cfg(gpt2_dir, train_file, tmp_path / "out", **{"data.eval": str(tmp_path / "e.csv"), "train.steps": 2})
    _, summary = _train(cfg)
    assert summary["classify"]["tasks"]["t"]["labels"] == ["0", "1"]
    assert summary["classify"]["tasks"]["t"]["eval_examples"] == 2


def test_one_class_is_refused(gpt2_dir, tmp_path, capsys):
    train_file = write_jsonl(tmp_path / "t.jsonl", [{"text": "the cat is big .", "label": "animal"}] * 4)
    code = main(["train", f"model={gpt2_dir}", f"data.train={train_file}", f"output_dir={tmp_path / 'o'}"])
    assert code == 2
    assert "one class ('animal')" in capsys.readouterr().err


def test_eval_labels_unseen_in_training_are_refused_by_name(gpt2_dir, data, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "e.jsonl", topic_records(4) + [{"text": "i see the cat .", "label": "plant"}])
    code = main(["train", f"model={gpt2_dir}", f"data.train={data[0]}", f"data.eval={bad}",
                 f"output_dir={tmp_path / 'o'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "'plant'" in err and "line 5" in err and "never seen in training" in err


def test_predict_refuses_unseen_labels_by_name(gpt2_dir, data, tmp_path):
    from lmtune.models.heads import predict

    _train(_cfg(gpt2_dir, data[0], tmp_path / "out", **{"train.steps": 1}))
    records = read_records(write_jsonl(tmp_path / "e.jsonl", [{"text": "i see the cat .", "label": "plant"}]))
    with pytest.raises(InputError, match="'plant'"):
        predict(tmp_path / "out", None, records)


def test_cls_pooling_on_a_causal_lm_warns_and_names_mean(gpt2_dir, data, tmp_path, capsys):
    code = main(["train", f"model={gpt2_dir}", f"data.train={data[0]}", f"output_dir={tmp_path / 'o'}",
                 "classify.pool=cls", "train.steps=1"])
    assert code == 0
    out = capsys.readouterr().out
    assert "warning: classify.pool=cls" in out and "classify.pool=mean" in out


def test_cls_pooling_on_a_bert_tokenizer_does_not_warn(bert_dir):
    from lmtune.models.heads import pool_warning
    from lmtune.models.loading import load_tokenizer

    assert pool_warning("cls", True, load_tokenizer(bert_dir)) is None


@pytest.mark.parametrize("objective", ["sft", "lm"])
def test_an_encoder_given_a_generative_objective_is_refused(bert_dir, data, tmp_path, capsys, objective):
    code = main(["train", f"model={bert_dir}", f"data.train={data[0]}", f"output_dir={tmp_path / 'o'}",
                 f"objective={objective}"])
    assert code == 2
    assert "encoders read text but don't generate it" in capsys.readouterr().err


def test_generate_refuses_an_encoder(bert_dir, capsys):
    assert main(["generate", "--model", str(bert_dir), "--prompt", "the cat"]) == 2
    assert "bert encoder" in capsys.readouterr().err


def test_classify_refuses_methods_it_does_not_support(gpt2_dir, data, tmp_path, capsys):
    code = main(["train", f"model={gpt2_dir}", f"data.train={data[0]}", f"output_dir={tmp_path / 'o'}",
                 "method=prompt_tuning"])
    assert code == 2
    assert "method=full or method=freeze or method=lora" in capsys.readouterr().err


def test_generate_classify_prints_each_label_with_the_probability_predict_gives(gpt2_dir, data, tmp_path, capsys):
    from lmtune.models.heads import predict

    _train(_cfg(gpt2_dir, data[0], tmp_path / "out", **{"train.steps": 2}))
    assert main(["generate", "--model", str(tmp_path / "out"), "--classify", "--prompt", "i see the cat ."]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    record = read_records(write_jsonl(tmp_path / "one.jsonl", [{"text": "i see the cat .", "label": "animal"}]))
    _, _, probs, names = predict(tmp_path / "out", None, record)
    assert {label: float(p) for label, p in lines} == pytest.approx(dict(zip(names, probs[0])), abs=1e-4)
    assert float(lines[0][1]) >= float(lines[1][1])


def test_text_pairs_are_framed_and_typed_as_transformers_does(bert_dir, tmp_path):
    # Oracle: the tokenizer's own pair encoding ([CLS] a [SEP] b [SEP], token types 0/1) fed to transformers.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lmtune.models.heads import predict

    pairs = [{"text": f"i see the {r['text'].split()[-2]} .", "text_pair": r["text"], "label": r["label"]}
             for r in topic_records(16)]
    train_file = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    _train(_cfg(bert_dir, train_file, tmp_path / "out", **{"train.steps": 3}))
    records = read_records(train_file)[:6]
    _, _, probs, _ = predict(tmp_path / "out", None, records)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    enc = tok([r.fields["text"] for r in records], [r.fields["text_pair"] for r in records], padding=True,
              return_tensors="pt")
    assert enc["token_type_ids"].max() == 1
    with torch.no_grad():
        theirs = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()(**enc).logits.softmax(-1)
    torch.testing.assert_close(torch.tensor(probs), theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_lora_adapter_with_its_head_loads_in_peft_with_the_same_logits(arch, bert_dir, gpt2_dir, data, tmp_path):
    # Oracle: PEFT loads the adapter folder (LoRA tensors + the head as a module to save) itself.
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from lmtune.models.heads import predict

    base = bert_dir if arch == "bert" else gpt2_dir
    _train(_cfg(base, data[0], tmp_path / "out", method="lora", **{"train.steps": 4}))
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    head = "classifier" if arch == "bert" else "score"
    assert config["modules_to_save"] == [head] and config["task_type"] == "SEQ_CLS"
    records = read_records(data[1])
    _, _, probs, _ = predict(base, tmp_path / "out", records)
    hf = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2, pad_token_id=0 if arch == "bert"
                                                            else json.loads((base / "config.json").read_text())
                                                            ["bos_token_id"])
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "out").eval()
    clf_task, _ = prepare(_cfg(base, data[0], tmp_path / "tmp", **{"data.eval": str(data[1])}))
    batch = clf_task.batches.collate(clf_task.eval_examples)  # lmtune's tokenization; the model is PEFT's
    with torch.no_grad():
        theirs = peft_model(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")
                               if k in batch}).logits.softmax(-1)
    torch.testing.assert_close(torch.tensor(probs), theirs, rtol=1e-5, atol=1e-6)


def test_lora_on_bert_adapts_query_and_value_by_default(bert_dir, data, tmp_path):
    _train(_cfg(bert_dir, data[0], tmp_path / "out", method="lora", **{"train.steps": 1}))
    targets = json.loads((tmp_path / "out" / "adapter_config.json").read_text())["target_modules"]
    assert sorted({t.rsplit(".", 1)[1] for t in targets}) == ["query", "value"] and len(targets) == 4


def test_new_heads_start_from_train_seed_alone(gpt2_dir, data, tmp_path):
    first, _ = prepare(_cfg(gpt2_dir, data[0], tmp_path / "a"))
    torch.rand(1000)  # whatever ran before in the process must not matter
    second, _ = prepare(_cfg(gpt2_dir, data[0], tmp_path / "b"))
    other, _ = prepare(_cfg(gpt2_dir, data[0], tmp_path / "c", **{"train.seed": 1}))
    assert torch.equal(first.model.heads[0].weight, second.model.heads[0].weight)
    assert not torch.equal(first.model.heads[0].weight, other.model.heads[0].weight)
