"""Text and classification metrics as pure functions over predictions and references.

The heavy libraries (sacrebleu, rouge-score, scikit-learn) are imported inside the
functions that need them, so importing this module stays cheap.
"""

from __future__ import annotations

import difflib
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lmtune.errors import InputError

#: One reference string per prediction, or several acceptable references.
References = Sequence[str] | Sequence[Sequence[str]]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _as_list(values: Any) -> list[Any]:
    # Tensors and arrays turn into plain Python values, so comparisons are exact.
    return list(values.tolist()) if hasattr(values, "tolist") else list(values)


def _check_pair(name: str, first: Sequence[Any], second: Sequence[Any]) -> None:
    if len(first) != len(second):
        raise InputError(
            f"{name}: the inputs differ in length ({len(first)} vs {len(second)}); "
            "they must pair up one to one."
        )
    if len(first) == 0:
        raise InputError(f"{name}: no examples to score.")


def _ref_lists(name: str, preds: Sequence[str], refs: References) -> list[list[str]]:
    _check_pair(name, preds, refs)
    lists = [[r] if isinstance(r, str) else list(r) for r in refs]
    if any(not group for group in lists):
        raise InputError(f"{name}: every prediction needs at least one reference.")
    return lists


def normalize_answer(s: str) -> str:
    """Normalise an answer the SQuAD way before comparing.

    Args:
        s: Answer text.

    Returns:
        The text lowercased, without punctuation or the articles a/an/the, and
        with runs of whitespace collapsed to one space.
    """
    s = s.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _pair_f1(pred: str, ref: str) -> float:
    pred_tokens = normalize_answer(pred).split()
    ref_tokens = normalize_answer(ref).split()
    if not pred_tokens or not ref_tokens:
        # SQuAD scores an empty answer 1 only against an empty reference.
        return float(pred_tokens == ref_tokens)
    same = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(preds: Sequence[str], refs: References) -> float:
    """Share of predictions equal to a reference after `normalize_answer`.

    Args:
        preds: Predicted answers.
        refs: One reference per prediction, or a list of acceptable references
            (the best match counts).

    Returns:
        The mean exact match in [0, 1].

    Raises:
        InputError: If the inputs are empty or differ in length.
    """
    lists = _ref_lists("exact_match", preds, refs)
    hits = [
        max(normalize_answer(p) == normalize_answer(r) for r in group)
        for p, group in zip(preds, lists)
    ]
    return sum(hits) / len(hits)


def token_f1(preds: Sequence[str], refs: References) -> float:
    """Mean SQuAD token-overlap F1 between predictions and references.

    Args:
        preds: Predicted answers.
        refs: One reference per prediction, or a list of acceptable references
            (the best F1 counts).

    Returns:
        The mean F1 in [0, 1].

    Raises:
        InputError: If the inputs are empty or differ in length.
    """
    lists = _ref_lists("token_f1", preds, refs)
    scores = [max(_pair_f1(p, r) for r in group) for p, group in zip(preds, lists)]
    return sum(scores) / len(scores)


def bleu(preds: Sequence[str], refs: References) -> float:
    """Corpus BLEU computed by sacrebleu with its default settings.

    Args:
        preds: Hypotheses.
        refs: One reference per hypothesis, or the same number of references
            for every hypothesis.

    Returns:
        BLEU in [0, 100].

    Raises:
        InputError: If the inputs are empty, differ in length, or give a varying
            number of references.
    """
    import sacrebleu

    lists = _ref_lists("bleu", preds, refs)
    if len({len(group) for group in lists}) != 1:
        raise InputError(
            "bleu: every hypothesis must have the same number of references."
        )
    # sacrebleu wants one stream per reference slot, not one list per hypothesis.
    streams = [list(stream) for stream in zip(*lists)]
    return float(sacrebleu.corpus_bleu(list(preds), streams).score)


def rouge_l(preds: Sequence[str], refs: References) -> float:
    """Mean ROUGE-L F-measure from rouge-score (no stemming).

    Args:
        preds: Predictions.
        refs: One reference per prediction, or several (the best counts).

    Returns:
        The mean ROUGE-L F-measure in [0, 1].

    Raises:
        InputError: If the inputs are empty or differ in length.
    """
    from rouge_score import rouge_scorer

    lists = _ref_lists("rouge", preds, refs)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = [
        max(scorer.score(r, p)["rougeL"].fmeasure for r in group)
        for p, group in zip(preds, lists)
    ]
    return sum(scores) / len(scores)


def accuracy(y_true: Sequence[Any], y_pred: Sequence[Any]) -> float:
    """Share of predicted labels equal to the true labels.

    Args:
        y_true: True labels.
        y_pred: Predicted labels.

    Returns:
        Accuracy in [0, 1].

    Raises:
        InputError: If the inputs are empty or differ in length.
    """
    truth, pred = _as_list(y_true), _as_list(y_pred)
    _check_pair("accuracy", pred, truth)
    return sum(t == p for t, p in zip(truth, pred)) / len(truth)


_F1_AVERAGES = ("macro", "micro", "weighted", "binary")


