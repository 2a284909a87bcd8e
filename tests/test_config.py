"""The typed configuration: frozen sections, one declaration per key, every layer validated the same way."""

from __future__ import annotations

import dataclasses

import pytest

from lmtune.config import KEYS, LoraConfig, RunConfig, describe_keys, load_config
from lmtune.errors import InputError


def test_sections_are_frozen_dataclasses_with_attribute_access():
    cfg = load_config(overrides=["train.lr=2e-4", "lora.r=4", "train.distributed.strategy=fsdp"])
    assert (cfg.train.lr, cfg.lora.r, cfg.train.distributed.strategy) == (2e-4, 4, "fsdp")
    assert isinstance(cfg.lora, LoraConfig)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_yaml_key_value_and_keyword_sections_meet_in_one_config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: lora\ntrain:\n  lr: 1e-3\n  steps: 10\nlora: {r: 16}\n", encoding="utf-8")
    cfg = load_config(path, ["train.steps=20"], lora={"alpha": 8}, train={"batch_size": 2})
    assert (cfg.method, cfg.train.lr, cfg.train.steps, cfg.train.batch_size) == ("lora", 1e-3, 20, 2)
    assert (cfg.lora.r, cfg.lora.alpha) == (16, 8.0)


def test_a_config_object_is_a_base_for_more_overrides():
    base = load_config(method="lora", lora={"r": 4})
    cfg = load_config(base, train={"lr": 0.5})
    assert (cfg.method, cfg.lora.r, cfg.train.lr) == ("lora", 4, 0.5)
    assert base.train.lr == KEYS["train.lr"].default  # the base is untouched


@pytest.mark.parametrize("keys, needle", [
    ({"lora": {"rr": 4}}, "lora.rr"),
    ({"train": {"lr": "fast"}}, "'train.lr' must be an integer or a number"),
    ({"train": {"lr": float("nan")}}, "finite"),
    ({"method": "loraa"}, "must be one of"),
])
def test_keyword_sections_are_validated_like_the_command_line(keys, needle):
    with pytest.raises(InputError, match=needle):
        load_config(**keys)


def test_every_field_is_declared_once_with_a_doc():
    assert set(KEYS) == set(RunConfig().flat())
    assert all(spec.doc for spec in KEYS.values())
    listing = describe_keys()
    for name in KEYS:
        assert f"\n{name} " in "\n" + listing


def test_readme_key_list_comes_from_the_declarations():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- keys:begin -->")[1].split("<!-- keys:end -->")[0]
    assert block.strip().strip("`").strip() == describe_keys().strip(), (
        "README's key list is stale: regenerate it with `lmtune train --keys`")


def test_replace_returns_a_new_validated_config():
    cfg = load_config()
    other = cfg.replace({"objective": "sft", "train.max_length": 64})
    assert (other.objective, other.train.max_length) == ("sft", 64)
    assert cfg.objective is None
