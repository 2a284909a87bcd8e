"""Bad input gets one readable message and exit 2 before work starts, and leaves no fake result.

Every case goes through ``lmtune.cli.main([...])``, as a user would, and checks: status 2, a
single ``lmtune: error:`` line naming the key/file/line/step, no traceback, and that the
output folder holds nothing that could be taken for a result.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import SENTENCES, fails, write_lines
from lmtune.checkpoint import FILES, _sha256, latest_good, verify
from lmtune.cli import main

RESULT_FILES = ("summary.json", "model.safetensors", "adapter_model.safetensors", "config.json")


def nothing_like_a_result(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


def _train(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", f"model={model}", f"data.train={data}", f"output_dir={out}", "train.batch_size=4", *extra]


# ---- configuration ----------------------------------------------------------------------------

@pytest.mark.parametrize(("override", "needle"), [
    ("train.lr=abc", "'train.lr' must be an integer or a number, got 'abc'"),
    ("train.batch_size=1.5", "'train.batch_size' must be an integer"),
    ("train.batch_size=0", "'train.batch_size' must be > 0"),
    ("train.steps=0", "'train.steps' must be > 0"),
    ("train.steps=-3", "'train.steps' must be > 0"),
    ("train.clip_grad_norm=-1", "'train.clip_grad_norm' must be >= 0"),
    ("train.seed=-1", "'train.seed' must be in [0, 2**32)"),
    ("train.seed=99999999999999999999999", "'train.seed' must be in [0, 2**32)"),
    ("train.betas=[0.9]", "'train.betas' must be two numbers"),
    ("train.epochs=.inf", "'train.epochs' must be a finite number"),
    ("train.precision=fp8", "'train.precision' must be one of fp32, bf16"),
    ("train.resume=maybe", "'train.resume' must be true or false"),
    ("lora.dropout=1.5", "'lora.dropout' must be in [0, 1)"),
    ("model=123", "'model' must be a string"),
])
def test_config_value_of_wrong_type_or_range_is_refused(capsys, tmp_path, corpus, override, needle):
    fails(capsys, ["train", f"data.train={corpus}", f"output_dir={tmp_path / 'o'}", override], needle)
    nothing_like_a_result(tmp_path / "o")


def test_unknown_config_key_suggests_the_nearest(capsys, tmp_path):
    fails(capsys, ["train", "train.lrr=1e-3", f"output_dir={tmp_path}"], "unknown config key 'train.lrr'",
          "Did you mean: train.lr")


def test_yaml_config_error_names_the_file(capsys, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  batch_size: [4]\n")
    fails(capsys, ["train", str(cfg)], str(cfg), "'train.batch_size' must be an integer")


# ---- models and tokenizers --------------------------------------------------------------------

def test_missing_model_folder(capsys, tmp_path, corpus):
    fails(capsys, _train(tmp_path / "nope", corpus, tmp_path / "o"), "does not exist")
    nothing_like_a_result(tmp_path / "o")


def test_folder_that_is_not_a_model(capsys, tmp_path, corpus):
    (tmp_path / "notmodel").mkdir()
    fails(capsys, _train(tmp_path / "notmodel", corpus, tmp_path / "o"), "not a model folder", "config.json")


def test_pickle_only_model_folder(capsys, gpt2_dir, tmp_path, corpus):
    folder = tmp_path / "pk"
    shutil.copytree(gpt2_dir, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    fails(capsys, _train(folder, corpus, tmp_path / "o"), "only pickle weights", "pytorch_model.bin")


def test_tokenizer_that_does_not_match_the_model(capsys, gpt2_dir, tmp_path, corpus):
    from lmtune.models.shipped import build_word_tokenizer

    folder = tmp_path / "swapped"
    shutil.copytree(gpt2_dir, folder)
    other = build_word_tokenizer([s.replace("cat", "cow") for s in SENTENCES])  # same size, other words
    other.save_pretrained(folder)
    fails(capsys, _train(folder, corpus, tmp_path / "o"), "is not the one the model", "fingerprint")
    nothing_like_a_result(tmp_path / "o")
    fails(capsys, ["generate", "--model", str(folder), "--prompt", "the cat"], "is not the one the model")


# ---- data -------------------------------------------------------------------------------------

def test_empty_dataset(capsys, gpt2_dir, tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n  \n")
    fails(capsys, _train(gpt2_dir, data, tmp_path / "o"), str(data), "no examples")
    nothing_like_a_result(tmp_path / "o")


def test_malformed_jsonl_line_names_file_and_line(capsys, gpt2_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "the cat can run ."}\n{"text": "the dog"}\n{"text": "the bird\n')
    fails(capsys, _train(gpt2_dir, data, tmp_path / "o"), f"{data} line 3: malformed JSON")
    nothing_like_a_result(tmp_path / "o")


def test_wrong_field_type_names_file_and_line(capsys, gpt2_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "the cat can run ."}\n{"text": ["the", "dog"]}\n')
    fails(capsys, _train(gpt2_dir, data, tmp_path / "o"), f"{data} line 2: field 'text' must be a string")


def test_word_outside_the_vocabulary_names_file_and_line(capsys, gpt2_dir, tmp_path):
    data = write_lines(tmp_path / "d.txt", ["the cat can run .", "the zebra can run ."])
    fails(capsys, _train(gpt2_dir, data, tmp_path / "o"), f"{data} line 2", "'zebra'")


def test_text_longer_than_the_context_is_truncated_and_counted(capsys, gpt2_dir, tmp_path):
    # The tiny model has 64 positions and train.max_length defaults to 256: without the cap at the
    # model's context, GPT-2's position embedding failed with an IndexError.
    long_line = " ".join(SENTENCES * 2)  # > 64 tokens
    data = write_lines(tmp_path / "d.txt", [long_line, "the cat can run .", long_line])
    out = tmp_path / "o"
    assert main(_train(gpt2_dir, data, out, "train.steps=1")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["truncated"] == 2 and summary["data"]["examples"] == 3
    assert "exceeds the model's context of 64" in capsys.readouterr().out


# ---- non-finite loss ----------------------------------------------------------------------------

def _nan_from_call(monkeypatch, n: int, value: float = float("nan")) -> None:
    """Make the LM loss non-finite from its ``n``-th call on (a diverging run, made deterministic)."""
    import lmtune.objectives.lm_task as lm_task

    real, calls = lm_task.lm_loss, {"n": 0}

    def loss(model, batch):
        calls["n"] += 1
        loss_sum, metrics = real(model, batch)
        return (loss_sum * value if calls["n"] >= n else loss_sum), metrics

    monkeypatch.setattr(lm_task, "lm_loss", loss)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(capsys, monkeypatch, gpt2_dir,
                                                                          corpus, tmp_path):
    _nan_from_call(monkeypatch, 5)
    out = tmp_path / "o"
    fails(capsys, _train(gpt2_dir, corpus, out, "train.steps=8", "train.save_every=2"),
          "the loss became nan at step 5", "step-000004")
    good = latest_good(out / "checkpoints")
    assert good is not None and good.name == "step-000004" and verify(good) is None
    assert not any((out / f).exists() for f in RESULT_FILES)


def test_inf_loss_at_the_first_step_leaves_nothing(capsys, monkeypatch, gpt2_dir, corpus, tmp_path):
    _nan_from_call(monkeypatch, 1, float("inf"))
    fails(capsys, _train(gpt2_dir, corpus, tmp_path / "o", "train.steps=3"), "the loss became inf at step 1",
          "No checkpoint was saved")
    nothing_like_a_result(tmp_path / "o")


# ---- checkpoints that do not fit ------------------------------------------------------------------

def _rewrite_checkpoint(folder: Path, change) -> None:
    """Edit a checkpoint's tensors and re-sign its manifest (so only the fit check can catch it)."""
    tensors = load_file(folder / "state.safetensors")
    change(tensors)
    save_file(tensors, folder / "state.safetensors")
    (folder / "manifest.json").write_text(json.dumps({"step": 2, "sha256": {n: _sha256(folder / n) for n in FILES}}))


