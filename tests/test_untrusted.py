"""Untrusted files never execute: no unpickling, no remote code, no paths out of the folders named.

A malicious pickle's ``__reduce__`` would create a marker file when unpickled; every loading
path must refuse (or ignore) it and the marker must never appear.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

from conftest import write_lines
from lmtune.cli import main

SRC = Path(__file__).resolve().parents[1] / "src" / "lmtune"


class _Evil:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_pickle(path: Path, marker: Path) -> None:
    with path.open("wb") as f:
        pickle.dump(_Evil(marker), f)


@pytest.fixture()
def marker(tmp_path) -> Path:
    m = tmp_path / "PWNED"
    yield m
    assert not m.exists(), "the malicious pickle was executed"


@pytest.fixture()
def pickle_only(gpt2_dir, tmp_path, marker) -> Path:
    """A model folder whose only weights are a malicious ``pytorch_model.bin``."""
    folder = tmp_path / "pickle-only"
    shutil.copytree(gpt2_dir, folder)
    (folder / "model.safetensors").unlink()
    plant_pickle(folder / "pytorch_model.bin", marker)
    return folder


def test_planted_pickle_checks_itself():
    # The oracle works: unpickling this file really would create the marker.
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        m = Path(d) / "m"
        plant_pickle(Path(d) / "x.bin", m)
        with open(Path(d) / "x.bin", "rb") as f:
            pickle.load(f)  # noqa: S301 - on purpose, to prove the marker mechanism
        assert m.exists()


def test_train_refuses_pickle_only_model(pickle_only, tmp_path, capsys, corpus):
    rc = main(["train", f"model={pickle_only}", f"data.train={corpus}", f"output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "pytorch_model.bin" in err and "safetensors" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_generate_refuses_pickle_only_model(pickle_only, capsys):
    assert main(["generate", "--model", str(pickle_only), "--prompt", "the cat"]) == 2
    assert "pickle" in capsys.readouterr().err


def test_eval_refuses_pickle_only_model(pickle_only, capsys, corpus):
    assert main(["eval", "--model", str(pickle_only), "--data", str(corpus)]) == 2
    assert "pickle" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["model.pt", "model.ckpt", "weights.pth", "model.pkl"])
def test_other_pickle_suffixes_are_refused(gpt2_dir, tmp_path, marker, capsys, name):
    folder = tmp_path / "m"
    shutil.copytree(gpt2_dir, folder)
    (folder / "model.safetensors").unlink()
    plant_pickle(folder / name, marker)
    assert main(["generate", "--model", str(folder), "--prompt", "the cat"]) == 2
    assert name in capsys.readouterr().err


def test_pickle_beside_safetensors_is_never_read(gpt2_dir, tmp_path, marker, capsys):
    folder = tmp_path / "both"
    shutil.copytree(gpt2_dir, folder)
    plant_pickle(folder / "pytorch_model.bin", marker)
    plant_pickle(folder / "training_args.bin", marker)
    assert main(["generate", "--model", str(folder), "--prompt", "the cat", "--max-new-tokens", "2"]) == 0


def test_adapter_with_pickle_weights_is_refused(gpt2_dir, tmp_path, marker, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["c_attn"],
        "base_model_name_or_path": str(gpt2_dir)}))
    plant_pickle(adapter / "adapter_model.bin", marker)
    rc = main(["generate", "--model", str(gpt2_dir), "--adapter", str(adapter), "--prompt", "the cat"])
    assert rc == 2 and "Traceback" not in capsys.readouterr().err


def test_checkpoint_holding_a_pickle_is_refused_on_resume(gpt2_dir, corpus, tmp_path, marker, capsys):
    # An attacker who can write the output folder swaps state.safetensors for a pickle and fixes
    # the manifest's checksums: the resume still never unpickles it.
    from lmtune.checkpoint import FILES, _sha256

    out = tmp_path / "run"
    args = ["train", f"model={gpt2_dir}", f"data.train={corpus}", f"output_dir={out}", "train.steps=2",
            "train.save_every=2", "train.batch_size=4"]
    assert main(args) == 0
    ckpt = out / "checkpoints" / "step-000002"
    plant_pickle(ckpt / "state.safetensors", marker)
    plant_pickle(ckpt / "optimizer.pt", marker)
    (ckpt / "manifest.json").write_text(json.dumps({"step": 2, "sha256": {n: _sha256(ckpt / n) for n in FILES}}))
    capsys.readouterr()
    assert main([*args, "train.resume=true", "train.steps=4"]) == 2
    err = capsys.readouterr().err
    assert "not a checkpoint lmtune can continue from" in err and "Traceback" not in err


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_no_code_path_unpickles():
    """torch.load only with weights_only=True; no pickle-family module; no allow_pickle=True."""
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch") and any(
                    a.name == "load" for a in node.names):
                problems.append(f"{path}:{node.lineno} imports torch's load by name (unchecked calls)")
            for name in names:
                if name.split(".")[0] in {"pickle", "cPickle", "dill", "joblib", "marshal", "shelve", "cloudpickle"}:
                    problems.append(f"{path}:{node.lineno} imports {name}")
        for call in _calls(tree):
            func = ast.unparse(call.func)
            wo = _kw(call, "weights_only")
            if func.endswith(("torch.load", "serialization.load")) and not (
                    isinstance(wo, ast.Constant) and wo.value is True):
                problems.append(f"{path}:{call.lineno} {func} without weights_only=True")
            ap = _kw(call, "allow_pickle")
            if isinstance(ap, ast.Constant) and ap.value is True:
                problems.append(f"{path}:{call.lineno} allow_pickle=True")
    assert not problems, "\n".join(problems)


def test_trust_remote_code_is_never_hard_coded_on():
    from lmtune.config import KEYS

    assert KEYS["trust_remote_code"].default is False
    for path in sorted(SRC.rglob("*.py")):
        for call in _calls(ast.parse(path.read_text(encoding="utf-8"))):
            value = _kw(call, "trust_remote_code")
            assert not (isinstance(value, ast.Constant) and value.value is True), f"{path}:{call.lineno}"


def test_custom_code_in_a_model_folder_does_not_run(gpt2_dir, tmp_path, marker):
    # A config.json auto_map pointing at modeling_evil.py: without trust_remote_code the file is
    # never imported; the standard architecture named by model_type loads instead.
    folder = tmp_path / "remote"
    shutil.copytree(gpt2_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "modeling_evil.C", "AutoModelForCausalLM": "modeling_evil.M"}
    (folder / "config.json").write_text(json.dumps(cfg))
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    tok_cfg["auto_map"] = {"AutoTokenizer": ["modeling_evil.T", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    assert main(["generate", "--model", str(folder), "--prompt", "the cat", "--max-new-tokens", "2"]) == 0


def test_shard_index_cannot_point_outside_the_model_folder(gpt2_dir, tmp_path, capsys):
    # transformers joins index file names onto the folder as given: '../x.safetensors' would load
    # weights from anywhere. lmtune refuses such an index before loading.
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "sharded"
    shutil.copytree(gpt2_dir, folder)
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    save_file(weights, tmp_path / "outside.safetensors", metadata={"format": "pt"})
    save_file({}, folder / "model-00001-of-00001.safetensors", metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: "../outside.safetensors" for k in weights}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert main(["generate", "--model", str(folder), "--prompt", "the cat"]) == 2
    assert "not a file name inside" in capsys.readouterr().err


def test_checkpoint_symlink_and_manifest_paths_cannot_leave_the_checkpoint_folder(tmp_path):
    from lmtune.checkpoint import list_checkpoints, verify

    root = tmp_path / "checkpoints"
    (root / "step-000001").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / "step-000009").symlink_to(elsewhere, target_is_directory=True)
    assert list_checkpoints(root) == [root / "step-000001"]
    write_lines(tmp_path / "secret", ["x"])
    (root / "step-000001" / "manifest.json").write_text(json.dumps({"sha256": {"../../secret": "0"}}))
    assert verify(root / "step-000001") == "unreadable manifest"


def test_adapter_base_paths_with_dotdot_are_never_followed(gpt2_dir, tmp_path, capsys):
    # Decision: the base model is the one the user names (--model, or the shipped default), never
    # a path read from adapter_config.json or lmtune.json; those are records, checked by fingerprint.
    from adapter_helpers import saved_adapter

    adapter, _ = saved_adapter(tmp_path, "gpt2")
    for name, key in (("adapter_config.json", "base_model_name_or_path"), ("lmtune.json", "base_model")):
        data = json.loads((adapter / name).read_text())
        data[key] = "../../../../somewhere/else"
        (adapter / name).write_text(json.dumps(data))
    args = ["generate", "--adapter", str(adapter), "--prompt", "the cat", "--max-new-tokens", "2"]
    assert main(["generate", "--model", str(gpt2_dir), *args[1:]]) == 0
    capsys.readouterr()
    # Without --model the shipped model is the base (not the recorded path), and it does not fit.
    assert main(args) == 2
    assert "trained on another base model" in capsys.readouterr().err
