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


def _multi(which: str, average: str) -> Callable[..., float]:
    def score(pred: np.ndarray, true: np.ndarray) -> float:
        from sklearn import metrics as sk

        return float(getattr(sk, f"{which}_score")(true, pred, average=average, zero_division=0))

    return score


# Multi-label (0/1 matrices, a row per example, a column per label): accuracy is subset accuracy (every label of
# the row right), f1, precision and recall are micro averages (over every label decision).
MULTI_LABEL: dict[str, tuple[Callable[..., float], bool]] = {
    "accuracy": (lambda pred, true: float((pred == true).all(axis=1).mean()), False),
    "f1": (_multi("f1", "micro"), False),
    "f1_micro": (_multi("f1", "micro"), False),
    "f1_macro": (_multi("f1", "macro"), False),
    "f1_weighted": (_multi("f1", "weighted"), False),
    "precision": (_multi("precision", "micro"), False),
    "recall": (_multi("recall", "micro"), False),
    "hamming_loss": (lambda pred, true: float((pred != true).mean()), False),
}
BUILTIN = {**CLASSIFICATION, **REGRESSION, **MULTI_LABEL}
LOWER_IS_BETTER = {"mse", "mae", "loss", "hamming_loss"}
FITTING = {"classification": CLASSIFICATION, "multi_label": MULTI_LABEL, "regression": REGRESSION}


def default_metrics(problem_type: str) -> list[str]:
    """The metrics a recipe gets when it names none."""
    return {"regression": ["pearson", "spearmanr"], "multi_label": ["f1_micro", "f1_macro", "accuracy"]}.get(
        problem_type, ["accuracy", "f1"]
    )


def check_metrics(names: Sequence[str], problem_type: str) -> None:
    """Refuse metrics that do not fit the problem type, before any training starts."""
    fits = FITTING[problem_type]
    for name in names:
        if name in BUILTIN and name not in fits:
            raise PeftuneError(f"metric {name!r} does not apply to {problem_type}; use one of: {', '.join(fits)}")


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Multi-label scores: each label's probability on its own."""
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def tune_thresholds(logits: np.ndarray, labels: np.ndarray) -> list[float]:
    """Each label's threshold on its sigmoid score with the best F1 on these examples (0.05 to 0.95 by 0.05;
    of equal ones, the nearest to 0.5). A label no example has keeps 0.5."""
    from sklearn.metrics import f1_score

    scores, true = sigmoid(logits), np.asarray(labels) > 0.5
    grid = sorted(np.round(np.arange(0.05, 0.96, 0.05), 2), key=lambda t: abs(t - 0.5))
    chosen = []
    for j in range(true.shape[1]):
        if not true[:, j].any():
            chosen.append(0.5)
            continue
        f1 = [f1_score(true[:, j], scores[:, j] >= t, zero_division=0) for t in grid]
        chosen.append(float(grid[int(np.argmax(f1))]))  # argmax: the first best, the nearest to 0.5
    return chosen


def compute_metrics(
    names: Sequence[str], logits: np.ndarray, labels: np.ndarray, problem_type: str,
    thresholds: Sequence[float] | None = None,
) -> dict[str, float]:  # fmt: skip
    """Compute the named metrics from model logits and the true labels (multi-label: at `thresholds`, 0.5 when
    none are given)."""
    if problem_type == "multi_label":
        hot = np.asarray(labels) > 0.5
        decided = sigmoid(logits) >= np.asarray(thresholds if thresholds is not None else 0.5)
        results = {}
        for name in names:
            if name not in MULTI_LABEL:
                raise PeftuneError(
                    f"metric {name!r} does not apply to multi_label; use one of: {', '.join(MULTI_LABEL)}"
                )
            results[name] = MULTI_LABEL[name][0](decided, hot)
        return results
    if problem_type == "regression":
        pred = np.asarray(logits, dtype=np.float64).reshape(-1)
        true = np.asarray(labels, dtype=np.float64).reshape(-1)
        num_labels = 1
    else:
        pred = np.asarray(logits).argmax(-1)
        true = np.asarray(labels).reshape(-1)
        num_labels = np.asarray(logits).shape[-1]
    results = {}
    table = FITTING[problem_type]
    for name in names:
        if name in BUILTIN:
            check_metrics([name], problem_type)
            fn, wants_labels = table[name]
            results[name] = fn(pred, true, num_labels) if wants_labels else fn(pred, true)
        else:
            results.update(_evaluate_module(name).compute(predictions=pred, references=true))
    return results


def trainer_metrics(
    names: Sequence[str], problem_type: str, thresholds: Sequence[float] | None = None,
    documents: Sequence[int] | None = None, pooling: str = "mean",
) -> Callable[[Any], dict[str, float]]:  # fmt: skip
    """A `compute_metrics` callable for `transformers.Trainer`. With `documents` (the text each eval row, a window
    of it, comes from), the windows' logits are pooled first: the metrics count texts, not windows."""

    def compute(prediction: Any) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        logits, labels = per_text(logits, prediction.label_ids, documents, pooling)
        return compute_metrics(names, logits, labels, problem_type, thresholds)

    return compute


def per_text(
    logits: np.ndarray, labels: np.ndarray, documents: Sequence[int] | None, pooling: str = "mean"
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels one row per text: windows pooled (`documents[i]`: row i's text), else as they are."""
    if documents is None:
        return logits, labels
    from peftune.data import pool_windows

    texts, first = np.unique(np.asarray(documents), return_index=True)
    index = np.searchsorted(texts, documents)  # texts numbered 0..n-1 in the order of their ids
    return pool_windows(logits, index, len(texts), pooling), np.asarray(labels)[first]


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