def _drop(t):
    del t["model.transformer.h.0.mlp.c_fc.weight"]


def _extra(t):
    t["model.transformer.h.9.attn.weight"] = torch.zeros(3)


def _reshape(t):
    t["model.lm_head.weight" if "model.lm_head.weight" in t else "model.transformer.wte.weight"] = torch.zeros(5, 5)


def _optimizer_shape(t):
    key = next(k for k in t if k.startswith("optim.") and k.endswith(".exp_avg"))
    t[key] = torch.zeros(7)


@pytest.mark.parametrize(("change", "needle"), [
    (_drop, "missing transformer.h.0.mlp.c_fc.weight"),
    (_extra, "tensors this model does not train: transformer.h.9.attn.weight"),
    (_reshape, "is (5, 5) but the model's is"),
    (_optimizer_shape, "optimizer 'exp_avg'"),
])
def test_checkpoint_that_does_not_fit_is_refused_before_training(capsys, gpt2_dir, corpus, tmp_path, change,
                                                                  needle):
    out = tmp_path / "o"
    args = _train(gpt2_dir, corpus, out, "train.steps=2", "train.save_every=2")
    assert main(args) == 0
    metrics, summary = (out / "metrics.jsonl").read_text(), (out / "summary.json").read_text()
    _rewrite_checkpoint(out / "checkpoints" / "step-000002", change)
    capsys.readouterr()
    fails(capsys, [*args[:-2], "train.steps=4", "train.resume=true"], "step-000002", "does not fit", needle)
    # Refused before any step: the earlier run's outputs are untouched.
    assert (out / "metrics.jsonl").read_text() == metrics and (out / "summary.json").read_text() == summary


def test_fresh_run_into_a_folder_with_a_run_is_refused(capsys, gpt2_dir, corpus, tmp_path):
    out = tmp_path / "o"
    assert main(_train(gpt2_dir, corpus, out, "train.steps=1")) == 0
    capsys.readouterr()
    fails(capsys, _train(gpt2_dir, corpus, out, "train.steps=1"), "already holds a run")


# ---- adapters that do not fit ---------------------------------------------------------------------

def _drop_b(t):
    del t[next(k for k in t if k.endswith("lora_B.weight"))]


def _extra_adapter(t):
    t["base_model.model.transformer.h.0.attn.c_attn.bias"] = torch.zeros(3)


def _reshape_adapter(t):
    key = next(k for k in t if k.endswith("lora_A.weight"))
    t[key] = torch.zeros(t[key].shape[0], 5)


@pytest.mark.parametrize(("change", "needle"), [
    (_drop_b, "it needs lora_A and lora_B"),
    (_extra_adapter, "unexpected tensor"),
    (_reshape_adapter, "has shape"),
])
def test_adapter_with_missing_extra_or_misshaped_tensors_is_refused(capsys, gpt2_dir, tmp_path, change, needle):
    from adapter_helpers import saved_adapter

    adapter, _ = saved_adapter(tmp_path, "gpt2")
    tensors = load_file(adapter / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, adapter / "adapter_model.safetensors")
    fails(capsys, ["generate", "--model", str(gpt2_dir), "--adapter", str(adapter), "--prompt", "the cat"],
          str(adapter), needle)
