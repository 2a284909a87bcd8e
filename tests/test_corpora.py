"""Tests for the shipped corpora and their generator."""

from __future__ import annotations

import json

import pytest

from lmtune.assets import vocab
from lmtune.assets.corpora import (
    DATA_FILES,
    NEGATIVE_WORDS,
    POSITIVE_WORDS,
    build_corpora,
    check_in_vocabulary,
    data_path,
    generate_all,
    sentiment_score,
    tokenize_words,
)

EXPECTED_COUNTS = {
    "pretrain.txt": 4000, "retain.txt": 300, "questions.txt": 400,
    "questions_eval.txt": 100, "instructions.jsonl": 400,
    "instructions_eval.jsonl": 80, "chat.jsonl": 100, "preferences.jsonl": 400,
    "ppo_prompts.txt": 100, "sentiment_train.jsonl": 200,
    "sentiment_test.jsonl": 100,
}


def _lines(name: str) -> list[str]:
    return data_path(name).read_text(encoding="utf-8").splitlines()


def _records(name: str) -> list[dict]:
    return [json.loads(line) for line in _lines(name)]


def _tokens(texts: list[str]) -> set[str]:
    return {t for text in texts for t in tokenize_words(text)}


def test_committed_files_match_the_generator(tmp_path):
    counts = generate_all(tmp_path)
    assert counts == EXPECTED_COUNTS
    assert sorted(DATA_FILES) == sorted(EXPECTED_COUNTS)
    for name in DATA_FILES:
        assert (tmp_path / name).read_bytes() == data_path(name).read_bytes(), (
            f"{name} drifted: regenerate with python -m lmtune.assets.corpora")


def test_generation_is_deterministic_and_seeded():
    first, second = build_corpora(seed=1), build_corpora(seed=1)
    assert first == second
    assert first["pretrain.txt"] != build_corpora(seed=0)["pretrain.txt"]


def test_files_are_utf8_lines_with_newline_endings():
    for name in DATA_FILES:
        raw = data_path(name).read_bytes()
        assert raw.endswith(b"\n") and b"\r" not in raw and b"\n\n" not in raw
        raw.decode("utf-8")


def test_tokenize_words_splits_punctuation_and_lowercases():
    assert tokenize_words("Yes, the Cat can run.") == ["yes", ",", "the", "cat", "can", "run", "."]
    assert tokenize_words("where is it ?") == ["where", "is", "it", "?"]
    assert tokenize_words("") == []


def test_sentiment_score_counts_words_not_punctuation():
    assert sentiment_score("good .") == 1.0
    assert sentiment_score("the dog is sad .") == -0.25
    assert sentiment_score("good and bad") == 0.0
    assert sentiment_score("") == 0.0
    assert not set(POSITIVE_WORDS) & set(NEGATIVE_WORDS)


def test_every_tiny_corpus_is_within_the_pretrain_vocabulary():
    pretrain = _tokens(_lines("pretrain.txt"))
    assert 250 <= len(pretrain) <= 450
    assert set(POSITIVE_WORDS + NEGATIVE_WORDS) <= pretrain
    texts = _lines("retain.txt") + _lines("questions.txt") + _lines("questions_eval.txt")
    texts += _lines("ppo_prompts.txt")
    for name in ("instructions.jsonl", "instructions_eval.jsonl", "preferences.jsonl"):
        texts += [v for record in _records(name) for v in record.values()]
    texts += [m["content"] for record in _records("chat.jsonl") for m in record["messages"]]
    assert _tokens(texts) <= pretrain


def test_vocabulary_check_raises_on_unknown_tokens():
    check_in_vocabulary({"the", "cat", "."}, ["the cat ."], "ok.txt")
    with pytest.raises(ValueError, match=r"bad\.txt.*'dog'"):
        check_in_vocabulary({"the", "cat", "."}, ["the dog ."], "bad.txt")


def test_generator_refuses_out_of_vocabulary_text(monkeypatch, tmp_path):
    monkeypatch.setattr(vocab, "SYSTEM_PROMPTS", ("you are a robot .",))
    with pytest.raises(ValueError, match=r"chat\.jsonl.*'robot'"):
        generate_all(tmp_path)
    assert not list(tmp_path.iterdir())


