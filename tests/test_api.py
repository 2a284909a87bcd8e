"""The Python API: in-memory data and models, the same results as the CLI, and no global state left behind."""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import lmtune
from conftest import SENTENCES, build_model, word_tokenizer
from lmtune.cli import main
from lmtune.data.readers import read_records, records_from_rows

ROWS = [{"prompt": s.split(" ", 2)[0] + " " + s.split(" ", 2)[1], "completion": s.split(" ", 2)[2]}
        for s in SENTENCES]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def in_memory_model(arch: str = "gpt2"):
    tok = word_tokenizer()
    return build_model(arch, tok), tok


# --- rows -> records ---------------------------------------------------------------------------------------------

def test_rows_become_records_named_by_their_index():
    records = records_from_rows(ROWS, source="data")
    assert [r.fields for r in records] == ROWS
    assert [r.where for r in records] == [f"data[{i}]" for i in range(len(ROWS))]


def test_a_datasets_dataset_gives_the_same_records_as_its_rows_and_its_jsonl_file(tmp_path):
    datasets = pytest.importorskip("datasets")  # a third-party optional dependency (dev extra)
    from_dataset = records_from_rows(datasets.Dataset.from_list(ROWS))
    from_file = read_records(write_jsonl(tmp_path / "d.jsonl", ROWS))
    assert [r.fields for r in from_dataset] == [r.fields for r in from_file] == ROWS


@pytest.mark.parametrize("rows, message", [
    ([{"text": "a b"}, "not a row"], r"data\[1\]: each row must be a mapping"),
    ([{"text": "a"}, {1: "x"}], r"data\[1\]: field names must be strings"),
    ([{"text": "a\ud800"}], r"data\[0\]: field 'text' holds characters that are not valid Unicode"),
    ([], "data: no examples"),
    ({"text": ["a", "b"]}, "data: expected a list of rows, got a mapping"),
    (42, "expected a list of dicts or a datasets.Dataset, got int"),
])
def test_bad_rows_raise_input_error_naming_the_row(rows, message):
    with pytest.raises(lmtune.InputError, match=message):
        records_from_rows(rows, source="data")


def test_a_datasetdict_is_told_to_pick_a_split():
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)})
    with pytest.raises(lmtune.InputError, match=r"pick a split, e\.g\. dataset\['train'\]"):
        records_from_rows(dd, source="data")


# --- the package: cheap, stateless, its names stay the API's --------------------------------------------------------

def test_importing_lmtune_changes_no_environment_or_logger_and_loads_no_torch():
    code = ("import logging, os, sys\n"
            "def levels(): return {n: l.level for n, l in logging.root.manager.loggerDict.items() "
            "if isinstance(l, logging.Logger)} | {'': logging.root.level}\n"
            "env, lv = dict(os.environ), levels()\n"
            "import lmtune\n"
            "lmtune.InputError, lmtune.__version__, dir(lmtune)\n"
            "assert dict(os.environ) == env, set(os.environ.items()) ^ set(env.items())\n"
            "assert levels() == lv, (levels(), lv)\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n")
    clean = {k: v for k, v in os.environ.items()
             if k not in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY",
                          "TOKENIZERS_PARALLELISM")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean)
    assert proc.returncode == 0, proc.stderr


def test_the_api_names_stay_functions_after_the_submodules_of_those_names_load():
    from lmtune import api

    modules = [importlib.import_module(f"lmtune.{name}") for name in ("train", "generate", "evaluate")]
    assert all(isinstance(m, types.ModuleType) for m in modules)
    assert lmtune.train is api.train and lmtune.generate is api.generate and lmtune.evaluate is api.evaluate
    from lmtune.train import train as loop_train  # the module is still reachable by its name

    assert loop_train is not api.train


