"""torchrun data parallelism: two CPU processes equal one process on the whole batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(args: list[str], nproc: int, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "lmtune", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={_free_port()}", "--master_addr=127.0.0.1", "-m", "lmtune", "train", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_ranks_equal_one_process_on_the_global_batch(gpt2_dir, corpus, tmp_path):
    # A large Adam eps keeps float-rounding noise in near-zero gradients from being amplified
    # into lr-sized updates (Adam divides by |g|), so weights can be compared tightly.
    common = [f"model={gpt2_dir}", f"data.train={corpus}", "train.steps=3", "train.lr=1e-2", "train.log_every=1",
              "train.eps=1e-3"]
    _train([*common, "train.batch_size=8", f"output_dir={tmp_path / 'one'}"], 1, tmp_path)
    _train([*common, "train.batch_size=4", f"output_dir={tmp_path / 'two'}"], 2, tmp_path)
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=1e-4, atol=1e-5)
    losses = [[json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("one", "two")]
    assert len(losses[1]) == 3  # rank 1 wrote nothing of its own
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-5, atol=1e-6)


def test_a_rank_with_no_share_of_a_short_last_batch_still_joins_the_all_reduce(gpt2_dir, corpus, tmp_path):
    # 33 examples, 2 ranks × 4: step 5 holds one example, so rank 1 gets none. It used to skip the
    # gradient all-reduce (gloo: collective mismatch; NCCL: a hang). Oracle: one process, batch 8.
    common = [f"model={gpt2_dir}", f"data.train={corpus}", "train.steps=5", "train.lr=1e-2", "train.eps=1e-3"]
    _train([*common, "train.batch_size=8", f"output_dir={tmp_path / 'one'}"], 1, tmp_path)
    _train([*common, "train.batch_size=4", f"output_dir={tmp_path / 'two'}"], 2, tmp_path)
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=1e-4, atol=1e-5)
