"""torchrun on 2 gloo CPU processes equals one process on the same global batch (fp32, default eps).

Each equality test trains once in this process (the reference) and once under
``torch.distributed.run`` with half the per-rank batch, then compares every saved tensor and
every logged loss within 1e-5. The corpus (33 examples, global batch 8) ends on a batch of one
example, so rank 1 has no share of the last step and must still join the gradient reduction.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from classify_helpers import topic_records, write_jsonl
from ddp_helpers import free_port, metrics, tensors
from lmtune.config import load_config
from lmtune.distributed import RANK_SEED_STRIDE, Dist, rank_seed

SRC = str(Path(__file__).resolve().parents[1] / "src")
PAIRS = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in [
    ("the cat", "can run .", "is in the cup ."), ("the dog", "can jump .", "sat on the tree ."),
    ("where is", "the red ball ?", "my mom ?"), ("i see", "a big dog .", "the fish ."),
    ("the girl", "has a hat .", "can see the bird ."), ("the boy", "can see the bird .", "is big ."),
    ("my mom", "likes the cat .", "is in the cup ."),
]]  # 7 pairs, global batch 4: the second batch gives rank 1 one pair fewer


def torchrun(args: list[str], cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "--master_addr=127.0.0.1", "-m", "lmtune", "train", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=cwd)


def one_process(args: list[str]) -> None:
    from lmtune.run import run_training

    run_training(load_config(None, args))


def assert_equal_runs(common: list[str], batch: int, tmp_path: Path) -> tuple[list[dict], list[dict]]:
    """Train with ``train.batch_size=batch`` here and ``batch/2`` on 2 ranks; compare weights and losses."""
    one, two = tmp_path / "one", tmp_path / "two"
    one_process([*common, f"train.batch_size={batch}", f"output_dir={one}"])
    proc = torchrun([*common, f"train.batch_size={batch // 2}", f"output_dir={two}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = tensors(one), tensors(two)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    ma, mb = metrics(one), metrics(two)
    assert [m["step"] for m in ma] == [m["step"] for m in mb]  # rank 1 appended nothing of its own
    torch.testing.assert_close(torch.tensor([m["loss"] for m in mb]), torch.tensor([m["loss"] for m in ma]),
                               rtol=1e-5, atol=1e-6)
    assert [m["tokens"] for m in ma] == [m["tokens"] for m in mb]  # tokens summed over ranks
    assert [m["input_tokens"] for m in ma] == [m["input_tokens"] for m in mb]  # and every token read
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert sa["steps"] == sb["steps"] and sa["tokens_trained"] == sb["tokens_trained"]
    assert sa["input_tokens_processed"] == sb["input_tokens_processed"] >= sa["tokens_trained"]
    return ma, mb


def test_full_fine_tuning_with_a_short_last_batch(gpt2_dir, corpus, tmp_path):
    # 33 examples / global batch 8 = 5 steps; the 5th has 1 example, none for rank 1.
    ma, _ = assert_equal_runs([f"model={gpt2_dir}", f"data.train={corpus}", "train.log_every=1"], 8, tmp_path)
    assert len(ma) == 5  # steps come from the global batch, not multiplied by the world size


def test_lora_equals_one_process_and_replay_is_sharded(gpt2_dir, corpus, tmp_path):
    # lora.dropout=0: bit-for-bit the one-process arithmetic (with dropout each rank draws its own
    # stream, rank_seed, so only the distribution of the masks matches one process, not the masks).
    replay = tmp_path / "replay.txt"
    replay.write_text("the red ball .\nmy mom has a hat .\nthe fish can jump .\n")
    ma, mb = assert_equal_runs([f"model={gpt2_dir}", f"data.train={corpus}", "method=lora", "lora.r=4",
                                "train.steps=3", f"regularize.replay_data={replay}",
                                "regularize.replay_ratio=0.25"], 8, tmp_path)
    # Replay adds 8·0.25/0.75 = 2.67 examples per global batch; repeated on each rank the token
    # counts would exceed one process's.
    assert ma[-1]["tokens"] == mb[-1]["tokens"]


def test_dpo_equals_one_process(gpt2_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    ma, mb = assert_equal_runs([f"model={gpt2_dir}", f"data.train={data}", "train.steps=3"],
                               4, tmp_path)
    # Per-pair metrics are pair-weighted means over both ranks: the same as over the whole batch.
    for key in ("rewards/margins", "rewards/accuracies", "logps/chosen"):
        torch.testing.assert_close(torch.tensor([m[key] for m in mb]), torch.tensor([m[key] for m in ma]),
                                   rtol=1e-5, atol=1e-5)


def test_classification_equals_one_process(gpt2_dir, tmp_path):
    data = write_jsonl(tmp_path / "topic.jsonl", topic_records(14))
    assert_equal_runs([f"model={gpt2_dir}", f"data.train={data}", "objective=classify", "train.steps=3"],
                      8, tmp_path)


def test_more_ranks_than_examples_is_refused_with_exit_2_and_nothing_written(gpt2_dir, tmp_path):
    data = tmp_path / "one.txt"
    data.write_text("the cat can run .\n")
    proc = torchrun([f"model={gpt2_dir}", f"data.train={data}", f"output_dir={tmp_path / 'out'}"], tmp_path)
    assert proc.returncode != 0
    assert "has 1 examples for 2 ranks" in proc.stderr + proc.stdout
    assert "exitcode  : 2" in proc.stderr  # each rank exited 2 (torchrun itself reports failure as 1)
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert not (tmp_path / "out" / "metrics.jsonl").exists() or not (tmp_path / "out" / "metrics.jsonl").read_text()


def test_each_rank_draws_its_own_dropout_stream():
    # rank 0 keeps the one-process stream; other ranks are offset so their masks differ.
    ranks = [Dist(rank=r, world=2, device=torch.device("cpu")) for r in (0, 1)]
    assert rank_seed(5, None) == rank_seed(5, ranks[0]) == 5
    assert rank_seed(5, ranks[1]) == 5 + RANK_SEED_STRIDE
    masks = []
    for d in ranks:
        torch.manual_seed(rank_seed(5, d))
        masks.append(torch.nn.functional.dropout(torch.ones(64), 0.5))
    assert not torch.equal(masks[0], masks[1])
