"""A run owns its output folder (lock, never the model folder) and records what it was (run.json, checked on resume).

Issue 16. Every case goes through ``lmtune.cli.main`` as a user would; each test failed before its fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import fails, write_lines
from lmtune.cli import main
from lmtune.rundir import LOCK_FILE, lock_output_dir


def train(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", f"model={model}", f"data.train={data}", f"output_dir={out}", "train.batch_size=4",
            "train.lr=1e-2", *extra]


def ok(capsys, args: list[str]) -> str:
    rc = main(args)
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- one process per output_dir -----------------------------------------------------------------

def test_a_second_run_on_a_locked_output_dir_is_refused_naming_the_first_pid(gpt2_dir, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    with lock_output_dir(out):  # stands for a first `lmtune train` still running
        fails(capsys, train(gpt2_dir, corpus, out, "train.steps=1"),
              f"in use by another lmtune run (pid {os.getpid()})")
        assert (out / LOCK_FILE).read_text().strip() == str(os.getpid())
    assert not out.exists()  # the lock made the folder; released empty, it is gone again


def test_the_lock_is_released_when_the_run_ends(gpt2_dir, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    ok(capsys, train(gpt2_dir, corpus, out, "train.steps=2", "train.save_every=1"))
    assert not (out / LOCK_FILE).exists()
    with lock_output_dir(out):  # free again: taken at once
        pass
    ok(capsys, train(gpt2_dir, corpus, out, "train.steps=3", "train.resume=true"))


def test_a_lock_file_left_by_a_killed_run_does_not_block(gpt2_dir, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text("99999999\n")  # SIGKILL leaves the file; the kernel dropped the lock
    ok(capsys, train(gpt2_dir, corpus, out, "train.steps=1"))


# ---- never the model folder ---------------------------------------------------------------------

@pytest.mark.parametrize("inside", ["", "runs/a"])
def test_output_dir_in_the_model_folder_is_refused(gpt2_dir, corpus, tmp_path, capsys, inside):
    model = tmp_path / "model"
    shutil.copytree(gpt2_dir, model)
    before = snapshot(model)
    fails(capsys, train(model, corpus, model / inside if inside else model, "train.steps=1"),
          "the model folder" if not inside else "inside the model folder", "write over the base model")
    assert snapshot(model) == before


# ---- run.json -----------------------------------------------------------------------------------

def test_run_json_records_the_resolved_config_and_each_data_files_hash(gpt2_dir, corpus, eval_corpus, tmp_path,
                                                                       capsys):
    out = tmp_path / "out"
    ok(capsys, train(gpt2_dir, corpus, out, "train.steps=1", f"data.eval={eval_corpus}"))
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["train.lr"] == 1e-2 and record["config"]["objective"] == "lm"  # resolved from the data
    assert record["config"]["data.format"] == "text"
    assert record["data_sha256"] == {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in (corpus, eval_corpus)}


@pytest.fixture()
def stopped(gpt2_dir, corpus, tmp_path, capsys) -> tuple[Path, list[str]]:
    """A run killed (here: ended) after step 2 with a checkpoint at every step, and its arguments."""
    out = tmp_path / "out"
    args = train(gpt2_dir, corpus, out, "train.save_every=1")
    ok(capsys, [*args, "train.steps=2"])
    return out, args


@pytest.mark.parametrize(("change", "listed"), [
    ("train.lr=0.05", "train.lr: 0.01 -> 0.05"),
    ("train.batch_size=2", "train.batch_size: 4 -> 2"),
    ("train.seed=7", "train.seed: 0 -> 7"),
    ("train.betas=[0.8,0.99]", "train.betas: [0.9, 0.999] -> [0.8, 0.99]"),
    ("train.weight_decay=0.1", "train.weight_decay: 0.0 -> 0.1"),
])
def test_resume_refuses_a_change_that_breaks_exactness(stopped, capsys, change, listed):
    out, args = stopped
    before = snapshot(out)
    fails(capsys, [*args, "train.steps=4", "train.resume=true", change], "would not continue the same run", listed)
    assert snapshot(out) == before


def test_resume_refuses_a_changed_data_file_and_lists_every_change(stopped, corpus, capsys):
    out, args = stopped
    write_lines(corpus, ["the cat can run ."] * 40)
    err = fails(capsys, [*args, "train.steps=4", "train.resume=true", "train.lr=0.05"],
                f"{corpus}: its content changed", "train.lr: 0.01 -> 0.05")
    assert "train.steps" not in err  # more steps is not a problem


def test_resume_with_more_steps_is_allowed_logged_and_exact(stopped, gpt2_dir, corpus, tmp_path, capsys):
    out, args = stopped
    said = ok(capsys, [*args, "train.steps=4", "train.resume=true"])
    assert "resuming with a changed setting that keeps the run exact: train.steps: 2 -> 4" in said
    assert json.loads((out / "run.json").read_text())["config"]["train.steps"] == 4
    straight = tmp_path / "straight"
    ok(capsys, train(gpt2_dir, corpus, straight, "train.save_every=1", "train.steps=4"))
    a, b = load_file(out / "model.safetensors"), load_file(straight / "model.safetensors")
    assert all(a[k].equal(b[k]) for k in a)  # bit for bit (constant schedule)


# ---- resume after early stopping ---------------------------------------------------------------

def test_resume_after_early_stopping_is_refused_and_keeps_the_best_weights(gpt2_dir, corpus, eval_corpus, tmp_path,
                                                                           capsys, monkeypatch):
    from lmtune import evaluation_loop

    losses = iter([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])  # best at step 1, worse from then on
    monkeypatch.setattr(evaluation_loop, "held_out", lambda *a, **k: {"eval_loss": next(losses)})
    out = tmp_path / "out"
    args = train(gpt2_dir, corpus, out, f"data.eval={eval_corpus}", "train.eval_every=1", "train.patience=1",
                 "train.save_every=1", "train.steps=6")
    said = ok(capsys, args)
    assert "early stopping at step 2" in said
    assert json.loads((out / "summary.json").read_text())["stopped_early_at"] == 2
    before = snapshot(out)
    fails(capsys, [*args, "train.resume=true"], "is finished: early stopping ended it at step 2", "best weights")
    assert snapshot(out) == before  # the best weights saved are still the result