def f1(y_true: Sequence[Any], y_pred: Sequence[Any], average: str = "macro") -> float:
    """Classification F1 from scikit-learn.

    Args:
        y_true: True labels.
        y_pred: Predicted labels.
        average: How per-class scores combine: macro, micro, weighted or binary
            (binary scores label 1 as the positive class).

    Returns:
        F1 in [0, 1]; a class never predicted nor present contributes 0.

    Raises:
        InputError: If the inputs are empty, differ in length, or `average` is
            unknown or does not suit the labels.
    """
    from sklearn.metrics import f1_score

    truth, pred = _as_list(y_true), _as_list(y_pred)
    _check_pair("f1", pred, truth)
    if average not in _F1_AVERAGES:
        raise InputError(
            f"f1: unknown average {average!r}; use one of {', '.join(_F1_AVERAGES)}."
        )
    try:
        return float(f1_score(truth, pred, average=average, zero_division=0))
    except ValueError as err:
        raise InputError(f"f1: {err}") from err


def auc(y_true: Sequence[Any], scores: Any) -> float:
    """Area under the ROC curve from scikit-learn.

    Args:
        y_true: True labels, shape (N,).
        scores: For two classes, the positive class's score, shape (N,) (an
            (N, 2) matrix is also accepted, its second column is used). For more
            classes, class probabilities of shape (N, C), scored one-vs-rest.

    Returns:
        ROC AUC in [0, 1].

    Raises:
        InputError: If the inputs are empty or differ in length, if y_true holds
            a single class, or if the scores do not fit the labels.
    """
    import numpy as np
    from sklearn.metrics import roc_auc_score

    truth = np.asarray(_as_list(y_true))
    score = np.asarray(_as_list(scores), dtype=float)
    _check_pair("auc", score, truth)
    classes = np.unique(truth)
    if len(classes) < 2:
        raise InputError(
            f"auc: y_true holds only the class {classes[0]!r}; the ROC curve needs "
            "both positive and negative examples, so evaluate on data with at "
            "least two classes."
        )
    if score.ndim == 2 and score.shape[1] == 2 and len(classes) == 2:
        score = score[:, 1]  # (N,)
    if len(classes) > 2 and score.ndim != 2:
        raise InputError(
            f"auc: y_true has {len(classes)} classes, so scores must be an (N, C) "
            "matrix of class probabilities."
        )
    try:
        if score.ndim == 2:
            return float(roc_auc_score(truth, score, multi_class="ovr"))
        return float(roc_auc_score(truth, score))
    except ValueError as err:
        raise InputError(f"auc: {err}") from err


def perplexity_from(loss_sum: float, n_tokens: int) -> float:
    """Perplexity from a summed token cross-entropy (natural log).

    Args:
        loss_sum: Sum of per-token negative log-likelihoods.
        n_tokens: Number of tokens the sum covers.

    Returns:
        exp(loss_sum / n_tokens), or infinity when that overflows.

    Raises:
        InputError: If n_tokens is not positive.
    """
    if n_tokens <= 0:
        raise InputError(f"perplexity: needs at least one token, got {n_tokens}.")
    try:
        return math.exp(loss_sum / n_tokens)
    except OverflowError:
        return math.inf


@dataclass(frozen=True)
class Metric:
    """A metric selectable on the command line.

    Attributes:
        name: The name used on the command line.
        needs: What the metric is computed from: "loss" (summed loss and token
            count), "text" (predicted and reference strings), "labels" (true and
            predicted labels) or "scores" (true labels and class scores).
        fn: The function computing it.
        help: One line for --help.
    """

    name: str
    needs: str
    fn: Callable[..., float]
    help: str


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("perplexity", "loss", perplexity_from, "exp of the mean token loss"),
        Metric("exact_match", "text", exact_match, "SQuAD exact match, 0-1"),
        Metric("token_f1", "text", token_f1, "SQuAD token-overlap F1, 0-1"),
        Metric("bleu", "text", bleu, "sacrebleu corpus BLEU, 0-100"),
        Metric("rouge", "text", rouge_l, "ROUGE-L F-measure, 0-1"),
        Metric("accuracy", "labels", accuracy, "share of correct labels, 0-1"),
        Metric("f1", "labels", f1, "macro-averaged classification F1, 0-1"),
        Metric("auc", "scores", auc, "ROC AUC (one-vs-rest for multi-class), 0-1"),
    )
}


def check_metric_names(names: Sequence[str]) -> list[str]:
    """Validate metric names given on the command line.

    Args:
        names: Metric names; case and surrounding spaces are ignored.

    Returns:
        The canonical names in the given order, without duplicates.

    Raises:
        InputError: For an unknown name, listing the valid ones and suggesting
            the closest.
    """
    checked: list[str] = []
    for raw in names:
        name = raw.strip().lower()
        if name not in METRICS:
            close = difflib.get_close_matches(name, list(METRICS), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise InputError(
                f"unknown metric {raw!r}.{hint} Valid metrics: {', '.join(METRICS)}."
            )
        if name not in checked:
            checked.append(name)
    return checked
