"""The one training loop: accumulation, resume, early stopping, freezing, outputs."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from lmtune.config import load_config
from lmtune.run import run_training
from lmtune.runlog import RunLog


def _cfg(model_dir, corpus, out, **extra):
    base = {"model": str(model_dir), "data.train": str(corpus), "output_dir": str(out), "train.steps": 4,
            "train.batch_size": 4, "train.lr": 1e-2, "train.log_every": 1}
    base.update(extra)
    return load_config(overrides=base)


def _run(cfg):
    return run_training(cfg, log=RunLog(cfg.output_dir, quiet=True, tensorboard=False)).summary


def _weights(out):
    return load_file(out / "model.safetensors")


def test_accumulation_1x8_equals_8x1(model_dir, corpus, tmp_path):
    # The loss is normalised by the loss tokens of the whole accumulation window, so one batch
    # of 8 and 8 batches of 1 (examples of different lengths) give the same gradient.
    from lmtune.run import prepare
    from lmtune.train import accumulate_gradients

    cfg = _cfg(model_dir, corpus, tmp_path / "a")
    task, _ = prepare(cfg)
    examples = task.batches.examples[:8]
    assert len({len(e["input_ids"]) for e in examples}) > 1, "lengths must differ for the test to mean anything"

    def grads(micro):
        task.model.zero_grad(set_to_none=True)
        loss, units, _, _ = accumulate_gradients(task, micro, "fp32", torch.device("cpu"))  # LM: tokens are units
        return loss, units, {n: p.grad.clone() for n, p in task.model.named_parameters() if p.grad is not None}

    loss_a, units_a, ga = grads([task.batches.collate(examples)])
    loss_b, units_b, gb = grads([task.batches.collate([e]) for e in examples])
    assert units_a == units_b
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-5, atol=1e-7)


def test_accumulated_run_matches_big_batch_run(model_dir, corpus, tmp_path):
    # End to end: same examples per step either way, same tokens and (nearly) the same losses.
    a = _run(_cfg(model_dir, corpus, tmp_path / "a", **{"train.batch_size": 8, "train.steps": 3}))
    b = _run(_cfg(model_dir, corpus, tmp_path / "b", **{"train.batch_size": 1, "train.grad_accum": 8,
                                                        "train.steps": 3}))
    assert a["tokens_trained"] == b["tokens_trained"]
    assert a["final_loss"] == pytest.approx(b["final_loss"], rel=1e-4)


def test_resumed_run_equals_uninterrupted(model_dir, corpus, tmp_path):
    _run(_cfg(model_dir, corpus, tmp_path / "full", **{"train.steps": 6}))
    # Interrupted: killed after step 4, the last checkpoint being step 3's ...
    part = _cfg(model_dir, corpus, tmp_path / "part", **{"train.steps": 6, "train.save_every": 3})
    _run_until(part, stop_after=4)
    # ... then resumed: steps 4-6 again from the checkpoint, same data order and RNG.
    _run(_cfg(model_dir, corpus, tmp_path / "part", **{"train.steps": 6, "train.save_every": 3,
                                                       "train.resume": True}))
    wa, wb = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-6)
    la = [json.loads(x)["loss"] for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, abs=1e-6)


def _run_until(cfg, stop_after):
    """Run the loop but die right after ``stop_after`` steps, as a kill would."""
    train_mod = importlib.import_module("lmtune.train")  # `import lmtune.train as` would name lmtune.train(), the API

    real = train_mod.RunLog.step

    def step_then_die(self, record, total):
        real(self, record, total)
        if record["step"] == stop_after:
            raise _Killed

    train_mod.RunLog.step = step_then_die
    try:
        with pytest.raises(_Killed):
            _run(cfg)
    finally:
        train_mod.RunLog.step = real


class _Killed(Exception):
    pass


def test_early_stopping_restores_best_weights(model_dir, corpus, eval_corpus, tmp_path):
    # A learning rate this high makes eval loss get worse after the first evaluations.
    cfg = _cfg(model_dir, corpus, tmp_path / "es", **{
        "data.eval": str(eval_corpus), "train.steps": 40, "train.eval_every": 2, "train.patience": 2,
        "train.lr": 0.5, "train.clip_grad_norm": None})
    summary = _run(cfg)
    rows = [json.loads(x) for x in (tmp_path / "es" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert summary["steps"] < 40, "patience should stop the run early"
    best = min(evals)
    # The saved model is the best one: its eval loss equals the best eval loss seen.
    from lmtune.data.batching import pad_batch
    from lmtune.data.readers import read_records
    from lmtune.models.loading import load_model_and_tokenizer
    from lmtune.objectives.lm import lm_loss
    from lmtune.objectives.lm_task import text_examples

    model, tok, _ = load_model_and_tokenizer(tmp_path / "es")
    ex, _ = text_examples(read_records(eval_corpus), tok, 256)
    batch = pad_batch(ex, tok.pad_token_id)
    with torch.no_grad():
        loss_sum, _ = lm_loss(model, batch)
    assert float(loss_sum) / batch["num_loss_tokens"] == pytest.approx(best, rel=1e-4)
    assert not (tmp_path / "es" / "best.safetensors").exists()


def test_freeze_trains_only_later_blocks(gpt2_dir, corpus, tmp_path):
    cfg = _cfg(gpt2_dir, corpus, tmp_path / "fz", **{"method": "freeze", "freeze.layers": 1})
    summary = _run(cfg)
    before = load_file(gpt2_dir / "model.safetensors")
    after = _weights(tmp_path / "fz")
    for name, w in after.items():
        changed = not torch.equal(w, before[name])
        frozen = name.startswith(("transformer.h.0.", "transformer.wte", "transformer.wpe", "lm_head"))
        assert changed != frozen, f"{name}: changed={changed}, should be frozen={frozen}"
    assert 0 < summary["trainable_params"] < summary["total_params"]


def test_summary_and_metrics_files(model_dir, corpus, eval_corpus, tmp_path):
    cfg = _cfg(model_dir, corpus, tmp_path / "s", **{"data.eval": str(eval_corpus)})
    _run(cfg)
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    for key in ("method", "objective", "total_params", "trainable_params", "steps", "tokens_trained",
                "final_loss", "eval_loss", "tokens_per_second", "peak_rss_mb", "wall_seconds"):
        assert key in summary
    rows = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all({"step", "loss", "lr", "tokens"} <= set(r) for r in rows)
    assert rows[-1]["tokens"] == summary["tokens_trained"]
    assert summary["objective"] == "lm" and summary["steps"] == 4


def test_tensorboard_events_written(gpt2_dir, corpus, tmp_path):
    cfg = _cfg(gpt2_dir, corpus, tmp_path / "tb", **{"train.steps": 2})
    run_training(cfg, log=RunLog(cfg.output_dir, quiet=True))
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_fully_finetuned_model_loads_in_transformers_with_same_logits(model_dir, corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    from lmtune.models.loading import load_model_and_tokenizer

    _run(_cfg(model_dir, corpus, tmp_path / "ft"))
    ours, tok, _ = load_model_and_tokenizer(tmp_path / "ft")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ft")
    ids = torch.tensor([tok("the cat can run .")["input_ids"]])
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=0, atol=1e-6)
    assert not torch.equal(ours.get_input_embeddings().weight,
                           AutoModelForCausalLM.from_pretrained(model_dir).get_input_embeddings().weight)


def test_schedules_warm_up_then_decay():
    from lmtune.train import lr_at

    cfg = load_config(overrides={"train.lr": 1.0, "train.warmup_steps": 4, "train.schedule": "cosine"})
    assert [lr_at(s, cfg.train, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg.train, 14) == pytest.approx(1.0)
    assert lr_at(9, cfg.train, 14) == pytest.approx(0.5)  # half-way through the cosine
    linear = cfg.replace({"train.schedule": "linear"}).train
    assert lr_at(9, linear, 14) == pytest.approx(0.5)
    assert math.isclose(lr_at(13, linear, 14), 0.1, rel_tol=1e-9)


def test_no_decay_on_biases_and_norms(gpt2_dir):
    from lmtune.models.loading import load_causal_lm
    from lmtune.train import make_optimizer

    model = load_causal_lm(gpt2_dir)
    opt = make_optimizer(model, load_config(overrides={"train.weight_decay": 0.1}).train)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])


def test_bf16_autocast_trains(gpt2_dir, corpus, tmp_path):
    summary = _run(_cfg(gpt2_dir, corpus, tmp_path / "bf", **{"train.precision": "bf16"}))
    assert math.isfinite(summary["final_loss"])
    assert _weights(tmp_path / "bf")["transformer.h.0.attn.c_attn.weight"].dtype == torch.float32


def test_text_longer_than_the_context_is_truncated_and_counted(gpt2_dir, tmp_path):
    from conftest import write_lines

    long_line = " ".join(["the cat can run ."] * 30)  # 150 words; the model's context is 64
    data = write_lines(tmp_path / "long.txt", [long_line, "the dog can jump ."])
    summary = _run(_cfg(gpt2_dir, data, tmp_path / "t", **{"train.max_length": 512, "train.steps": 1}))
    assert summary["data"]["truncated"] == 1 and summary["data"]["examples"] == 2
    assert summary["tokens_trained"] == (64 - 1) + (1 + 5 + 1 - 1)  # BOS predicts nothing
