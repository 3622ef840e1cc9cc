"""Evaluate: re-score a run folder or a model folder on its eval split, another split, or other data."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from peftune import metrics, rundir
from peftune.data import load_splits
from peftune.errors import PeftuneError
from peftune.inference import batched_logits, load_target
from peftune.recipe import apply_override, parse_recipe


def evaluate(
    target: str | Path,
    split: str | None = None,
    overrides: Sequence[str] = (),
    output: str | Path | None = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Metrics and confusion matrix of a trained model on an eval split; written as JSON and returned.

    `overrides` are `data.*` keys (other files, columns, splits); `split` names the split to score.
    """
    loaded = load_target(target)
    if loaded.recipe is None:
        raise PeftuneError(f"{target} has no recipe to say what data to score; give a run folder or a merged folder")
    raw = loaded.recipe.model_dump()
    for item in overrides:
        if not item.startswith("data."):
            raise PeftuneError(f"eval takes only data.* overrides (got {item.split('=')[0]}); the model is fixed")
        apply_override(raw, item)
    if split:
        raw["data"]["eval_split"] = split
    recipe = parse_recipe(raw)
    _, rows = load_splits(recipe.data, recipe.seed, carve=split is None)
    labels = loaded.labels
    try:
        targets = np.array([labels.encode(value) for value in rows[recipe.data.label_column]])
    except (ValueError, KeyError) as err:
        raise PeftuneError(
            f"the eval data has a label the model does not know ({err}); "
            f"its labels are {list(labels.id2label.values())}"
        ) from None
    columns = recipe.data.text_columns
    pairs = rows[columns[1]] if len(columns) == 2 else None
    logits = batched_logits(loaded, rows[columns[0]], pairs, batch_size, progress=True, say_cut=True)
    names = recipe.metrics or metrics.default_metrics(labels.problem_type)
    result: dict[str, Any] = {
        "target": str(target),
        "split": recipe.data.eval_split,
        "examples": len(rows),
        "primary_metric": names[0],
        "metrics": metrics.compute_metrics(names, logits, targets, labels.problem_type, labels.thresholds),
        "overrides": list(overrides),
        "data": recipe.data.model_dump(include={"source", "config", "files"}),
        "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if labels.multi_label:
        assert labels.names is not None
        result["thresholds"] = dict(zip(labels.names, labels.decide_thresholds(), strict=True))
        result.update(_per_label(targets > 0.5, labels.decide(metrics.sigmoid(logits)), labels.names))
    elif labels.names is not None:
        result.update(_per_label(targets, logits.argmax(-1), labels.names))
    path = Path(output) if output else _default_output(target, recipe.data.eval_split)
    if path is not None:
        import json

        path.parent.mkdir(parents=True, exist_ok=True)
        if "confusion_matrix" in result:  # beside the JSON: eval-validation.png
            result["confusion_matrix_plot"] = str(_plot_confusion(result["confusion_matrix"], path.with_suffix(".png")))
        path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        result["written_to"] = str(path)
    return result


def _per_label(targets: np.ndarray, predicted: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """Each label's precision, recall, F1 and support, and their unweighted (macro) means: what accuracy hides
    when the classes are skewed. Single-label (ids): the confusion matrix too; multi-label (0/1 matrices): the
    support is the examples that have the label."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    ids = list(range(len(names)))
    precision, recall, f1, support = precision_recall_fscore_support(targets, predicted, labels=ids, zero_division=0)
    confusion = {}
    if targets.ndim == 1:
        matrix = confusion_matrix(targets, predicted, labels=ids)
        confusion = {"confusion_matrix": {"labels": list(names), "rows_true_columns_predicted": matrix.tolist()}}
    return {
        **confusion,
        "per_label": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(n)}
            for name, p, r, f, n in zip(names, precision, recall, f1, support, strict=True)
        },
        "macro": {"precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean())},
    }


def _plot_confusion(confusion: dict[str, Any], path: Path) -> Path:
    """The confusion matrix as a PNG (scikit-learn's display: counts, rows true, columns predicted)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    names = confusion["labels"]
    size = max(4.0, 0.6 * len(names) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    matrix = np.array(confusion["rows_true_columns_predicted"])
    ConfusionMatrixDisplay(matrix, display_labels=names).plot(ax=axes, cmap="Blues", colorbar=False)
    axes.set_title("confusion matrix")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def format_result(result: dict[str, Any]) -> str:
    """The metric table and the confusion matrix, as text for a terminal."""
    lines = [f"{result['target']} on {result['split']!r} ({result['examples']} examples)", ""]
    width = max(len(name) for name in result["metrics"])
    for name, value in result["metrics"].items():
        marker = "  (primary)" if name == result["primary_metric"] else ""
        lines.append(f"  {name.ljust(width)}  {value:.4f}{marker}")
    per_label = result.get("per_label")
    if per_label:
        cell = max(9, *(len(n) for n in per_label))
        lines += ["", "".join(h.rjust(cell if i == 0 else 11) for i, h in enumerate(
            ("label", "precision", "recall", "f1", "support")))]  # fmt: skip
        rows = [*per_label.items(), ("macro", {**result["macro"], "support": result["examples"]})]
        if result.get("thresholds"):
            lines[-1] += "  threshold"
            rows = [(n, {**s, "threshold": result["thresholds"].get(n)}) for n, s in rows]
        for name, s in rows:
            threshold = f"  {s['threshold']:9g}" if s.get("threshold") is not None else ""
            lines.append(name.rjust(cell) + "".join(f"{s[k]:11.4f}" for k in ("precision", "recall", "f1"))
                         + f"{s['support']:11d}" + threshold)  # fmt: skip
    confusion = result.get("confusion_matrix")
    if confusion:
        names = confusion["labels"]
        cell = max(6, *(len(n) for n in names))
        lines += ["", "confusion matrix (rows: true label, columns: predicted)", " " * (cell + 2) + "".join(
            n.rjust(cell + 2) for n in names)]  # fmt: skip
        for name, row in zip(names, confusion["rows_true_columns_predicted"], strict=True):
            lines.append(name.rjust(cell + 2) + "".join(str(v).rjust(cell + 2) for v in row))
    return "\n".join(lines)


def _default_output(target: str | Path, split: str) -> Path | None:
    folder = Path(target)
    return folder / rundir.eval_file(split) if folder.is_dir() else None
