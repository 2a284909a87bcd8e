"""Reward models with LoRA and QLoRA: the body gets the adapter, the fresh head trains in full.

Oracle: PEFT. ``PeftModel.from_pretrained(AutoModelForSequenceClassification(base), adapter)``
(the head read from ``modules_to_save``) scores pairs exactly as lmtune's loaded reward model and
as the model at the end of training.
"""

from __future__ import annotations

import json

import pytest
import torch

from lmtune.config import load_config
from lmtune.data.preference import build_pairs, collate_pairs
from lmtune.data.readers import Record
from lmtune.errors import InputError
from lmtune.objectives.reward import load_reward_model, reward_scores
from lmtune.run import prepare
from lmtune.runlog import RunLog
from lmtune.train import train
from test_reward import PAIRS, write_jsonl

TOL = 1e-5


def train_reward(base, tmp, method: str):
    """A short reward run with ``method``: (adapter folder, trained model, summary)."""
    data = write_jsonl(tmp / "pairs.jsonl", PAIRS)
    out = tmp / "rm"
    cfg = load_config(overrides={"model": str(base), "objective": "reward", "method": method, "data.train": str(data),
                                 "data.eval": str(data), "output_dir": str(out), "train.steps": 15,
                                 "train.batch_size": 6, "train.lr": 2e-2})
    log = RunLog(out, quiet=True, tensorboard=False)
    task, ctx = prepare(cfg, log)
    head_before = task.model.score.weight.detach().clone()
    summary = train(task, ctx.cfg.train, out, device=torch.device("cpu"), log=log)
    assert not torch.equal(task.model.score.weight, head_before)  # the head trained
    return out, task.model.eval(), summary


@pytest.fixture(scope="module", params=["lora", "qlora"])
def reward_run(request, llama_dir, tmp_path_factory):
    return (request.param, llama_dir, *train_reward(llama_dir, tmp_path_factory.mktemp(request.param), request.param))


def pair_batch(tok):
    pairs, _ = build_pairs([Record(p, "x") for p in PAIRS], tok, 64, add_eos=False)
    return collate_pairs(pairs, tok.pad_token_id)  # right-padded, rows of different lengths


def peft_scores(base, adapter, batch, pad_id) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, pad_token_id=pad_id)
    model = PeftModel.from_pretrained(hf, adapter).eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)


def test_adapter_folder_is_a_seq_cls_adapter_with_the_head(reward_run):
    _, _, out, model, summary = reward_run
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    assert config["target_modules"] and all(n.endswith(("q_proj", "v_proj")) for n in config["target_modules"])
    assert summary["trainable_params"] == summary["adapter_params"] + model.score.weight.numel()


def test_peft_loads_the_reward_adapter_with_lmtunes_scores(reward_run):
    method, base, out, trained, _ = reward_run
    ours, tok = load_reward_model(out)
    batch = pair_batch(tok)
    with torch.no_grad():
        got = reward_scores(ours, batch)
        during = reward_scores(trained, batch)
    torch.testing.assert_close(got, peft_scores(base, out, batch, tok.pad_token_id), atol=TOL, rtol=0)
    if method == "lora":
        torch.testing.assert_close(got, during, atol=TOL, rtol=0)
    else:  # QLoRA trained on NF4 weights; its adapter runs on the full-precision base: the ranking holds
        assert torch.equal(torch.sign(torch.sub(*got.chunk(2))), torch.sign(torch.sub(*during.chunk(2))))


def test_reward_adapter_learns_the_pairs(reward_run):
    _, _, _, _, summary = reward_run
    assert summary["pairwise_accuracy_after"] > summary["pairwise_accuracy_before"]


def test_a_language_model_adapter_is_not_a_reward_model(tmp_path):
    from adapter_helpers import saved_adapter

    folder, _ = saved_adapter(tmp_path, "llama")
    with pytest.raises(InputError, match="adapter of a language model"):
        load_reward_model(folder)