def test_an_api_call_restores_environment_threads_loggers_and_random_state(gpt2_dir, monkeypatch):
    import huggingface_hub.constants as hub
    from transformers.utils import logging as hf_logging

    for name in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "TOKENIZERS_PARALLELISM"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    hf_logging.enable_progress_bar()
    hf_logging.set_verbosity_warning()
    logging.getLogger("torchao").setLevel(logging.NOTSET)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        before = (dict(os.environ), logging.getLogger("transformers").level, logging.getLogger("torchao").level)
        torch.manual_seed(123)
        expected_draw = torch.rand(3)
        torch.manual_seed(123)
        seen = {}

        def spy(*args, **kwargs):  # what the run saw while inside the call
            seen.update(offline=hub.HF_HUB_OFFLINE, bars=hf_logging.is_progress_bar_enabled(),
                        env=os.environ.get("HF_HUB_OFFLINE"), level=logging.getLogger("transformers").level)
            torch.set_num_threads(1)  # as the demo does
            torch.manual_seed(0)  # as training does
            return real(*args, **kwargs)

        gen = importlib.import_module("lmtune.generate")  # `import lmtune.generate as` names the API function
        real = gen.generate_text
        monkeypatch.setattr(gen, "generate_text", spy)
        lmtune.generate(str(gpt2_dir), prompt="the cat", max_new_tokens=2)
        assert seen == {"offline": True, "bars": False, "env": "1", "level": logging.ERROR}
        after = (dict(os.environ), logging.getLogger("transformers").level, logging.getLogger("torchao").level)
        assert after == before
        assert torch.get_num_threads() == 3
        assert hub.HF_HUB_OFFLINE is False and hf_logging.is_progress_bar_enabled()
        assert torch.equal(torch.rand(3), expected_draw)  # the caller's random stream continues untouched
    finally:
        torch.set_num_threads(threads)


def test_a_users_own_settings_win_inside_the_call(gpt2_dir, monkeypatch):
    gen = importlib.import_module("lmtune.generate")
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    logging.getLogger("transformers").setLevel(logging.INFO)
    seen = {}
    real = gen.generate_text

    def spy(*args, **kwargs):
        seen.update(level=logging.getLogger("transformers").level, par=os.environ["TOKENIZERS_PARALLELISM"])
        return real(*args, **kwargs)

    monkeypatch.setattr(gen, "generate_text", spy)
    try:
        lmtune.generate(str(gpt2_dir), prompt="the cat", max_new_tokens=1)
    finally:
        logging.getLogger("transformers").setLevel(logging.ERROR)
    assert seen == {"level": logging.INFO, "par": "true"}


# --- generate, load, evaluate, inspect: the CLI's results from Python ----------------------------------------------

def test_generate_from_a_folder_and_from_memory_match_the_cli(gpt2_dir, capsys):
    assert main(["generate", "--model", str(gpt2_dir), "--prompt", "the cat", "--max-new-tokens", "6",
                 "--temperature", "0.9", "--top-k", "5", "--seed", "7"]) == 0
    cli = capsys.readouterr().out.rstrip("\n")
    from_folder = lmtune.generate(gpt2_dir, prompt="the cat", max_new_tokens=6, temperature=0.9, top_k=5, seed=7)
    model, tok = lmtune.load(gpt2_dir)
    from_memory = lmtune.generate(model, tok, "the cat", max_new_tokens=6, temperature=0.9, top_k=5, seed=7)
    assert cli == from_folder == from_memory
    assert from_memory


def test_generate_refuses_what_it_cannot_use(gpt2_dir):
    model, tok = in_memory_model()
    with pytest.raises(lmtune.InputError, match="needs its tokenizer"):
        lmtune.generate(model, prompt="the cat")
    with pytest.raises(lmtune.InputError, match="goes with an in-memory model"):
        lmtune.generate(gpt2_dir, tok, "the cat")
    with pytest.raises(lmtune.InputError, match="adapter= loads an adapter folder onto a model folder"):
        lmtune.generate(model, tok, "the cat", adapter=gpt2_dir)
    with pytest.raises(lmtune.InputError, match="prompt must be a string"):
        lmtune.generate(gpt2_dir)


