"""Compare runs side by side: quality against trainable parameters, time, memory and size.

Every value comes from the runs' own `metrics.json`; nothing is recomputed, so a table row always says
what the run recorded.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peftune import rundir
from peftune.errors import PeftuneError
from peftune.metrics import LOWER_IS_BETTER
from peftune.record import Metrics

FORMATS = ("table", "markdown", "csv", "json")
# The columns of a comparison, in order: (key, heading). `metric` is each run's primary metric.
COLUMNS = (
    ("run", "run"),
    ("method", "method"),
    ("base_model", "base model"),
    ("metric_name", "metric"),
    ("metric", "value"),
    ("trainable_parameters", "trainable"),
    ("trainable_share", "trainable %"),
    ("train_runtime_s", "train s"),
    ("train_samples_per_second", "samples/s"),
    ("train_tokens_per_second", "tokens/s"),
    ("peak_memory_mb", "peak MB"),
    ("weights_mb", "weights MB"),
    ("standalone_model_mb", "standalone MB"),
    ("quantization", "quantized"),
    ("device", "device"),
)

TEXT_COLUMNS = ("run", "method", "base_model", "metric_name", "device", "quantization")  # left-aligned


def collect(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """One row per run folder: the comparison columns, then every eval metric as `eval_<name>`."""
    if not paths:
        raise PeftuneError("give at least one run folder to compare")
    rows = []
    for path in paths:
        run = rundir.complete_run(path)
        rows.append(row_of(run.path, run.read_metrics()))
    return rows


def row_of(path: Path, metrics: Metrics) -> dict[str, Any]:
    """A run's comparison row: each column read from its metrics.json field of the same name, but for the
    run (its folder), the primary metric, the trainable share (in percent); then dtype, recipe hash and
    every eval metric as `eval_<name>`."""
    fields = metrics.to_json()
    row: dict[str, Any] = {key: fields.get(key) for key, _ in COLUMNS}
    row |= {
        "run": str(path),
        "metric_name": metrics.primary_metric.name,
        "metric": metrics.primary_metric.value,
        "trainable_share": _percent(metrics.trainable_share),
        "dtype": metrics.dtype,
        "recipe_sha256": metrics.recipe_sha256,
    }
    row |= {f"eval_{name}": value for name, value in metrics.eval.items()}
    return row


def sort_rows(rows: list[dict[str, Any]], key: str | None) -> list[dict[str, Any]]:
    """Sorted by a column, ascending; `-KEY` for descending. Missing values go last either way."""
    if not key:
        return rows
    descending = key.startswith("-")
    name = key.removeprefix("-")
    known = sorted({k for row in rows for k in row})
    if name not in known:
        raise PeftuneError(f"cannot sort by {name!r}; use one of: {', '.join(known)} (prefix - for descending)")
    present = [row for row in rows if row.get(name) is not None]
    missing = [row for row in rows if row.get(name) is None]
    return sorted(present, key=lambda row: row[name], reverse=descending) + missing


def best_first(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best primary metric first (lower first for losses and errors)."""
    names = {row["metric_name"] for row in rows}
    descending = not (names and names <= LOWER_IS_BETTER)
    return sort_rows(rows, ("-" if descending else "") + "metric")


def render(rows: list[dict[str, Any]], fmt: str = "table") -> str:
    if fmt not in FORMATS:
        raise PeftuneError(f"unknown format {fmt!r}; use one of: {', '.join(FORMATS)}")
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    if fmt == "csv":
        keys = list(dict.fromkeys(k for row in rows for k in row))
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()
    headings = [heading for _, heading in COLUMNS]
    cells = [[_cell(row.get(key), key) for key, _ in COLUMNS] for row in rows]
    if fmt == "markdown":
        lines = ["| " + " | ".join(headings) + " |", "|" + "---|" * len(headings)]
        return "\n".join([*lines, *("| " + " | ".join(c) + " |" for c in cells)]) + "\n"
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headings)]
    numeric = [key not in TEXT_COLUMNS for key, _ in COLUMNS]
    lines = [
        "  ".join(t.rjust(w) if right else t.ljust(w) for t, w, right in zip(line, widths, numeric, strict=True))
        for line in [headings, *cells]
    ]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def plot(rows: list[dict[str, Any]], histories: list[list[dict[str, Any]]], path: str | Path) -> Path:
    """One PNG: the eval curves of every run, and the metric against trainable parameters, time and memory."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    target = Path(path)
    if target.suffix.lower() != ".png":
        raise PeftuneError(f"--plot writes a PNG: give a file name ending in .png, not {target.name}")
    metric = rows[0]["metric_name"] if rows else "metric"
    figure, axes = plt.subplots(2, 2, figsize=(12, 9))
    curves, by_params, by_time, by_memory = axes.flat
    for row, history in zip(rows, histories, strict=True):
        label = _label(row)
        points = [(h.get("epoch") or h["step"], h.get(row["metric_name"])) for h in history]
        points = [(x, y) for x, y in points if y is not None]
        if points:
            curves.plot(*zip(*points, strict=True), marker="o", label=label)
        for axis, key in ((by_params, "trainable_parameters"), (by_time, "train_runtime_s"),
                          (by_memory, "peak_memory_mb")):  # fmt: skip
            if row.get(key) is not None and row.get("metric") is not None:
                axis.scatter(row[key], row["metric"], s=40)
                axis.annotate(label, (row[key], row["metric"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    curves.set(title=f"eval {metric} during training", xlabel="epoch", ylabel=metric)
    if any(h for h in histories):
        curves.legend(fontsize=8)
    by_params.set(title=f"{metric} against trainable parameters", xlabel="trainable parameters (log)", ylabel=metric)
    by_params.set_xscale("log")
    by_time.set(title=f"{metric} against train time", xlabel="train time (s)", ylabel=metric)
    by_memory.set(title=f"{metric} against peak memory", xlabel="peak memory (MB)", ylabel=metric)
    for axis in axes.flat:
        axis.grid(alpha=0.3)
    figure.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=100)
    plt.close(figure)
    return target


def compare_runs(
    paths: Sequence[str | Path], fmt: str = "table", sort: str | None = None, plot_file: str | Path | None = None
) -> str:
    """The comparison of run folders in a format (and a chart when asked); what `peftune compare` prints."""
    if fmt not in FORMATS:
        raise PeftuneError(f"unknown format {fmt!r}; use one of: {', '.join(FORMATS)}")
    rows = sort_rows(collect(paths), sort)
    if plot_file:
        histories = [rundir.complete_run(row["run"]).read_metrics().eval_history for row in rows]
        plot(rows, histories, plot_file)
    return render(rows, fmt)


def _label(row: dict[str, Any]) -> str:
    return Path(row["run"]).name


def _percent(share: float | None) -> float | None:
    return None if share is None else round(100 * share, 4)


def _cell(value: Any, key: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key == "trainable_parameters":
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if key == "metric":
            return f"{value:.4f}"
        if key == "trainable_share":  # three significant digits: 100, 1.26, 0.0412
            return f"{value:.3g}"
        return f"{value:,.1f}"
    return str(value)
