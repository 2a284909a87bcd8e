"""Launching lmtune under torchrun for the tests, and the script each rank runs.

One ``torchrun`` start costs more than a tiny training run, so ``launch_plan`` runs several
trainings in one job: this file, run by every rank, joins the process group itself and calls
``lmtune train`` once per entry of the plan (lmtune uses the group and, not having created it,
leaves it up). ``launch_cli`` runs one ``lmtune train`` with a fault injected on rank 1: a
hang (``sleep``) or a ``SIGKILL`` at the start of a given step.

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_helpers.py plan PLAN.json
    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_helpers.py hang|kill STEP ARG...
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
SRC = str(HERE.parent / "src")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(script_args: list[str], cwd: Path, extra_path: str = "") -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (SRC, extra_path, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "--master_addr=127.0.0.1", str(Path(__file__).resolve()), *script_args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=cwd)


def launch_plan(runs: list[list[str]], cwd: Path, extra_path: str = "") -> subprocess.CompletedProcess:
    """Run every ``lmtune train`` argument list of ``runs`` in one 2-rank job, in order."""
    plan = cwd / "plan.json"
    plan.write_text(json.dumps(runs))
    return _torchrun(["plan", str(plan)], cwd, extra_path)


def launch_cli(fault: str, step: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """One 2-rank ``lmtune train`` whose rank 1 hangs or is SIGKILLed when step ``step`` (0-based) begins
    (``fault="none"``: no fault)."""
    return _torchrun([fault, str(step), *args], cwd)


def tensors(out: Path) -> dict[str, torch.Tensor]:
    found = {f"{f.name}:{k}": v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert found, f"{out} holds no weights"
    return found


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(one: Path, two: Path, keys: tuple[str, ...] = ()) -> tuple[list[dict], list[dict]]:
    """Two output folders hold the same files, weights (1e-5), logged steps, losses, tokens and ``keys``."""
    def names(d: Path) -> list[str]:  # a TensorBoard file is named after its host and pid
        return sorted({"events.out.tfevents" if p.name.startswith("events.out.tfevents") else p.name
                       for p in d.iterdir()})

    assert names(one) == names(two)  # only rank 0 wrote, the files one process writes
    a, b = tensors(one), tensors(two)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    ma, mb = metrics(one), metrics(two)
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    assert [sorted(m) for m in ma] == [sorted(m) for m in mb]  # the same record format
    assert [m["tokens"] for m in ma] == [m["tokens"] for m in mb]  # summed over ranks
    for key in ("loss", *keys):
        torch.testing.assert_close(torch.tensor([m[key] for m in mb], dtype=torch.float64),
                                   torch.tensor([m[key] for m in ma], dtype=torch.float64), rtol=1e-5, atol=1e-5,
                                   msg=lambda m, k=key: f"{k}: {m}")
    return ma, mb


def _inject(fault: str, step: int) -> None:
    """Make rank 1 hang or die when the loop begins optimizer step ``step``."""
    import importlib

    loop = importlib.import_module("lmtune.train")  # the module: the package's ``train`` is the API function
    real = loop._optimizer_step

    def step_with_fault(task, settings, optimizer, state, *args, **kwargs):  # noqa: ANN001, ANN202
        if int(os.environ["RANK"]) == 1 and state.step == step:
            if fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(600)  # hang: the other rank's next collective must time out
        return real(task, settings, optimizer, state, *args, **kwargs)

    loop._optimizer_step = step_with_fault


def main(argv: list[str]) -> int:
    import torch.distributed as dist

    from lmtune.cli import main as cli

    if argv[0] in ("hang", "kill", "none"):
        if argv[0] != "none":
            _inject(argv[0], int(argv[1]))
        return cli(["train", *argv[2:]])
    dist.init_process_group("gloo")
    for args in json.loads(Path(argv[1]).read_text()):
        rc = cli(["train", *args])
        if rc != 0:
            return rc
        assert dist.is_initialized(), "lmtune destroyed a process group it did not create"
    dist.barrier()  # the group still works after every run
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
