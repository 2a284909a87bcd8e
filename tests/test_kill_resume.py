"""Interrupted runs lose nothing: SIGKILL at many points, SIGINT/SIGTERM, then ``train.resume=true``.

Each run is a real ``python -m lmtune train`` process. A ``sitecustomize`` module, put on the
path of these test processes only, pauses the process at a chosen point (after a step, half-way
through a checkpoint's files, before the rename, during pruning, during the final save) and
writes ``paused``; the test then kills it from outside with SIGKILL (or sends SIGINT/SIGTERM and
lets it go on). After the last resume, the final weights and every logged record must equal, bit
for bit, those of an uninterrupted run. The model has dropout, so the RNG states matter too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import SENTENCES, word_tokenizer, write_lines
from lmtune.checkpoint import latest_good, list_checkpoints, step_of

SRC = Path(__file__).resolve().parents[1] / "src"
STEPS, SAVE_EVERY = 22, 4

# Test-only fault injection; lmtune itself reads no such variable.
SITECUSTOMIZE = r'''
import json, os, time
from pathlib import Path

_SPEC = os.environ.get("LMTUNE_TEST_PAUSE")


def _pause(point):
    ctl = Path(os.environ["LMTUNE_TEST_DIR"])
    (ctl / "paused").write_text(point)
    while not (ctl / "go").exists():  # SIGKILL ends this; SIGINT/SIGTERM handlers run, then "go"
        time.sleep(0.02)


def _half(path):
    os.truncate(path, os.path.getsize(path) // 2)


def _install(point, n):
    import lmtune.checkpoint as ck
    import lmtune.methods.full as full
    import lmtune.runlog as rl

    tmp_name = f".tmp-step-{n:06d}"
    if point == "after_step":
        real_step = rl.RunLog.step

        def step(self, record, total):
            real_step(self, record, total)
            if record["step"] == n:
                _pause(point)
        rl.RunLog.step = step
    elif point == "metrics_partial":  # killed half-way through writing a metrics line
        real_step = rl.RunLog.step

        def step(self, record, total):
            if record["step"] == n:
                line = json.dumps(record)
                with (self.output_dir / "metrics.jsonl").open("a") as f:
                    f.write(line[: len(line) // 2])
                _pause(point)
            real_step(self, record, total)
        rl.RunLog.step = step
    elif point == "ckpt_tensors_partial":  # killed half-way through state.safetensors
        real_save = ck.save_file

        def save_file(tensors, filename, *a, **k):
            real_save(tensors, filename, *a, **k)
            if Path(filename).parent.name == tmp_name:
                _half(filename)
                _pause(point)
        ck.save_file = save_file
    elif point == "ckpt_before_manifest":  # tensors and state.json written, no manifest yet
        real_write = ck._fsync_write

        def fsync_write(path, data):
            if path.name == "manifest.json" and path.parent.name == tmp_name:
                _pause(point)
            real_write(path, data)
        ck._fsync_write = fsync_write
    elif point == "ckpt_before_rename":  # the temporary folder is complete, not yet renamed
        real_publish = ck._publish

        def publish(tmp, final):
            if tmp.name == tmp_name:
                _pause(point)
            real_publish(tmp, final)
        ck._publish = publish
    elif point in ("ckpt_before_prune", "ckpt_mid_prune"):
        real_prune = ck._prune

        def prune(root, step, keep):
            if step == n:
                if point == "ckpt_mid_prune":  # rmtree of the oldest had removed one file
                    (ck.list_checkpoints(root)[0] / "state.safetensors").unlink()
                _pause(point)
            real_prune(root, step, keep)
        ck._prune = prune
    elif point == "final_save":  # half of model.safetensors written
        real_model = full.save_model

        def save_model(model, tokenizer, folder, meta=None):
            real_model(model, tokenizer, folder, meta)
            _half(folder / "model.safetensors")
            _pause(point)
        full.save_model = save_model
    else:
        raise ValueError(point)


if _SPEC:
    _point, _, _n = _SPEC.partition(":")
    _install(_point, int(_n or 0))
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny GPT-2 with dropout (so RNG state matters), data, and the test-only hook folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmtune.models.loading import save_model

    root = tmp_path_factory.mktemp("kill")
    tok = word_tokenizer()
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.bos_token_id,
                     resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    save_model(GPT2LMHeadModel(cfg), tok, root / "model")
    hooks = root / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {"root": root, "model": root / "model", "hooks": hooks,
            "train": write_lines(root / "train.txt", SENTENCES * 3),  # 33 examples: epochs roll over
            "eval": write_lines(root / "eval.txt", SENTENCES[:4])}


class Run:
    """One ``python -m lmtune train`` process, optionally paused at a hook point."""

    def __init__(self, setup: dict, out: Path, pause: str | None = None, resume: bool = False):
        self.ctl = out.parent / f"ctl-{out.name}-{time.monotonic_ns()}"
        self.ctl.mkdir()
        args = [f"model={setup['model']}", f"data.train={setup['train']}", f"data.eval={setup['eval']}",
                f"output_dir={out}", f"train.steps={STEPS}", "train.batch_size=4", "train.lr=1e-2",
                f"train.save_every={SAVE_EVERY}", "train.keep_checkpoints=2", "train.eval_every=4",
                "train.patience=50", "train.log_every=1", f"train.resume={str(resume).lower()}"]
        env = {**os.environ, "PYTHONPATH": f"{setup['hooks']}{os.pathsep}{SRC}", "OMP_NUM_THREADS": "1",
               "LMTUNE_TEST_DIR": str(self.ctl), "LMTUNE_TEST_PAUSE": pause or ""}
        self.stdout, self.stderr = self.ctl / "stdout", self.ctl / "stderr"
        with self.stdout.open("w") as so, self.stderr.open("w") as se:
            self.proc = subprocess.Popen([sys.executable, "-m", "lmtune", "train", *args], env=env,
                                         stdout=so, stderr=se, cwd=out.parent)

    def output(self) -> str:
        return self.stdout.read_text() + self.stderr.read_text()

    def wait_paused(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not (self.ctl / "paused").exists():
            if self.proc.poll() is not None:
                pytest.fail(f"the run ended (rc {self.proc.returncode}) before its pause point:\n{self.output()}")
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"the run did not reach its pause point in {timeout}s:\n{self.output()}")
            time.sleep(0.05)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=60) == -signal.SIGKILL

    def signal_and_go(self, sig: int) -> int:
        self.proc.send_signal(sig)
        time.sleep(0.2)  # let the handler run before the loop goes on
        (self.ctl / "go").touch()
        return self.proc.wait(timeout=300)

    def finish(self) -> str:
        rc = self.proc.wait(timeout=300)
        assert rc == 0, self.output()
        return self.output()


WALL_CLOCK = ("time", "elapsed_s")  # when a step ran differs between runs; everything else must not


def _records(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in rows]
    assert elapsed == sorted(elapsed), "elapsed_s goes on from the checkpoint after a resume, never back"
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in rows]


def _assert_same_as_uninterrupted(out: Path, ref: Path) -> None:
    got, want = load_file(out / "model.safetensors"), load_file(ref / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), f"{name} differs from the uninterrupted run"
    assert _records(out) == _records(ref)  # every step's loss, lr, tokens, grad_norm, eval_loss
    s_out, s_ref = (json.loads((d / "summary.json").read_text()) for d in (out, ref))
    for key in ("steps", "tokens_trained", "final_loss", "eval_loss"):
        assert s_out[key] == s_ref[key], key
    assert not list((out / "checkpoints").glob(".tmp-*")), "no temporary folder outlives a finished run"


def _good_step(out: Path) -> int | None:
    found = latest_good(out / "checkpoints", warn=lambda _: None)
    return step_of(found) if found else None


@pytest.fixture(scope="module")
def uninterrupted(setup):
    out = setup["root"] / "uninterrupted"
    Run(setup, out).finish()
    assert [r["step"] for r in _records(out)] == list(range(1, STEPS + 1))
    return out


# (hook point, its step, the newest good checkpoint's step right after the kill)
SCHEDULES = {
    "between_steps": [("after_step", 2, None), ("after_step", 6, 4), ("metrics_partial", 11, 8)],
    "inside_checkpoint_write": [("ckpt_tensors_partial", 8, 4), ("ckpt_before_manifest", 12, 8),
                                ("ckpt_before_rename", 16, 12)],
    "publish_prune_final_save": [("ckpt_before_prune", 12, 12), ("ckpt_mid_prune", 16, 16),
                                 ("final_save", 0, 20)],
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_sigkill_then_resume_equals_uninterrupted(setup, uninterrupted, schedule):
    out = setup["root"] / schedule
    for i, (point, step, good_after) in enumerate(SCHEDULES[schedule]):
        run = Run(setup, out, pause=f"{point}:{step}", resume=i > 0)
        run.wait_paused()
        run.kill()
        assert _good_step(out) == good_after, f"after SIGKILL at {point}:{step}"
        _check_disk_after(point, step, out)
    resumed = Run(setup, out, resume=True).finish()
    last_good = SCHEDULES[schedule][-1][2]
    assert f"at step {last_good}" in resumed
    _assert_same_as_uninterrupted(out, uninterrupted)


def _check_disk_after(point: str, step: int, out: Path) -> None:
    """The kill really came where it was meant to: the half-finished state is on disk."""
    ckpts = out / "checkpoints"
    tmp = ckpts / f".tmp-step-{step:06d}"
    if point == "ckpt_tensors_partial":
        assert tmp.is_dir() and not (tmp / "manifest.json").exists()
    elif point == "ckpt_before_manifest":
        assert (tmp / "state.json").is_file() and not (tmp / "manifest.json").exists()
    elif point == "ckpt_before_rename":
        assert (tmp / "manifest.json").is_file() and not (ckpts / f"step-{step:06d}").exists()
    elif point == "ckpt_before_prune":
        assert len(list_checkpoints(ckpts)) == 3  # keep_checkpoints=2, the oldest not yet removed
    elif point == "ckpt_mid_prune":
        assert not (list_checkpoints(ckpts)[0] / "state.safetensors").exists()
    elif point == "final_save":
        assert (out / "model.safetensors").is_file() and not (out / "summary.json").exists()
    elif point == "metrics_partial":
        assert not (out / "metrics.jsonl").read_text().endswith("\n")


def test_sigterm_and_sigint_save_checkpoint_then_resume_equals_uninterrupted(setup, uninterrupted):
    out = setup["root"] / "signals"
    for sig, step in ((signal.SIGTERM, 6), (signal.SIGINT, 13)):
        run = Run(setup, out, pause=f"after_step:{step}", resume=sig == signal.SIGINT)
        run.wait_paused()
        rc = run.signal_and_go(sig)
        assert rc == 128 + sig, run.output()
        assert _good_step(out) == step, "the checkpoint is written at the end of the step the signal came in"
        assert f"received signal {int(sig)}: checkpoint saved at step {step}" in run.output()
        assert "Traceback" not in run.output()
    resumed = Run(setup, out, resume=True).finish()
    assert "at step 13" in resumed
    _assert_same_as_uninterrupted(out, uninterrupted)


# ---- a write that fails (disk full), in-process --------------------------------------------------

def _cli_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", f"model={model}", f"data.train={data}", f"output_dir={out}", "train.steps=8",
            "train.batch_size=4", "train.save_every=2", "train.keep_checkpoints=2", *extra]


def _disk_full_on(monkeypatch, module, name: str, when) -> None:
    """Patch ``module.name`` to write half its file, then fail with ENOSPC, when ``when(args)``."""
    import errno

    real = getattr(module, name)

    def writer(*args, **kwargs):
        if not when(args):
            return real(*args, **kwargs)
        real(*args, **kwargs)
        target = Path(args[1]) if name == "save_file" else Path(args[2]) / "model.safetensors"
        os.truncate(target, target.stat().st_size // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    monkeypatch.setattr(module, name, writer)


def test_disk_full_during_checkpoint_keeps_previous_and_says_so(gpt2_dir, corpus, tmp_path, monkeypatch, capsys):
    import lmtune.checkpoint as ck
    from lmtune.cli import main

    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(_cli_args(gpt2_dir, corpus, ref)) == 0
    _disk_full_on(monkeypatch, ck, "save_file", lambda a: Path(a[1]).parent.name == ".tmp-step-000006")
    capsys.readouterr()
    assert main(_cli_args(gpt2_dir, corpus, out)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("lmtune: error:") == 1
    assert "could not write checkpoint" in err and "step-000006" in err and "No space left on device" in err
    assert "the previous checkpoint" in err and "step-000004 is intact" in err
    ckpts = out / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpts)] == ["step-000002", "step-000004"]
    assert _good_step(out) == 4 and not list(ckpts.glob(".tmp-*"))
    assert [r["step"] for r in _records(out)] == list(range(1, 7))  # the log up to the failure, whole
    assert not (out / "summary.json").exists() and not (out / "model.safetensors").exists()
    monkeypatch.undo()
    assert main([*_cli_args(gpt2_dir, corpus, out), "train.resume=true"]) == 0  # space freed: continue
    for name, w in load_file(ref / "model.safetensors").items():
        assert torch.equal(load_file(out / "model.safetensors")[name], w), name
    assert _records(out) == _records(ref)


def test_disk_full_during_final_save_keeps_checkpoints_and_says_so(gpt2_dir, corpus, tmp_path, monkeypatch,
                                                                   capsys):
    import lmtune.methods.full as full
    from lmtune.cli import main

    out = tmp_path / "out"
    _disk_full_on(monkeypatch, full, "save_model", lambda a: True)
    assert main(_cli_args(gpt2_dir, corpus, out)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "No space left on device" in err and "train.resume=true" in err
    assert _good_step(out) == 8 and not (out / "summary.json").exists()