def test_evaluate_rows_file_and_in_memory_model_agree_with_the_cli(gpt2_dir, tmp_path, capsys):
    path = write_jsonl(tmp_path / "eval.jsonl", ROWS)
    assert main(["eval", "--model", str(gpt2_dir), "--data", str(path), "--metrics", "perplexity,exact_match",
                 "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    from_file = lmtune.evaluate(gpt2_dir, path, metrics="perplexity,exact_match")
    from_rows = lmtune.evaluate(gpt2_dir, ROWS, metrics=["perplexity", "exact_match"])
    model, tok = lmtune.load(gpt2_dir)
    from_memory = lmtune.evaluate(model, ROWS, "perplexity,exact_match", tokenizer=tok)
    assert cli == from_file == from_rows
    assert from_memory["perplexity"] == pytest.approx(cli["perplexity"], rel=1e-6)
    assert from_memory["exact_match"] == cli["exact_match"] and from_memory["tokens"] == cli["tokens"]


def test_evaluate_few_shot_from_rows_keeps_each_row_out_of_its_own_shots(gpt2_dir, tmp_path):
    path = write_jsonl(tmp_path / "eval.jsonl", ROWS)
    assert lmtune.evaluate(gpt2_dir, ROWS, shots=2) == lmtune.evaluate(gpt2_dir, path, shots=2)


def test_evaluate_names_the_bad_row(gpt2_dir):
    rows = [dict(ROWS[0]), {"prompt": "the cat", "completion": 3}]
    with pytest.raises(lmtune.InputError, match=r"data\[1\]"):
        lmtune.evaluate(gpt2_dir, rows, metrics="exact_match")


def test_inspect_from_python_matches_the_cli(gpt2_dir, capsys):
    assert main(["inspect", "--model", str(gpt2_dir), "method=lora", "lora.r=4", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    api = lmtune.inspect(gpt2_dir, method="lora", lora={"r": 4})
    model, _ = in_memory_model()
    from_memory = lmtune.inspect(model, method="lora", lora={"r": 4})

    def counts(report):  # the predicted peak adds this process's resident memory, which moves between calls
        return {m: {k: v for k, v in row.items() if k != "predicted_peak"} for m, row in report["methods"].items()}

    assert {k: api[k] for k in ("model", "architecture", "method")} == {k: cli[k] for k in ("model", "architecture",
                                                                                            "method")}
    assert counts(api) == counts(cli) == counts(from_memory)
    assert "predicted_peak" in api["methods"]["lora"]


def test_load_config_is_the_configs(tmp_path):
    from lmtune.config import load_config

    assert lmtune.load_config is load_config


def test_the_demo_runs_single_threaded_and_restores_the_thread_count(monkeypatch):
    demo = importlib.import_module("lmtune.demo")
    inside = []
    monkeypatch.setattr(demo, "_run_demo", lambda out, steps: inside.append(torch.get_num_threads()) or {})
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        demo.run_demo("unused", steps=1)
        assert inside == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


# --- train ---------------------------------------------------------------------------------------------------------

TRAIN = {"steps": 4, "batch_size": 4, "lr": 1e-2, "max_length": 32, "seed": 3}


def summary_losses(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if "loss" in k and isinstance(v, float)}


def test_train_on_rows_and_a_dataset_equals_the_cli_run_on_their_file(gpt2_dir, tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    eval_path = write_jsonl(tmp_path / "eval.jsonl", ROWS[:4])
    assert main(["train", f"model={gpt2_dir}", f"data.train={path}", f"data.eval={eval_path}", "method=lora",
                 f"output_dir={tmp_path / 'cli'}", *[f"train.{k}={v}" for k, v in TRAIN.items()]]) == 0
    cli = json.loads((tmp_path / "cli" / "summary.json").read_text())
    rows = lmtune.train(gpt2_dir, data=ROWS, eval_data=ROWS[:4], method="lora", output_dir=tmp_path / "rows",
                        train=TRAIN)
    dataset = lmtune.train(gpt2_dir, data=datasets.Dataset.from_list(ROWS), eval_data=eval_path, method="lora",
                           output_dir=tmp_path / "ds", train=TRAIN)
    assert summary_losses(cli)  # final and eval losses are there to compare
    assert summary_losses(rows.summary) == summary_losses(dataset.summary) == summary_losses(cli)
    cli_curve = (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()
    rows_curve = (tmp_path / "rows" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x).get("loss") for x in cli_curve] == [json.loads(x).get("loss") for x in rows_curve]


def test_the_result_carries_the_trained_model_with_its_adapter_as_peft_loads_it(gpt2_dir, tmp_path):
    peft = pytest.importorskip("peft")  # the oracle: PEFT reading the adapter folder the run wrote
    from transformers import AutoModelForCausalLM

    result = lmtune.train(gpt2_dir, data=ROWS, method="lora", output_dir=tmp_path / "run", train=TRAIN,
                          lora={"r": 4, "target_modules": "all-linear"})
    assert result.output_dir == tmp_path / "run"
    assert result.summary == json.loads((tmp_path / "run" / "summary.json").read_text())
    assert len(result.tokenizer) == len(word_tokenizer())
    assert any(".lora_A." in n for n, _ in result.model.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    oracle = peft.PeftModel.from_pretrained(base, tmp_path / "run").eval()
    ids = torch.tensor([result.tokenizer("the cat can run .", add_special_tokens=False)["input_ids"]])
    result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(result.model(input_ids=ids).logits, oracle(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    reloaded, tok = lmtune.load(gpt2_dir, adapter=tmp_path / "run")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, oracle(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_train_an_in_memory_model_equals_training_its_saved_folder(tmp_path):
    from lmtune.models.loading import save_model

    model, tok = in_memory_model("llama")
    save_model(model, tok, tmp_path / "base")  # the same initial weights, as a folder
    from_folder = lmtune.train(tmp_path / "base", data=ROWS, output_dir=tmp_path / "a", train=TRAIN)
    in_memory = lmtune.train(model, tok, data=ROWS, output_dir=tmp_path / "b", train=TRAIN)
    assert summary_losses(from_folder.summary)
    assert summary_losses(in_memory.summary) == pytest.approx(summary_losses(from_folder.summary), rel=1e-6)
    assert in_memory.model is model  # trained in place, as the docstring says
    trained = dict(in_memory.model.named_parameters())
    for name, p in from_folder.model.named_parameters():
        torch.testing.assert_close(trained[name], p, rtol=1e-5, atol=1e-6)


def test_train_with_a_config_file_and_keyword_sections_over_it(gpt2_dir, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {gpt2_dir}\nmethod: lora\ntrain:\n  steps: 2\n  batch_size: 4\n  lr: 0.01\n")
    result = lmtune.train(config=cfg, data=ROWS, output_dir=tmp_path / "run", train={"steps": 3})
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert max(steps) == 3  # the keyword section won over the file
    assert any(".lora_A." in n for n, _ in result.model.named_parameters())  # the file's method held


@pytest.mark.parametrize("kwargs, message", [
    ({"data": [dict(ROWS[0]), {"prompt": "the cat", "completion": 7}]}, r"data\[1\]"),
    ({"data": ROWS, "eval_data": [{"prompt": "a"}, 5]}, r"eval_data\[1\]: each row must be a mapping"),
    ({"data": ROWS, "lora": {"rank": 4}, "method": "lora"}, "lora.rank"),
])
def test_train_raises_input_error_naming_what_is_wrong(gpt2_dir, tmp_path, kwargs, message):
    with pytest.raises(lmtune.InputError, match=message):
        lmtune.train(gpt2_dir, output_dir=tmp_path / "run", train=TRAIN, **kwargs)
    assert not (tmp_path / "run" / "summary.json").exists()


def test_train_refuses_a_tokenizer_without_an_in_memory_model_and_vice_versa(gpt2_dir, tmp_path):
    model, tok = in_memory_model()
    with pytest.raises(lmtune.InputError, match="needs its tokenizer"):
        lmtune.train(model, data=ROWS, output_dir=tmp_path / "a")
    with pytest.raises(lmtune.InputError, match="goes with an in-memory model"):
        lmtune.train(gpt2_dir, tok, data=ROWS, output_dir=tmp_path / "b")


def test_the_python_api_example_tunes_scores_and_merges(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    try:
        example = importlib.import_module("python_api")
    finally:
        sys.path.pop(0)
    r = example.run(tmp_path / "ex", steps=40)
    assert r["after"]["perplexity"] < r["before"]["perplexity"]
    # The merged folder scores what the in-memory model with its adapter scored.
    assert r["merged"]["perplexity"] == pytest.approx(r["after"]["perplexity"], rel=1e-4)
    assert r["merged"]["exact_match"] == r["after"]["exact_match"]


def test_merging_a_chat_adapter_keeps_the_chat_tokens_it_added(gpt2_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    turn = [{"role": "user", "content": "can the cat run ?"}, {"role": "assistant", "content": "the cat can run ."}]
    result = lmtune.train(gpt2_dir, data=[{"messages": turn}] * 8, method="lora", output_dir=tmp_path / "chat",
                          train={"steps": 3, "batch_size": 4, "max_length": 24, "lr": 5e-2})
    out = lmtune.merge(gpt2_dir, adapter=tmp_path / "chat", out=tmp_path / "merged")
    merged, tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)  # the oracle
    assert "<|im_end|>" in tok.get_vocab() and len(tok) == merged.get_input_embeddings().weight.shape[0]
    ids = torch.tensor([tok.apply_chat_template(turn, tokenize=True, return_dict=False)])
    result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, result.model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
