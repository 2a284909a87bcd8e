"""FSDP2 (train.distributed.strategy=fsdp) on 2 gloo CPU processes equals one process (fp32, default eps).

Every model here has a vocabulary of 31 rows, so the embedding (and GPT-2's tied head) shards
unevenly (16 + 15 rows): gathering it for checkpoints and the result is part of each check.
One job (``fsdp_jobs.py``) trains most runs in one ``torchrun`` launch; the full fine-tuning
check goes through the CLI (``-m lmtune train``), twice, to prove checkpoints, resume and a
clean exit of both ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from classify_helpers import topic_records, write_jsonl
from conftest import SENTENCES, fails, write_lines
from ddp_helpers import free_port, metrics, tensors
from test_distributed import PAIRS, SRC, assert_equal_runs, one_process, torchrun

FSDP = "train.distributed.strategy=fsdp"
SFT = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in PAIRS]  # 7 rows: batch 4 leaves a short one
JOBS = Path(__file__).resolve().parent / "fsdp_jobs.py"


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def _losses(out: Path) -> torch.Tensor:
    return torch.tensor([m["loss"] for m in metrics(out)])


def test_full_fine_tuning_checkpoints_resume_and_exit(gpt2_dir, corpus, tmp_path):
    # 33 examples / global batch 8 = 5 steps, the last of 1 example (none for rank 1).
    common = [f"model={gpt2_dir}", f"data.train={corpus}", "train.log_every=1", "train.save_every=2", FSDP]
    assert_equal_runs(common, 8, tmp_path)  # weights and per-step losses; rank 0 alone wrote the log
    one, two = tmp_path / "one", tmp_path / "two"
    # The checkpoint holds full-size weights and Adam moments: the same tensors one process saves.
    for step in ("step-000002", "step-000004"):
        a, b = (load_file(d / "checkpoints" / step / "state.safetensors") for d in (one, two))
        pick = lambda t: {k: v for k, v in t.items() if k.startswith(("model.", "optim."))}  # noqa: E731
        _close(pick(a), pick(b))
        assert len(pick(b)) > 2 * len([k for k in b if k.startswith("model.")])  # the moments are there
    # Killed after the step-4 checkpoint was written, before the end: resume under torchrun.
    three = tmp_path / "three"
    shutil.copytree(two, three)
    for name in ("model.safetensors", "summary.json"):
        (three / name).unlink()
    shutil.rmtree(three / "checkpoints" / "step-000004")  # so it resumes from step 2, with 3 steps to go
    proc = torchrun([*common, "train.batch_size=4", f"output_dir={three}", "train.resume=true"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]  # both ranks exited 0, the second launch too
    assert "resumed from" in proc.stdout + proc.stderr
    _close(tensors(one), tensors(three))
    torch.testing.assert_close(_losses(three), _losses(one), rtol=1e-5, atol=1e-6)
    assert "abort" not in proc.stderr.lower()


def _runs(tmp: Path, gpt2: Path, llama: Path, corpus: Path) -> dict[str, tuple[list[str], int]]:
    """name -> (arguments without batch size and output_dir, global batch)."""
    sft = write_jsonl(tmp / "sft.jsonl", SFT)
    pairs = write_jsonl(tmp / "pairs.jsonl", PAIRS)
    kto = write_jsonl(tmp / "kto.jsonl", [{"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"}
                                          for p in PAIRS for k in ("chosen", "rejected")])
    topics = write_jsonl(tmp / "topic.jsonl", topic_records(14))
    lora = ["method=lora", "lora.r=4", "lora.dropout=0.1", "train.steps=3", f"data.train={corpus}", f"model={gpt2}"]
    return {
        "freeze_sft": ([f"model={llama}", f"data.train={sft}", "method=freeze", "freeze.layers=1", "train.steps=3",
                        FSDP], 4),
        "lora_sft": ([f"model={llama}", f"data.train={sft}", "method=lora", "lora.r=4", "train.steps=3", FSDP], 4),
        "qlora_lm": ([f"model={llama}", f"data.train={corpus}", "method=qlora", "lora.r=4", "train.steps=3",
                      FSDP], 8),
        "lora_dropout_fsdp": ([*lora, FSDP], 8),
        "lora_dropout_ddp": ([*lora, "train.distributed.strategy=ddp"], 8),
        "dpo_lora": ([f"model={llama}", f"data.train={pairs}", "method=lora", "lora.r=4", "train.steps=3", FSDP], 4),
        "kto_lora": ([f"model={llama}", f"data.train={kto}", "method=lora", "lora.r=4", "train.steps=3", FSDP], 4),
        "dpo_full": ([f"model={gpt2}", f"data.train={pairs}", "train.steps=2", FSDP], 4),
        "lora_bf16": ([f"model={llama}", f"data.train={corpus}", "method=lora", "lora.r=4", "train.steps=2",
                       "train.precision=bf16", FSDP], 8),
        "classify": ([f"model={gpt2}", f"data.train={topics}", "objective=classify", "train.steps=3", FSDP], 8),
        # center_coef > 0 for the reason tests/test_distributed2.py gives: without it GPT-2's final norm
        # bias gets an exactly-zero gradient, whose rounding noise Adam would scale up to ±lr.
        "reward_full": ([f"model={gpt2}", "objective=reward", f"data.train={pairs}", "reward.center_coef=0.01",
                         "train.steps=2", FSDP], 4),
        "reward_lora": ([f"model={llama}", "objective=reward", f"data.train={pairs}", f"data.eval={pairs}",
                         "method=lora", "lora.r=4", "train.steps=3", "train.eval_every=2", FSDP], 4),
    }


@pytest.fixture(scope="module")
def job(gpt2_dir, llama_dir, tmp_path_factory):
    """Every run of ``_runs`` on 2 ranks, in one torchrun launch: name -> (its output, its args)."""
    tmp = tmp_path_factory.mktemp("fsdp-job")
    corpus = tmp / "corpus.txt"
    write_lines(corpus, SENTENCES * 3)
    runs = _runs(tmp, gpt2_dir, llama_dir, corpus)
    plan = [[*args, f"train.batch_size={batch // 2}", f"output_dir={tmp / name}"]
            for name, (args, batch) in runs.items()]
    (tmp / "plan.json").write_text(json.dumps(plan))
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", "--master_addr=127.0.0.1", str(JOBS),
                           str(tmp / "plan.json")], env=env, capture_output=True, text=True, timeout=600, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-6000:]
    fsdp_runs = sum(FSDP in args for args, _ in runs.values())
    assert (proc.stdout + proc.stderr).count("FSDP2: sharded") == fsdp_runs  # rank 0 says so, once per run
    return tmp, runs


def _one_process_run(job, name: str) -> Path:
    """The folder of ``name`` run in one process with the global batch (run once per job)."""
    tmp, runs = job
    args, batch = runs[name]
    one = tmp / f"{name}-one"
    if not (one / "summary.json").exists():
        one_process([*args, f"train.batch_size={batch}", f"output_dir={one}"])
    return one


def _equal_to_one_process(job, name: str) -> None:
    tmp, _ = job
    one = _one_process_run(job, name)
    two = tmp / name
    _close(tensors(one), tensors(two))
    torch.testing.assert_close(_losses(two), _losses(one), rtol=1e-5, atol=1e-6)
    assert [m["tokens"] for m in metrics(one)] == [m["tokens"] for m in metrics(two)]


@pytest.mark.parametrize("name", ["freeze_sft", "lora_sft", "qlora_lm", "dpo_lora", "dpo_full", "kto_lora",
                                  "classify", "reward_full", "reward_lora"])
def test_fsdp_equals_one_process(job, name):
    _equal_to_one_process(job, name)


def test_fsdp_reward_eval_equals_one_process(job):
    # The held-out pass is sharded and reduced: eval_loss and pairwise accuracy (before, at step 2,
    # after) are one process's.
    tmp, _ = job
    one_dir, two_dir = _one_process_run(job, "reward_lora"), tmp / "reward_lora"
    one, two = (json.loads((d / "summary.json").read_text()) for d in (one_dir, two_dir))
    for key in ("eval_loss", "pairwise_accuracy_before", "pairwise_accuracy_after"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
    evals = [m[k] for m in metrics(two_dir) if "eval_loss" in m for k in ("eval_loss", "pairwise_accuracy")]
    want = [m[k] for m in metrics(one_dir) if "eval_loss" in m for k in ("eval_loss", "pairwise_accuracy")]
    assert len(evals) == 4 and evals == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_lora_with_dropout_equals_ddp(job):
    # With dropout each rank draws its masks from its own stream (rank_seed), so neither strategy
    # equals one process; FSDP2 and DDP draw the same masks and so train the same weights.
    tmp, _ = job
    fsdp, ddp = tmp / "lora_dropout_fsdp", tmp / "lora_dropout_ddp"
    _close(tensors(ddp), tensors(fsdp))
    torch.testing.assert_close(_losses(fsdp), _losses(ddp), rtol=1e-5, atol=1e-6)


def test_bf16_policy_trains_and_saves_fp32_master_weights(job):
    # bf16 compute (MixedPrecisionPolicy) does not round what is saved: the adapter is the fp32 masters.
    tmp, _ = job
    saved = tensors(tmp / "lora_bf16")
    assert {v.dtype for v in saved.values()} == {torch.float32}
    assert any(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)  # B starts at 0: it trained
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics(tmp / "lora_bf16"))


@pytest.mark.parametrize(("args", "needles"), [
    (["method=prompt_tuning"], ["method=prompt_tuning is not supported with train.distributed.strategy=fsdp"]),
    (["train.compile=true"], ["train.compile is not supported with train.distributed.strategy=fsdp"]),
    (["objective=grpo"], ["objective=grpo is not supported with train.distributed.strategy=fsdp (its rollouts"]),
    (["objective=ppo"], ["objective=ppo is not supported with train.distributed.strategy=fsdp (its rollouts"]),
    (["objective=classify", "data.eval={corpus}"], ["data.eval is not supported with train.distributed.strategy=fsdp "
                                                  "(eval accuracy runs the model outside the sharded loss)"]),
])
def test_what_fsdp_cannot_do_is_refused_before_the_model_loads(capsys, gpt2_dir, corpus, tmp_path, args, needles):
    out = tmp_path / "out"
    args = [a.format(corpus=corpus) for a in args]
    fails(capsys, ["train", f"model={gpt2_dir}", f"data.train={corpus}", f"output_dir={out}", FSDP, *args],
          *needles, "use train.distributed.strategy=ddp")
    assert not out.exists() or not any(out.iterdir())


def test_fsdp_finds_the_transformer_blocks(gpt2_dir, llama_dir):
    from lmtune.fsdp import transformer_blocks
    from lmtune.models.loading import load_causal_lm

    gpt2, llama = load_causal_lm(gpt2_dir), load_causal_lm(llama_dir)
    assert transformer_blocks(gpt2) == list(gpt2.transformer.h)
    assert transformer_blocks(llama) == list(llama.model.layers)
