"""Predict: labels and scores for new text, from a run folder, a merged or exported folder, or a Hub id."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from peftune.data import Labels, read_table
from peftune.errors import PeftuneError
from peftune.inference import LoadedModel, batched_logits, load_target
from peftune.metrics import sigmoid
from peftune.recipe import Recipe, load_recipe
from peftune.rundir import RECIPE_FILE, staged

log = logging.getLogger(__name__)

OUTPUT_FORMATS = (".csv", ".tsv", ".jsonl")


def to_predictions(logits: np.ndarray, labels: Labels, probabilities: bool = False) -> list[dict[str, Any]]:
    """One record per row: the label and its probability, or the score for regression; multi-label, every label
    whose score reaches its threshold, with those scores (best first)."""
    if labels.names is None:
        return [{"score": float(value)} for value in logits.reshape(-1)]
    if labels.multi_label:
        scores = sigmoid(logits)
        records = []
        for row, chosen in zip(scores, labels.decide(scores), strict=True):
            picked = sorted(np.flatnonzero(chosen), key=lambda i: -row[i])
            found: dict[str, Any] = {"labels": [labels.names[i] for i in picked],
                                     "scores": [float(row[i]) for i in picked]}  # fmt: skip
            if probabilities:
                found["probabilities"] = {name: float(p) for name, p in zip(labels.names, row, strict=True)}
            records.append(found)
        return records
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs = shifted / shifted.sum(axis=-1, keepdims=True)
    records = []
    for row in probs:
        best = int(row.argmax())
        record: dict[str, Any] = {"label": labels.names[best], "score": float(row[best])}
        if probabilities:
            record["probabilities"] = {name: float(p) for name, p in zip(labels.names, row, strict=True)}
        records.append(record)
    return records


def predict_texts(
    target: str | Path | LoadedModel,
    texts: Sequence[str],
    pairs: Sequence[str] | None = None,
    batch_size: int = 64,
    probabilities: bool = False,
) -> list[dict[str, Any]]:
    """Predict labels for texts (and their pair sentences, for a pair model)."""
    loaded = target if isinstance(target, LoadedModel) else load_target(target)
    _check_pairs(loaded, pairs is not None)
    if pairs is not None and len(pairs) != len(texts):
        raise PeftuneError(f"got {len(texts)} texts but {len(pairs)} pair texts; give one --pair per --text")
    logits = batched_logits(loaded, texts, pairs, batch_size, say_cut=True)
    return [
        {"text": text, **({"pair": pairs[i]} if pairs is not None else {}), **record}
        for i, (text, record) in enumerate(
            zip(texts, to_predictions(logits, loaded.labels, probabilities), strict=True)
        )
    ]


def predict_file(
    target: str | Path,
    input_path: str | Path,
    output_path: str | Path,
    text_columns: Sequence[str] = (),
    batch_size: int = 64,
    probabilities: bool = False,
) -> int:
    """Predict every row of a CSV/TSV/JSONL/parquet file; write its columns plus label and score. Returns rows."""
    output = Path(output_path)
    if output.suffix not in OUTPUT_FORMATS:
        raise PeftuneError(f"cannot write {output}: the output must end in {', '.join(OUTPUT_FORMATS)}")
    if output.resolve() == Path(input_path).resolve():
        raise PeftuneError(f"{output} is also the input file; write the predictions to another file")
    # The file and its columns first: loading the model takes seconds, reading the file's header does not.
    table = read_table(input_path)
    known = _local_recipe(target)
    columns = list(text_columns) or (known.data.text_columns if known else [])
    _check_columns(table, columns, input_path)
    loaded = load_target(target)
    if not columns:  # a Hub target: its recipe, if any, came with it
        columns = loaded.recipe.data.text_columns if loaded.recipe else ["text"]
        _check_columns(table, columns, input_path)
    _check_pairs(loaded, len(columns) == 2)
    texts = [_text(value, columns[0], i) for i, value in enumerate(table[columns[0]])]
    pairs = [_text(value, columns[1], i) for i, value in enumerate(table[columns[1]])] if len(columns) == 2 else None
    logits = batched_logits(loaded, texts, pairs, batch_size, progress=True, say_cut=True)
    records = to_predictions(logits, loaded.labels, probabilities)
    with staged(output, replace=True) as partial:
        _write(partial, output.suffix, table.to_list(), records)
    return len(records)


def _local_recipe(target: str | Path) -> Recipe | None:
    """The recipe kept in a local run or model folder, read without loading the model; None elsewhere."""
    recipe_file = Path(target).expanduser() / RECIPE_FILE
    return load_recipe(str(recipe_file)) if recipe_file.is_file() else None


def _check_columns(table: Any, columns: Sequence[str], input_path: str | Path) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise PeftuneError(
            f"{input_path} has no column {missing[0]!r} (columns: {', '.join(table.column_names)}); "
            "name the text columns with --text-column"
        )


def _write(path: Path, suffix: str, rows: list[dict], records: list[dict]) -> None:
    if suffix == ".jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for row, record in zip(rows, records, strict=True):
                f.write(json.dumps({**row, **record}, ensure_ascii=False, default=str) + "\n")
        return
    flat = []
    for row, record in zip(rows, records, strict=True):
        probs = record.pop("probabilities", None)
        if "labels" in record:  # multi-label in one cell each: names and scores joined by "|", in the same order
            record = {"labels": "|".join(record["labels"]), "scores": "|".join(f"{v:.6f}" for v in record["scores"])}
        flat.append({**row, **record, **({f"p_{k}": v for k, v in probs.items()} if probs else {})})
    delimiter = "\t" if suffix == ".tsv" else ","
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(flat[0]) if flat else ["label", "score"], delimiter=delimiter)
        writer.writeheader()
        writer.writerows(flat)


def _check_pairs(loaded: LoadedModel, has_pairs: bool) -> None:
    if loaded.recipe is None:
        return
    wants_pairs = len(loaded.recipe.data.text_columns) == 2
    if wants_pairs and not has_pairs:
        raise PeftuneError(
            "this model was trained on sentence pairs "
            f"({' + '.join(loaded.recipe.data.text_columns)}); give --pair with each --text, or two text columns"
        )
    if has_pairs and not wants_pairs:
        raise PeftuneError("this model was trained on single sentences; give --text without --pair, or one column")


def _text(value: Any, column: str, row: int) -> str:
    if not isinstance(value, str):
        raise PeftuneError(f"row {row + 1} has no text in column {column!r} ({value!r}); fix or remove that row")
    return value
