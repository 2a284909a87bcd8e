"""Tests for lmtune.metrics against hand-computed values and the libraries called directly."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

import lmtune
from lmtune.errors import InputError
from lmtune.metrics import (
    METRICS,
    accuracy,
    auc,
    bleu,
    check_metric_names,
    exact_match,
    f1,
    normalize_answer,
    perplexity_from,
    rouge_l,
    token_f1,
)

HYPS = ["the cat sat on the mat", "a quick brown fox jumps over the dog", "hello"]
REFS = ["the cat is on the mat", "the quick brown fox jumped over the lazy dog", "hi"]


def test_normalize_answer() -> None:
    # lower -> "the  cat, sat!"; no punctuation -> "the  cat sat"; no article.
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert normalize_answer("An apple\tand THE pear.") == "apple and pear"
    # "theory" keeps its "the": only whole-word articles go.
    assert normalize_answer("Theory") == "theory"


def test_exact_match_hand_values() -> None:
    # "cat" == "cat", "dog" == "dog", "bird" != "fish" -> 2 / 3.
    preds = ["The cat.", "a dog", "bird"]
    assert exact_match(preds, ["cat", "the dog!", "fish"]) == pytest.approx(2 / 3)
    # With several references the best one counts.
    assert exact_match(["cat"], [["dog", "Cat"]]) == 1.0


def test_token_f1_hand_values() -> None:
    # [quick, brown, fox] vs [quick, red, fox, jumps]: 2 shared tokens,
    # P = 2/3, R = 2/4, F1 = 2 * (1/3) / (7/6) = 4/7; second pair shares none -> 0.
    preds = ["the quick brown fox", "blue"]
    refs = ["a quick red fox jumps", "red"]
    assert token_f1(preds, refs) == pytest.approx((4 / 7 + 0) / 2)
    # Counts clip: {x:2, y:1} & {x:1, y:2} = 2 shared, P = R = 2/3, F1 = 2/3.
    assert token_f1(["x x y"], ["x y y"]) == pytest.approx(2 / 3)
    # Both empty after normalisation -> 1; one empty -> 0.
    assert token_f1(["", ""], ["the", "cat"]) == pytest.approx(0.5)
    # Best of several references: 4/7 against the first, 1 against the second.
    choices = [["quick red fox jumps", "fox brown quick"]]
    assert token_f1(["quick brown fox"], choices) == 1.0


def test_bleu_matches_sacrebleu() -> None:
    assert bleu(HYPS, REFS) == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score)
    assert bleu(REFS, REFS) == pytest.approx(100.0)
    second = ["the cat was on the mat", "a fast brown fox jumped over a dog", "hello"]
    multi = [[a, b] for a, b in zip(REFS, second)]
    expected = sacrebleu.corpus_bleu(HYPS, [REFS, second]).score
    assert bleu(HYPS, multi) == pytest.approx(expected)


def test_rouge_l_matches_rouge_score() -> None:
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    expected = np.mean(
        [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(HYPS, REFS)]
    )
    assert rouge_l(HYPS, REFS) == pytest.approx(expected)
    # LCS of "the cat sat" in "the cat sat on the mat" is 3: P = 1, R = 1/2, F = 2/3.
    assert rouge_l(["the cat sat"], ["the cat sat on the mat"]) == pytest.approx(2 / 3)


def test_accuracy() -> None:
    # Positions 0 and 2 agree: 2 / 4.
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    y_true, y_pred = ["a", "b", "c", "a", "b"], ["a", "c", "c", "a", "a"]
    assert accuracy(y_true, y_pred) == pytest.approx(accuracy_score(y_true, y_pred))
    assert accuracy(np.array([2, 3]), np.array([2, 3])) == 1.0


def test_f1() -> None:
    # Class 1: TP 1, FN 1 -> P 1, R 1/2, F1 2/3. Class 0: TP 2, FP 1 -> P 2/3,
    # R 1, F1 4/5. Macro = (2/3 + 4/5) / 2 = 11/15.
    assert f1([1, 1, 0, 0], [1, 0, 0, 0]) == pytest.approx(11 / 15)
    y_true, y_pred = [0, 1, 2, 2, 1, 0, 2], [0, 2, 2, 1, 1, 0, 0]
    for average in ("macro", "micro", "weighted"):
        expected = f1_score(y_true, y_pred, average=average)
        assert f1(y_true, y_pred, average=average) == pytest.approx(expected)
    assert f1([1, 1, 0, 0], [1, 0, 0, 0], average="binary") == pytest.approx(2 / 3)


def test_auc_binary_and_multiclass() -> None:
    # Positive/negative pairs: (.35, .1) yes, (.35, .4) no, (.8, .1) yes, (.8, .4) yes -> 3/4.
    y, s = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    assert auc(y, s) == pytest.approx(0.75)
    two_column = [[1 - v, v] for v in s]
    assert auc(y, two_column) == pytest.approx(0.75)
    rng = np.random.default_rng(0)
    y3 = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 1])
    probs = rng.dirichlet(np.ones(3), size=len(y3))  # (10, 3)
    expected = roc_auc_score(y3, probs, multi_class="ovr")
    assert auc(y3, probs) == pytest.approx(expected)


def test_perplexity_from() -> None:
    assert perplexity_from(10.0, 4) == pytest.approx(math.exp(2.5))
    assert perplexity_from(0.0, 7) == 1.0
    assert perplexity_from(1e6, 1) == math.inf


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: exact_match(["a", "b"], ["a"]), "differ in length"),
        (lambda: token_f1([], []), "no examples"),
        (lambda: bleu(["x"], []), "differ in length"),
        (lambda: bleu(["x", "y"], [["x"], ["y", "z"]]), "same number"),
        (lambda: rouge_l([], []), "no examples"),
        (lambda: exact_match(["a"], [[]]), "at least one reference"),
        (lambda: accuracy([1, 2, 3], [1, 2]), "differ in length"),
        (lambda: f1([0, 1], [0, 1], average="mean"), "unknown average"),
        (lambda: auc([1, 1, 1], [0.2, 0.5, 0.9]), "only the class"),
        (lambda: auc([0, 1, 2], [0.2, 0.5, 0.9]), r"\(N, C\) matrix"),
        (lambda: auc([0, 1], [0.5]), "differ in length"),
        (lambda: perplexity_from(3.0, 0), "at least one token"),
    ],
)
def test_errors(call, message: str) -> None:
    with pytest.raises(InputError, match=message):
        call()


def test_registry_and_name_check() -> None:
    expected = ["perplexity", "exact_match", "token_f1", "bleu", "rouge"]
    assert list(METRICS) == [*expected, "accuracy", "f1", "auc"]
    assert METRICS["rouge"].fn is rouge_l
    assert check_metric_names(["BLEU", " rouge ", "bleu"]) == ["bleu", "rouge"]
    with pytest.raises(InputError, match="Did you mean 'bleu'") as info:
        check_metric_names(["accuracy", "blue"])
    assert "perplexity" in str(info.value)


def test_import_is_light() -> None:
    code = (
        "import sys, lmtune.metrics; "
        "assert not {'sacrebleu', 'rouge_score', 'sklearn'} & set(sys.modules)"
    )
    # The child must find the same lmtune as this process, installed or not.
    env = {**os.environ, "PYTHONPATH": str(Path(lmtune.__file__).parents[1])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