def test_pretrain_is_lowercase_with_a_few_percent_questions_none_from_questions_txt():
    pretrain = _lines("pretrain.txt")
    assert len(set(pretrain)) == len(pretrain)
    assert all(line == line.lower() and line[-1] in ".?" for line in pretrain)
    questions = [line for line in pretrain if line.endswith("?")]
    assert 0.05 <= len(questions) / len(pretrain) <= 0.09
    assert not set(questions) & set(_lines("questions.txt") + _lines("questions_eval.txt"))
    retain = _lines("retain.txt")
    assert len(set(retain)) == len(retain) and not set(retain) & set(pretrain)


def test_held_out_splits_do_not_overlap():
    train, test = _lines("questions.txt"), _lines("questions_eval.txt")
    assert len(set(train + test)) == 500 and all(q.endswith(" ?") for q in train + test)
    train_prompts = [r["prompt"] for r in _records("instructions.jsonl")]
    eval_prompts = {r["prompt"] for r in _records("instructions_eval.jsonl")}
    assert len(set(train_prompts)) == 400 and len(eval_prompts) == 80
    assert not eval_prompts & set(train_prompts)
    chat_users = {m["content"] for r in _records("chat.jsonl") for m in r["messages"]
                  if m["role"] == "user"}
    assert not chat_users & eval_prompts
    sentiment_train = {r["text"] for r in _records("sentiment_train.jsonl")}
    assert not sentiment_train & {r["text"] for r in _records("sentiment_test.jsonl")}


def test_instruction_completions_follow_from_prompts():
    for record in _records("instructions.jsonl") + _records("instructions_eval.jsonl"):
        prompt, completion = tokenize_words(record["prompt"]), tokenize_words(record["completion"])
        assert prompt[-1] == "?" and completion[-1] == "."
        # The answer only reuses words of the question.
        assert set(completion) <= set(prompt) | {"yes", "no", ",", ".", "is"}
        if prompt[0] == "can":
            assert sorted(completion) == sorted(["yes", ","] + prompt[:-1] + ["."])
        if prompt[:3] == ["what", "color", "is"]:
            assert completion[-2:] == [prompt[-3], "."]


def test_chat_records_alternate_roles():
    records = _records("chat.jsonl")
    with_system = with_two_rounds = 0
    for record in records:
        roles = [m["role"] for m in record["messages"]]
        if roles[0] == "system":
            with_system += 1
            roles = roles[1:]
        assert roles in (["user", "assistant"], ["user", "assistant"] * 2)
        with_two_rounds += len(roles) == 4
    assert with_system > 0 and with_two_rounds > 0


def test_preferences_prefer_the_more_positive_completion():
    records = _records("preferences.jsonl")
    assert len({json.dumps(r) for r in records}) == len(records)
    for r in records:
        assert r["chosen"] != r["rejected"]
        assert sentiment_score(r["chosen"]) > sentiment_score(r["rejected"])
        full = [sentiment_score(f"{r['prompt']} {r[k]}") for k in ("chosen", "rejected")]
        assert full[0] > full[1]
    prompts = _lines("ppo_prompts.txt")
    assert len(set(prompts)) == 100 and all(not p.endswith((".", "?")) for p in prompts)


def test_sentiment_sets_are_balanced_with_disjoint_sentiment_words():
    words = vocab.REVIEW_WORDS
    train_words = set(words["train"]["positive"] + words["train"]["negative"])
    test_words = set(words["test"]["positive"] + words["test"]["negative"])
    assert not train_words & test_words
    for name, split, size in (("sentiment_train.jsonl", "train", 200),
                              ("sentiment_test.jsonl", "test", 100)):
        records = _records(name)
        labels = [r["label"] for r in records]
        assert labels.count("positive") == labels.count("negative") == size // 2
        for r in records:  # exactly one sentiment word, of the record's label
            hits = [w for w in tokenize_words(r["text"]) if w in train_words | test_words]
            assert len(hits) == 1 and hits[0] in words[split][r["label"]]
    assert not _tokens([r["text"] for r in _records("sentiment_train.jsonl")]) & test_words


def test_data_path_names_available_files_when_missing():
    assert data_path("pretrain.txt").is_file()
    with pytest.raises(FileNotFoundError, match="pretrain.txt"):
        data_path("no_such_corpus.txt")
