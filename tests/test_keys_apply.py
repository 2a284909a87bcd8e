"""No silent no-ops: a key that would do nothing in this run is an error that says so, before any model loads.

Also the library-core bugs found in review: a list of files for a one-file objective, the eval
loss reported after early stopping, and steps under torchrun.
"""

from __future__ import annotations

import json

import pytest

from lmtune.cli import main
from lmtune.config import load_config
from lmtune.errors import InputError
from lmtune.objectives.task import ExampleBatches
from lmtune.run import run_training
from lmtune.runlog import RunLog


def _fails(capsys, args, *needles):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("lmtune: error:") == 1, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("extra, needles", [
    (["lora.r=16"], ["lora.r=16 has no effect with method=full", "method=lora or method=qlora"]),
    (["method=lora", "quant.block_size=128"], ["quant.block_size", "method=qlora"]),
    (["freeze.layers=1"], ["freeze.layers", "method=freeze"]),
    (["train.packing=true"], ["train.packing", "objective=sft"]),
    (["train.loss_on=all"], ["train.loss_on", "objective=sft"]),
    (["dpo.beta=0.5"], ["dpo.beta", "objective=dpo"]),
    (["ppo.kl_coef=0.5"], ["ppo.kl_coef", "objective=ppo"]),
    (["reward.center_coef=0.1"], ["reward.center_coef", "objective=reward"]),
    (["classify.pool=mean"], ["classify.pool", "objective=classify"]),
    (["method=prompt_tuning", "train.compile=true"], ["train.compile does not work with method=prompt_tuning"]),
    (["train.patience=2"], ["train.patience", "data.eval"]),
    (["train.eval_every=2"], ["train.eval_every", "data.eval"]),
    (["train.epochs=3", "train.steps=5"], ["train.steps=5 and train.epochs=3.0"]),
])
def test_a_key_without_effect_is_refused_before_the_model_loads(capsys, gpt2_dir, corpus, tmp_path, extra, needles):
    out = tmp_path / "o"
    _fails(capsys, ["train", f"model={gpt2_dir}", f"data.train={corpus}", f"output_dir={out}", *extra], *needles)
    assert not out.exists() or not any(out.iterdir()), "a refused run writes nothing"


def test_ppo_refuses_compile(capsys, gpt2_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "the cat"}) + "\n", encoding="utf-8")
    _fails(capsys, ["train", f"model={gpt2_dir}", f"data.train={prompts}", f"output_dir={tmp_path / 'o'}",
                    "ppo.reward_fn=math:fabs", "train.compile=true"], "train.compile does not work with objective=ppo")


def test_pretrain_refuses_keys_it_does_not_read(capsys, corpus, tmp_path):
    for key in ("method=lora", "objective=sft", f"data.eval={corpus}", "regularize.l2_init=0.1"):
        _fails(capsys, ["pretrain", "--corpus", str(corpus), "--out", str(tmp_path / "m"), key],
               "lmtune pretrain does not use", key.split("=")[0])


def test_a_list_of_files_for_a_one_file_objective_is_a_clear_error(capsys, gpt2_dir, corpus, tmp_path):
    # Was: a TypeError traceback from reading a list as a path.
    _fails(capsys, ["train", f"model={gpt2_dir}", f"data.train=[{corpus}, {corpus}]", "objective=lm",
                    f"output_dir={tmp_path / 'o'}"], "data.train lists 2 files", "objective=classify")


def test_summary_reports_the_eval_loss_of_the_restored_best_weights(gpt2_dir, corpus, eval_corpus, tmp_path):
    # Was: the last eval loss, though the saved weights were the best ones.
    out = tmp_path / "es"
    cfg = load_config(overrides={"model": str(gpt2_dir), "data.train": str(corpus), "data.eval": str(eval_corpus),
                                 "output_dir": str(out), "train.steps": 40, "train.eval_every": 2,
                                 "train.patience": 2, "train.lr": 0.5, "train.clip_grad_norm": None,
                                 "train.batch_size": 4})
    summary = run_training(cfg, log=RunLog(out, quiet=True, tensorboard=False)).summary
    evals = [json.loads(x)["eval_loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if "eval_loss" in json.loads(x)]
    assert summary["steps"] < 40 and evals[-1] > min(evals), "the run must stop after worse evals"
    assert summary["eval_loss"] == min(evals)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_epochs_count_global_batches_under_torchrun(world):
    # Was: steps from the per-rank batch while each step consumes the global batch: epochs × world.
    cfg = load_config(train={"epochs": 2.0, "batch_size": 4})
    batches = ExampleBatches(list(range(40)), list, batch_size=4, seed=0)
    assert batches.total_steps(cfg.train, world) == 2 * -(-40 // (4 * world))


def test_in_memory_rows_name_their_source_in_errors(gpt2_dir, tmp_path):
    from lmtune.data.readers import Record

    cfg = load_config(model=str(gpt2_dir), output_dir=str(tmp_path / "o"), objective="lm")
    rows = [Record({"text": "the cat"}, "data[0]"), Record({"text": 7}, "data[1]")]
    with pytest.raises(InputError, match=r"data\[1\]: field 'text' must be a string"):
        run_training(cfg, train_records=rows, log=RunLog(tmp_path / "o", quiet=True, tensorboard=False))
