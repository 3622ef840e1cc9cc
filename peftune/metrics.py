"""Evaluation metrics that work offline.

`evaluate.load("accuracy")` downloads its module from the Hub, so the common classification and
regression metrics are computed here with scikit-learn and scipy (the same functions the GLUE metric
modules call). Any other name is handed to `evaluate.load`, which works where the Hub or a local
metric script is reachable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from peftune.errors import PeftuneError


def _accuracy(pred: np.ndarray, true: np.ndarray) -> float:
    return float((pred == true).mean())


def _f1(average: str | None) -> Callable[..., float]:
    def f1(pred: np.ndarray, true: np.ndarray, num_labels: int) -> float:
        from sklearn.metrics import f1_score

        binary = average is None and num_labels == 2
        return float(f1_score(true, pred, average="binary" if binary else (average or "macro"), zero_division=0))

    return f1


def _precision_recall(which: str) -> Callable[..., float]:
    def score(pred: np.ndarray, true: np.ndarray, num_labels: int) -> float:
        from sklearn.metrics import precision_score, recall_score

        fn = precision_score if which == "precision" else recall_score
        return float(fn(true, pred, average="binary" if num_labels == 2 else "macro", zero_division=0))

    return score


def _matthews(pred: np.ndarray, true: np.ndarray) -> float:
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(true, pred))


def _pearson(pred: np.ndarray, true: np.ndarray) -> float:
    from scipy.stats import pearsonr

    return float(pearsonr(pred, true)[0]) if np.std(pred) > 0 else 0.0


def _spearman(pred: np.ndarray, true: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(pred, true)[0]) if np.std(pred) > 0 else 0.0


# name -> (function, takes num_labels). F1, precision and recall are binary for two classes, else macro.
CLASSIFICATION: dict[str, tuple[Callable[..., float], bool]] = {
    "accuracy": (_accuracy, False),
    "f1": (_f1(None), True),
    "f1_macro": (_f1("macro"), True),
    "f1_micro": (_f1("micro"), True),
    "f1_weighted": (_f1("weighted"), True),
    "precision": (_precision_recall("precision"), True),
    "recall": (_precision_recall("recall"), True),
    "matthews_correlation": (_matthews, False),
}
REGRESSION: dict[str, tuple[Callable[..., float], bool]] = {
    "pearson": (_pearson, False),
    "spearmanr": (_spearman, False),
    "mse": (lambda pred, true: float(np.mean((pred - true) ** 2)), False),
    "mae": (lambda pred, true: float(np.mean(np.abs(pred - true))), False),
}
BUILTIN = {**CLASSIFICATION, **REGRESSION}
LOWER_IS_BETTER = {"mse", "mae", "loss"}


def default_metrics(problem_type: str) -> list[str]:
    """The metrics a recipe gets when it names none."""
    return ["pearson", "spearmanr"] if problem_type == "regression" else ["accuracy", "f1"]


def check_metrics(names: Sequence[str], problem_type: str) -> None:
    """Refuse metrics that do not fit the problem type, before any training starts."""
    wrong = REGRESSION if problem_type == "classification" else CLASSIFICATION
    for name in names:
        if name in wrong:
            fits = ", ".join(CLASSIFICATION if problem_type == "classification" else REGRESSION)
            raise PeftuneError(f"metric {name!r} does not apply to {problem_type}; use one of: {fits}")


def compute_metrics(
    names: Sequence[str], logits: np.ndarray, labels: np.ndarray, problem_type: str
) -> dict[str, float]:
    """Compute the named metrics from model logits and the true labels."""
    if problem_type == "regression":
        pred = np.asarray(logits, dtype=np.float64).reshape(-1)
        true = np.asarray(labels, dtype=np.float64).reshape(-1)
        num_labels = 1
    else:
        pred = np.asarray(logits).argmax(-1)
        true = np.asarray(labels).reshape(-1)
        num_labels = np.asarray(logits).shape[-1]
    results = {}
    for name in names:
        if name in BUILTIN:
            fn, wants_labels = BUILTIN[name]
            results[name] = fn(pred, true, num_labels) if wants_labels else fn(pred, true)
        else:
            results.update(_evaluate_module(name).compute(predictions=pred, references=true))
    return results


def trainer_metrics(names: Sequence[str], problem_type: str) -> Callable[[Any], dict[str, float]]:
    """A `compute_metrics` callable for `transformers.Trainer`."""

    def compute(prediction: Any) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return compute_metrics(names, logits, prediction.label_ids, problem_type)

    return compute


def _evaluate_module(name: str) -> Any:
    try:
        import evaluate

        return evaluate.load(name)
    except Exception as err:  # evaluate raises many types for an unreachable Hub or an unknown name
        builtin = ", ".join(BUILTIN)
        raise PeftuneError(
            f"metric {name!r} is not built in and evaluate.load could not load it ({type(err).__name__}); "
            f"use one of: {builtin}"
        ) from None
