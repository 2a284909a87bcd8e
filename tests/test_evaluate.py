"""`lmtune eval`: perplexity against transformers, generation metrics against HF generate, few-shot mode."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import SENTENCES, write_lines
from lmtune.cli import main
from lmtune.evaluate import few_shot_prefixes, run_eval
from lmtune.models.loading import load_model_and_tokenizer

PAIRS = [("can the cat run ?", "the cat can run ."), ("where is the red ball ?", "the red ball is big ."),
         ("i see a big dog .", "the dog can jump ."), ("the girl has a hat .", "the boy can see the bird ."),
         ("my mom likes the cat .", "the fish is in the cup .")]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def hf_loss_sum(model, ids: list[int], labels: list[int]) -> tuple[float, int]:
    """Oracle: transformers' own mean CE (it shifts labels itself) times the tokens it covers."""
    x = torch.tensor([ids])
    y = torch.tensor([labels])
    with torch.no_grad():
        loss = model(input_ids=x, labels=y).loss
    n = int((y[:, 1:] != -100).sum())
    return float(loss) * n, n


def framed(tok, text: str) -> list[int]:
    return [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def hf_greedy(model, tok, prompt: str, max_new_tokens: int) -> str:
    """Oracle: transformers' generate, greedy, stopping at EOS."""
    ids = torch.tensor([[tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_text_perplexity_matches_transformers(model_dir, tmp_path):
    data = write_lines(tmp_path / "eval.txt", SENTENCES)
    result = run_eval(str(model_dir), None, str(data), "perplexity")
    model, tok, _ = load_model_and_tokenizer(model_dir)
    sums = [hf_loss_sum(model, framed(tok, s), framed(tok, s)) for s in SENTENCES]
    total, n = sum(s for s, _ in sums), sum(k for _, k in sums)
    assert result["tokens"] == n
    assert result["perplexity"] == pytest.approx(math.exp(total / n), abs=1e-4)


def test_perplexity_is_token_weighted_not_example_averaged(gpt2_dir, tmp_path):
    lines = ["the cat can run .", "the boy can see the bird . the fish is in the cup . i see a big dog ."]
    data = write_lines(tmp_path / "eval.txt", lines)
    model, tok, _ = load_model_and_tokenizer(gpt2_dir)
    sums = [hf_loss_sum(model, framed(tok, s), framed(tok, s)) for s in lines]
    per_example = sum(s / n for s, n in sums) / len(sums)
    token_weighted = sum(s for s, _ in sums) / sum(n for _, n in sums)
    result = run_eval(str(gpt2_dir), None, str(data), "perplexity")
    assert result["loss"] == pytest.approx(token_weighted, abs=1e-5)
    assert abs(per_example - token_weighted) > 1e-3  # the two really differ on this data


def test_sft_perplexity_excludes_prompt_tokens(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    result = run_eval(str(model_dir), None, str(data), "perplexity")
    model, tok, _ = load_model_and_tokenizer(model_dir)
    total, n = 0.0, 0
    for p, c in PAIRS:
        head = [tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"]
        tail = tok(" " + c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        s, k = hf_loss_sum(model, head + tail, [-100] * len(head) + tail)
        total, n = total + s, n + k
    assert result["tokens"] == n
    assert result["perplexity"] == pytest.approx(math.exp(total / n), abs=1e-4)


def test_alpaca_records_score_the_output_only(gpt2_dir, tmp_path):
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": p, "input": "", "output": c} for p, c in PAIRS])
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    assert run_eval(str(gpt2_dir), None, str(alpaca))["loss"] == pytest.approx(
        run_eval(str(gpt2_dir), None, str(pc))["loss"], abs=1e-6)


def test_generation_metrics_match_hf_generate_and_the_metric_libraries(model_dir, tmp_path):
    import sacrebleu
    from rouge_score import rouge_scorer

    model, tok, _ = load_model_and_tokenizer(model_dir)
    answers = [hf_greedy(model, tok, p, 6) for p, _ in PAIRS]
    # Half the references are the model's own answers, so every metric lands strictly inside its range.
    refs = [a if i % 2 == 0 else c for i, (a, (_, c)) in enumerate(zip(answers, PAIRS))]
    data = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": p, "completion": r} for (p, _), r in zip(PAIRS, refs)])
    result = run_eval(str(model_dir), None, str(data), "exact_match,token_f1,bleu,rouge", max_new_tokens=6)
    same = [a.split() == r.split() for a, r in zip(answers, refs)]
    assert result["exact_match"] == pytest.approx(sum(same) / len(same))
    assert result["bleu"] == pytest.approx(sacrebleu.corpus_bleu(answers, [refs]).score)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = sum(scorer.score(r, a)["rougeL"].fmeasure for a, r in zip(answers, refs)) / len(refs)
    assert result["rouge"] == pytest.approx(rouge)
    assert 0.0 < result["token_f1"] <= 1.0


def test_exact_match_is_one_when_references_are_the_models_answers(gpt2_dir, tmp_path):
    model, tok, _ = load_model_and_tokenizer(gpt2_dir)
    rows = [{"prompt": p, "completion": hf_greedy(model, tok, p, 5)} for p, _ in PAIRS]
    data = write_jsonl(tmp_path / "eval.jsonl", rows)
    result = run_eval(str(gpt2_dir), None, str(data), "exact_match,token_f1", max_new_tokens=5)
    assert result["exact_match"] == 1.0 and result["token_f1"] == 1.0


def test_few_shot_prompt_holds_k_other_examples(tmp_path):
    from lmtune.data.readers import read_records

    data = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    records = read_records(data)
    prefixes = few_shot_prefixes(records, 2, None, str(data))
    assert prefixes[0] == f"{PAIRS[1][0]} {PAIRS[1][1]}\n{PAIRS[2][0]} {PAIRS[2][1]}\n"  # never itself
    assert prefixes[3] == f"{PAIRS[0][0]} {PAIRS[0][1]}\n{PAIRS[1][0]} {PAIRS[1][1]}\n"


def test_few_shot_generation_answers_the_prompt_with_shots_in_front(gpt2_dir, tmp_path):
    shots = write_jsonl(tmp_path / "shots.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS[:2]])
    model, tok, _ = load_model_and_tokenizer(gpt2_dir)
    prefix = "".join(f"{p} {c}\n" for p, c in PAIRS[:2])
    rows = [{"prompt": p, "completion": hf_greedy(model, tok, prefix + p, 4)} for p, _ in PAIRS[2:]]
    data = write_jsonl(tmp_path / "eval.jsonl", rows)
    with_shots = run_eval(str(gpt2_dir), None, str(data), "exact_match", shots=2, shots_file=str(shots),
                          max_new_tokens=4)
    assert with_shots["exact_match"] == 1.0 and with_shots["shots"] == 2


def test_few_shot_perplexity_scores_the_same_tokens_with_more_context(gpt2_dir, tmp_path):
    shots = write_jsonl(tmp_path / "shots.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS[:2]])
    data = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS[2:]])
    zero = run_eval(str(gpt2_dir), None, str(data), "perplexity")
    two = run_eval(str(gpt2_dir), None, str(data), "perplexity", shots=2, shots_file=str(shots))
    assert two["tokens"] == zero["tokens"]
    assert two["loss"] != pytest.approx(zero["loss"], abs=1e-6)


def test_json_flag_prints_machine_readable_results(gpt2_dir, tmp_path, capsys):
    data = write_lines(tmp_path / "eval.txt", SENTENCES[:3])
    assert main(["eval", "--model", str(gpt2_dir), "--data", str(data), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"perplexity", "loss", "tokens", "examples"} and out["examples"] == 3


@pytest.mark.parametrize("args, message", [
    (["--metrics", "perplx"], "unknown metric 'perplx'"),
    (["--metrics", "exact_match"], "needs prompt+completion"),
    (["--metrics", "perplexity", "--shots", "99"], "--shots 99 needs 100 examples"),
])
def test_bad_eval_requests_exit_2(gpt2_dir, tmp_path, capsys, args, message):
    data = write_lines(tmp_path / "eval.txt", SENTENCES[:3])
    assert main(["eval", "--model", str(gpt2_dir), "--data", str(data), *args]) == 2
    assert message in capsys.readouterr().err


def test_empty_eval_file_exits_2(gpt2_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    assert main(["eval", "--model", str(gpt2_dir), "--data", str(empty)]) == 2
    assert "empty" in capsys.readouterr().err


def test_classification_metrics_on_generation_data_exit_2(gpt2_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    assert main(["eval", "--model", str(gpt2_dir), "--data", str(data), "--metrics", "accuracy"]) == 2
    assert "text+label" in capsys.readouterr().err


def _train(model_dir: Path, out: Path, **overrides) -> Path:
    from lmtune.config import load_config
    from lmtune.run import run_training
    from lmtune.runlog import RunLog

    cfg = load_config(overrides={"model": str(model_dir), "output_dir": str(out), "train.steps": 3,
                                 "train.batch_size": 4, **overrides})
    run_training(cfg, log=RunLog(out, quiet=True, tensorboard=False))
    return out


def test_adapter_perplexity_matches_peft(gpt2_dir, tmp_path, corpus):
    from peft import PeftModel

    out = _train(gpt2_dir, tmp_path / "lora", **{"method": "lora", "data.train": str(corpus), "train.lr": 0.05})
    data = write_lines(tmp_path / "eval.txt", SENTENCES)
    result = run_eval(str(gpt2_dir), str(out), str(data), "perplexity")
    base, tok, _ = load_model_and_tokenizer(gpt2_dir)
    model = PeftModel.from_pretrained(base, out)
    sums = [hf_loss_sum(model, framed(tok, s), framed(tok, s)) for s in SENTENCES]
    oracle = math.exp(sum(s for s, _ in sums) / sum(n for _, n in sums))
    assert result["perplexity"] == pytest.approx(oracle, abs=1e-4)
    assert result["perplexity"] != pytest.approx(run_eval(str(gpt2_dir), None, str(data))["perplexity"], abs=1e-3)


SENTIMENT = [("the cat can run .", "pos"), ("the dog can jump .", "pos"), ("i see a big dog .", "neg"),
             ("the fish is in the cup .", "neg")]


def test_classification_metrics_come_from_the_saved_head(gpt2_dir, tmp_path):
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    from lmtune.data.readers import read_records
    from lmtune.models.heads import predict

    train = write_jsonl(tmp_path / "train.jsonl", [{"text": t, "label": y} for t, y in SENTIMENT * 3])
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": t, "label": y} for t, y in SENTIMENT])
    out = _train(gpt2_dir, tmp_path / "clf", **{"objective": "classify", "data.train": str(train)})
    result = run_eval(str(out), None, str(test), "accuracy,f1,auc")
    truth, pred, probs, _ = predict(out, None, read_records(test))
    assert result["accuracy"] == pytest.approx(accuracy_score(truth, pred))
    assert result["f1"] == pytest.approx(f1_score(truth, pred, average="macro", zero_division=0))
    assert result["auc"] == pytest.approx(roc_auc_score(truth, [p[1] for p in probs]))


def test_labels_never_seen_in_training_exit_2(gpt2_dir, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": t, "label": y} for t, y in SENTIMENT * 3])
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "the cat can run .", "label": "neutral"},
                                                  *[{"text": t, "label": y} for t, y in SENTIMENT]])
    out = _train(gpt2_dir, tmp_path / "clf", **{"objective": "classify", "data.train": str(train)})
    assert main(["eval", "--model", str(out), "--data", str(test), "--metrics", "accuracy"]) == 2
    assert "neutral" in capsys.readouterr().err


def test_sft_perplexity_equals_the_sft_objectives_eval_loss(gpt2_dir, tmp_path):
    rows = [{"instruction": p, "input": "", "output": c} for p, c in PAIRS]
    data = write_jsonl(tmp_path / "eval.jsonl", rows)
    out = _train(gpt2_dir, tmp_path / "sft", **{"data.train": str(data), "data.eval": str(data),
                                                "objective": "sft", "train.steps": 1})
    summary = json.loads((out / "summary.json").read_text())
    assert run_eval(str(out), None, str(data))["loss"] == pytest.approx(summary["eval_loss"], abs=1e-5)


def test_chat_records_without_a_chat_template_exit_2(gpt2_dir, tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]} for p, c in PAIRS]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    assert main(["eval", "--model", str(gpt2_dir), "--data", str(data)]) == 2
    assert "chat template" in capsys.readouterr().err
