"""Offline metrics, checked against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from peftune.errors import PeftuneError
from peftune.metrics import check_metrics, compute_metrics, default_metrics


def one_hot_logits(predicted: list[int], num_labels: int) -> np.ndarray:
    logits = np.zeros((len(predicted), num_labels))
    logits[np.arange(len(predicted)), predicted] = 1.0
    return logits


def test_binary_classification_metrics():
    # true: 1 1 1 0 0 0 ; predicted: 1 1 0 1 0 0  -> TP=2 FN=1 FP=1 TN=2
    logits = one_hot_logits([1, 1, 0, 1, 0, 0], 2)
    labels = np.array([1, 1, 1, 0, 0, 0])
    names = ["accuracy", "f1", "precision", "recall", "matthews_correlation"]
    got = compute_metrics(names, logits, labels, "classification")
    assert got["accuracy"] == pytest.approx(4 / 6)
    assert got["f1"] == pytest.approx(2 / 3)  # binary F1 of the positive class: 2*2 / (2*2 + 1 + 1)
    assert got["precision"] == pytest.approx(2 / 3) and got["recall"] == pytest.approx(2 / 3)
    assert got["matthews_correlation"] == pytest.approx((2 * 2 - 1 * 1) / np.sqrt(3 * 3 * 3 * 3))


def test_multiclass_f1_is_macro():
    # class 0: TP=2 FP=0 FN=0 -> F1 1 ; class 1: TP=1 FP=1 FN=0 -> 2/3 ; class 2: TP=0 FP=0 FN=1 -> 0
    logits = one_hot_logits([0, 0, 1, 1], 3)
    labels = np.array([0, 0, 1, 2])
    got = compute_metrics(["f1", "f1_macro", "f1_micro", "accuracy"], logits, labels, "classification")
    assert got["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert got["f1_macro"] == got["f1"]
    assert got["f1_micro"] == pytest.approx(3 / 4) == got["accuracy"]


def test_regression_metrics():
    predictions = np.array([[1.0], [2.0], [3.0], [5.0]])
    labels = np.array([1.0, 3.0, 2.0, 4.0])
    got = compute_metrics(["pearson", "spearmanr", "mse", "mae"], predictions, labels, "regression")
    p, t = predictions.ravel(), labels
    pearson = ((p - p.mean()) * (t - t.mean())).sum() / np.sqrt(
        ((p - p.mean()) ** 2).sum() * ((t - t.mean()) ** 2).sum()
    )
    assert got["pearson"] == pytest.approx(pearson)
    assert got["spearmanr"] == pytest.approx(1 - 6 * (0 + 1 + 1 + 0) / (4 * (16 - 1)))  # ranks 1234 vs 1324
    assert got["mse"] == pytest.approx((0 + 1 + 1 + 1) / 4) and got["mae"] == pytest.approx(3 / 4)


def test_defaults_and_mismatches():
    assert default_metrics("classification")[0] == "accuracy"
    assert default_metrics("regression")[0] == "pearson"
    with pytest.raises(PeftuneError, match="metric 'accuracy' does not apply to regression"):
        check_metrics(["accuracy"], "regression")
    with pytest.raises(PeftuneError, match="metric 'pearson' does not apply to classification"):
        check_metrics(["pearson"], "classification")


def test_unknown_metric_offline_is_a_clear_error():
    with pytest.raises(PeftuneError, match=r"metric 'bleurt_xl' is not built in and evaluate\.load could not load it"):
        compute_metrics(["bleurt_xl"], one_hot_logits([0], 2), np.array([0]), "classification")
