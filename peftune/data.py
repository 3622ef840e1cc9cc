"""Data: load local files or Hub datasets, map labels, tokenize single sentences and pairs."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from peftune.errors import PeftuneError, first_line
from peftune.recipe import DataSpec, local_path

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger(__name__)

# Loader and default options by file extension (after dropping a compression suffix such as .gz).
FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    # Tab-separated files have no quoting convention: a bare `"` in the text is just a character.
    ".tsv": ("csv", {"delimiter": "\t", "quoting": 3, "keep_default_na": False}),
    # keep_default_na=False: a sentence that reads "NA" or "null" stays text.
    ".csv": ("csv", {"keep_default_na": False}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}
COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".zip")


# Labels.problem_type -> the `problem_type` of a transformers config (it picks the loss and pipeline's scores).
HF_PROBLEM_TYPES = {
    "classification": "single_label_classification",
    "multi_label": "multi_label_classification",
    "regression": "regression",
}


@dataclass(frozen=True)
class Labels:
    """The label space: class names in id order, or none for regression.

    Multi-label: any number of the names per example (a multi-hot target), each predicted when its sigmoid
    score reaches its threshold.
    """

    names: tuple[str, ...] | None
    # For classification data whose labels are not the names themselves: raw value -> class id.
    values: dict[str, int] | None = None
    multi_label: bool = False
    separator: str | None = None  # multi-label labels given as one string: where it splits
    thresholds: tuple[float, ...] | None = None  # multi-label: one per name

    @property
    def problem_type(self) -> str:
        if self.names is None:
            return "regression"
        return "multi_label" if self.multi_label else "classification"

    @property
    def num_labels(self) -> int:
        return 1 if self.names is None else len(self.names)

    @property
    def id2label(self) -> dict[int, str]:
        return {0: "score"} if self.names is None else dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in self.id2label.items()}

    def encode(self, value: Any) -> int | float | list[float]:
        """The model's training target for one raw label value (multi-label: one 0/1 per name)."""
        if self.names is None:
            return float(value)
        if self.multi_label:
            hot = [0.0] * len(self.names)
            for name in self.split(value):
                if name not in self.names:
                    raise ValueError(f"{name!r} is not one of {list(self.names)}")
                hot[self.names.index(name)] = 1.0
            return hot
        key = _label_key(value)
        return self.values[key] if self.values is not None else self.names.index(key)

    def split(self, value: Any) -> list[str]:
        """A multi-label row's label names: a list as it is, a string split at the separator."""
        if value is None:
            return []
        if isinstance(value, str):
            parts = value.split(self.separator) if self.separator else [value]
            return [part.strip() for part in parts if part.strip()]
        return [_label_key(item) for item in value]

    def decide_thresholds(self) -> tuple[float, ...]:
        """Multi-label: each label's threshold on its sigmoid score (0.5 where none was saved)."""
        return self.thresholds or (0.5,) * self.num_labels

    def decide(self, scores: Any) -> Any:
        """Multi-label: which labels each row of sigmoid scores predicts (its score reaches the label's threshold)."""
        return np.asarray(scores) >= np.asarray(self.decide_thresholds())

    def to_json(self) -> dict[str, Any]:
        saved: dict[str, Any] = {
            "problem_type": self.problem_type,
            "id2label": {str(i): name for i, name in self.id2label.items()},
            "label2id": self.label2id,
            "values": self.values,
        }
        if self.multi_label:
            saved.update(separator=self.separator, thresholds=list(self.decide_thresholds()))
        return saved

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Labels:
        if data["problem_type"] == "regression":
            return cls(names=None)
        names = tuple(data["id2label"][str(i)] for i in range(len(data["id2label"])))
        if data["problem_type"] == "multi_label":
            thresholds = data.get("thresholds")
            return cls(names=names, multi_label=True, separator=data.get("separator"),
                       thresholds=tuple(thresholds) if thresholds else None)  # fmt: skip
        return cls(names=names, values=data.get("values"))

    @classmethod
    def read(cls, path: Path) -> Labels:
        return cls.from_json(json.loads(path.read_text(encoding="utf-8")))


def load_splits(spec: DataSpec, seed: int, carve: bool = True) -> tuple[Dataset, Dataset]:
    """Load the train and eval splits, carving a seeded eval split out of train when there is none.

    `carve=False` (a split the user named) makes a missing eval split an error instead.
    """
    splits = _load(spec)
    if not carve and spec.eval_split not in splits:
        raise PeftuneError(f"data has no split {spec.eval_split!r} (it has: {', '.join(splits)}); choose one of those")
    if spec.train_split not in splits:
        raise PeftuneError(
            f"data has no split {spec.train_split!r} (it has: {', '.join(splits)}); set data.train_split"
        )
    train = splits[spec.train_split]
    if spec.eval_split in splits:
        evaluation = splits[spec.eval_split]
    else:
        log.warning(
            "data has no %r split (it has: %s): holding out %.0f%% of %r as the eval split (seed %d)",
            spec.eval_split, ", ".join(splits), spec.validation_size * 100, spec.train_split, seed,
        )  # fmt: skip
        held_out = train.train_test_split(test_size=spec.validation_size, seed=seed)
        train, evaluation = held_out["train"], held_out["test"]
    _check_split(spec, "train", train)
    _check_split(spec, "eval", evaluation)
    train = _subsample(train, spec.max_train_samples, seed)
    evaluation = _subsample(evaluation, spec.max_eval_samples, seed)
    return train, evaluation


def infer_labels(spec: DataSpec, train: Dataset, evaluation: Dataset) -> Labels:
    """The label space from the recipe (`data.labels`, `data.problem_type`) and the data itself."""
    from datasets import ClassLabel, List, Sequence, Value

    feature = train.features[spec.label_column]
    is_float = isinstance(feature, Value) and feature.dtype.startswith("float")
    is_list = isinstance(feature, (List, Sequence))
    problem_type = spec.problem_type or (
        "multi_label" if is_list else "regression" if is_float and spec.labels is None else "classification"
    )
    if problem_type == "multi_label":
        return _multi_labels(spec, feature, train, evaluation)
    for key, value, default in (("thresholds", spec.thresholds, 0.5), ("label_separator", spec.label_separator, None)):
        if value != default:
            raise PeftuneError(f"data.{key} applies to multi-label data, and this is {problem_type}; drop it, or set "
                               "data.problem_type: multi_label")  # fmt: skip
    if is_list:
        raise PeftuneError(
            f"column {spec.label_column!r} holds a list of labels per row; set data.problem_type: multi_label"
        )
    if problem_type == "regression":
        if not (isinstance(feature, Value) and (is_float or feature.dtype.startswith("int"))):
            raise PeftuneError(
                f"regression needs numeric labels, but column {spec.label_column!r} holds {feature}; "
                "set data.problem_type: classification"
            )
        return Labels(names=None)

    if isinstance(feature, ClassLabel):
        names = tuple(spec.labels or feature.names)
        if len(names) != feature.num_classes:
            raise PeftuneError(
                f"data.labels names {len(names)} classes but the dataset has {feature.num_classes}; fix data.labels"
            )
        return Labels(names=names, values={str(i): i for i in range(len(names))})

    seen = {value for split in (train, evaluation) for value in split.unique(spec.label_column)}
    if any(isinstance(value, float) and not value.is_integer() for value in seen):
        raise PeftuneError(f"column {spec.label_column!r} holds fractional numbers; set data.problem_type: regression")
    seen_keys = {_label_key(value) for value in seen}
    numeric = all(isinstance(value, (int, float)) for value in seen)
    if spec.labels is not None:
        names = tuple(spec.labels)
        if numeric and seen_keys - set(names):
            # Integer labels index into data.labels.
            bad = sorted(int(k) for k in seen_keys if not k.isdigit() or int(k) >= len(names))
            if bad:
                raise PeftuneError(
                    f"label {bad[0]} in column {spec.label_column!r} is not an index into data.labels "
                    f"({len(names)} names); add names to data.labels or fix the data"
                )
            return Labels(names=names, values={str(i): i for i in range(len(names))})
        unknown = sorted(seen_keys - set(names))
        if unknown:
            raise PeftuneError(
                f"label {unknown[0]!r} in column {spec.label_column!r} is not in data.labels {list(names)}; "
                "add it to data.labels or fix the data"
            )
        return Labels(names=names)
    if numeric:
        ordered = sorted(seen_keys, key=int)
        if ordered == [str(i) for i in range(len(ordered))]:
            return Labels(names=tuple(ordered))
        return Labels(names=tuple(ordered), values={key: i for i, key in enumerate(ordered)})
    return Labels(names=tuple(sorted(seen_keys)))


def _multi_labels(spec: DataSpec, feature: Any, train: Dataset, evaluation: Dataset) -> Labels:
    """Multi-label: the names in the label lists (or separated strings) of both splits, or data.labels."""
    from datasets import List, Sequence, Value

    is_text = isinstance(feature, Value) and feature.dtype in ("string", "large_string")
    if not isinstance(feature, (List, Sequence)) and not is_text:
        raise PeftuneError(
            f"multi_label needs a list of label names per row (JSON/JSONL) or one string of names, but column "
            f"{spec.label_column!r} holds {feature}; fix the data or data.problem_type"
        )
    if is_text and spec.label_separator is None:
        raise PeftuneError(
            f"column {spec.label_column!r} holds one string per row: set data.label_separator to the character "
            "between its label names (for example '|')"
        )
    reader = Labels(names=(), multi_label=True, separator=spec.label_separator)
    seen = {name for split in (train, evaluation) for row in split[spec.label_column] for name in reader.split(row)}
    if spec.labels is None:
        if not seen:
            raise PeftuneError(f"column {spec.label_column!r} names no label in any row; check the data")
        names = tuple(sorted(seen))
    else:
        names = tuple(spec.labels)
        unknown = sorted(seen - set(names))
        if unknown:
            raise PeftuneError(
                f"label {unknown[0]!r} in column {spec.label_column!r} is not in data.labels {list(names)}; "
                "add it to data.labels or fix the data"
            )
    thresholds = spec.thresholds
    if isinstance(thresholds, list) and len(thresholds) != len(names):
        raise PeftuneError(
            f"data.thresholds has {len(thresholds)} values but the data has {len(names)} labels "
            f"({', '.join(names)}); give one per label in that order, one number for all, or tune"
        )
    per_label = tuple(thresholds) if isinstance(thresholds, list) else (
        (0.5 if thresholds == "tune" else float(thresholds)),) * len(names)  # fmt: skip
    return Labels(names=names, multi_label=True, separator=spec.label_separator, thresholds=per_label)


def encode_texts(
    tokenizer: Any, texts: Sequence[str], pairs: Sequence[str] | None, max_length: int, stride: int | None = None
) -> tuple[Any, list[int]]:
    """Tokenizer output for texts (and their pairs), with the text each row comes from.

    Without a stride, one row per text, cut to `max_length` tokens. With one (`data.long_text=chunk`), each
    text's windows of `max_length` tokens, consecutive windows sharing `stride` tokens, as many as it takes.
    """
    if stride is None:
        encoded = tokenizer(list(texts), list(pairs) if pairs is not None else None, truncation=True,
                            max_length=max_length)  # fmt: skip
        return encoded, list(range(len(texts)))
    room = max_length - tokenizer.num_special_tokens_to_add(pair=False)
    if stride >= room:
        raise PeftuneError(
            f"data.stride ({stride}) leaves no new tokens in a window of {max_length} tokens ({room} of them text); "
            f"set data.stride below {room}, for example {max_length // 4}"
        )
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length, stride=stride,
                        return_overflowing_tokens=True)  # fmt: skip
    return encoded, list(encoded.pop("overflow_to_sample_mapping"))


def pool_windows(
    logits: np.ndarray, documents: Sequence[int] | np.ndarray, count: int, how: str = "mean"
) -> np.ndarray:
    """One row of logits per text from its windows' rows (`documents[i]`: the text row i belongs to)."""
    logits = np.asarray(logits, dtype=np.float32)
    index = np.asarray(documents, dtype=np.int64)
    if how == "max":
        pooled = np.full((count, logits.shape[-1]), -np.inf, dtype=np.float32)
        np.maximum.at(pooled, index, logits)
        return pooled
    pooled = np.zeros((count, logits.shape[-1]), dtype=np.float32)
    np.add.at(pooled, index, logits)
    return pooled / np.bincount(index, minlength=count).clip(min=1)[:, None]


def tokenize(split: Dataset, tokenizer: Any, spec: DataSpec, labels: Labels, split_name: str) -> Dataset:
    """Tokenize one split with `datasets.map` (batched, cached); padding is left to the collator.

    Texts longer than `data.max_length` are cut to it (how many were is logged as a warning, not left silent),
    or with `data.long_text=chunk` split into windows that each carry the text's label; then the column
    `DOCUMENT` says which row of `split` each window comes from.
    """
    columns = spec.text_columns
    stride = spec.window_stride

    def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        for column in columns:
            for text in batch[column]:
                if not isinstance(text, str):
                    raise PeftuneError(
                        f"split {split_name!r} has a row whose {column!r} is {text!r}, not text; "
                        "remove or fix such rows in the data"
                    )
        pairs = batch[columns[1]] if len(columns) == 2 else None
        encoded, rows = encode_texts(tokenizer, batch[columns[0]], pairs, spec.max_length, stride)
        try:
            targets = [labels.encode(value) for value in batch[spec.label_column]]
        except ValueError as err:
            raise PeftuneError(
                f"split {split_name!r} has a label the model does not know ({err}); fix the data"
            ) from None
        encoded["labels"] = [targets[row] for row in rows]
        encoded[DOCUMENT] = [indices[row] for row in rows]
        if stride is None:
            encoded[_CUT] = were_cut(encoded, spec.max_length)
        return encoded

    tokenized = split.map(encode, batched=True, with_indices=True, remove_columns=split.column_names,
                          desc=f"Tokenizing {split_name}")  # fmt: skip
    if stride is None:
        whole = "" if len(columns) == 2 else ", or read them whole with data.long_text=chunk"  # pairs cannot be chunked
        say_cut(sum(tokenized[_CUT]), len(tokenized), f"{split_name} texts", spec.max_length,
                f"raise data.max_length{whole}")  # fmt: skip
        return tokenized.remove_columns([_CUT, DOCUMENT])
    log.info("%s: %d texts in %d windows of up to %d tokens (%d shared)", split_name, len(split), len(tokenized),
             spec.max_length, stride)  # fmt: skip
    return tokenized


_CUT = "peftune_cut"  # a column while tokenizing: whether truncation cut the row
DOCUMENT = "peftune_document"  # a column of chunked splits: the text (row of the split) a window comes from


def were_cut(encoded: Any, max_length: int) -> list[bool]:
    """Whether truncation cut each row of a tokenizer's output: tokens left over (fast tokenizers say so), else
    a row that fills `max_length` (a slow tokenizer keeps no overflow; a text of exactly that length counts)."""
    encodings = getattr(encoded, "encodings", None)
    if encodings:
        return [bool(e.overflowing) for e in encodings]
    return [len(ids) >= max_length for ids in encoded["input_ids"]]


def say_cut(
    cut: int,
    total: int,
    what: str,
    max_length: int,
    hint: str = "raise data.max_length",
) -> None:
    """One warning line when texts were longer than the model reads: they were classified by their start only."""
    if cut:
        log.warning("%d of %d %s are longer than %d tokens and were cut to their first %d; %s",
                    cut, total, what, max_length, max_length, hint)  # fmt: skip


def read_table(path: str | Path) -> Dataset:
    """One local file as a table, its format taken from the extension as for `data.files`."""
    import datasets

    file = str(path)
    if not os.path.isfile(file):
        raise PeftuneError(f"input file not found: {file}; check the path")
    loader, defaults = _format_of({"input": [file]})
    try:
        return datasets.load_dataset(loader, data_files={"input": [file]}, split="input", **defaults)
    except Exception as err:  # datasets raises many types for unreadable files
        undecodable = _cause(err, UnicodeDecodeError)
        if undecodable is not None:
            raise PeftuneError(f"{file} is not UTF-8 text ({undecodable}); re-save it as UTF-8") from None
        raise PeftuneError(f"cannot read {file}: {first_line(err)}; check the file") from None


def _cause(err: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of `kind` in the chain that led to `err` (datasets wraps the reader's errors)."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _load(spec: DataSpec) -> Any:
    import datasets

    options = dict(spec.options)
    data_files = None
    path = spec.source
    if spec.files:
        data_files = {}
        for split, value in spec.files.items():
            paths = [value] if isinstance(value, str) else value
            data_files[split] = [local_path(p, f"data.files.{split}") for p in paths]
            for file in data_files[split]:
                if "://" not in file and not os.path.exists(file):
                    raise PeftuneError(f"data file not found: {file} (data.files.{split}); fix the path")
        loader, defaults = _format_of(data_files)
        if path is None or path == loader:
            path = loader
            options = {**defaults, **options}
    assert path is not None
    try:
        return datasets.load_dataset(path, spec.config, data_files=data_files, **options)
    except PeftuneError:
        raise
    except Exception as err:  # datasets raises many types: missing Hub access, parse errors, bad options
        empty = re.search(r'Instruction "([^"]+)" corresponds to no data', str(err))
        if empty:
            raise PeftuneError(f"split {empty.group(1)!r} is empty; check its data files") from None
        undecodable = _cause(err, UnicodeDecodeError)
        if undecodable is not None:
            raise PeftuneError(
                f"a data file is not UTF-8 text ({undecodable}); re-save it as UTF-8, or name its encoding "
                "with data.options.encoding (for example latin-1)"
            ) from None
        where = f"{path!r}" + (f" (config {spec.config!r})" if spec.config else "")
        message = first_line(err)
        hint = "set data.files to local files" if spec.files is None else "check data.files and data.options"
        raise PeftuneError(f"could not load dataset {where}: {message}; {hint}") from None


def _format_of(data_files: dict[str, list[str]]) -> tuple[str, dict[str, Any]]:
    formats = set()
    for paths in data_files.values():
        for file in paths:
            name = file.lower()
            for suffix in COMPRESSION:
                name = name.removesuffix(suffix)
            extension = os.path.splitext(name)[1]
            if extension not in FORMATS:
                raise PeftuneError(
                    f"cannot tell the format of {file}: use one of {', '.join(FORMATS)} "
                    "(optionally .gz), or set data.source to a datasets loader name"
                )
            formats.add(extension)
    loaders = {FORMATS[ext][0] for ext in formats}
    if len(loaders) > 1:
        raise PeftuneError(f"data.files mixes formats ({', '.join(sorted(formats))}); use one format for all splits")
    extension = sorted(formats)[0]
    return FORMATS[extension]


def _check_split(spec: DataSpec, role: str, split: Dataset) -> None:
    name = spec.train_split if role == "train" else spec.eval_split
    if len(split) == 0:
        raise PeftuneError(f"split {name!r} is empty; check the data files or data.{role}_split")
    missing = [c for c in (*spec.text_columns, spec.label_column) if c not in split.column_names]
    if missing:
        key = "data.label_column" if missing[0] == spec.label_column else "data.text_columns"
        raise PeftuneError(
            f"split {name!r} has no column {missing[0]!r} (columns: {', '.join(split.column_names)}); set {key}"
        )


def _subsample(split: Dataset, limit: int | None, seed: int) -> Dataset:
    if limit is None or limit >= len(split):
        return split
    return split.shuffle(seed=seed).select(range(limit))


def _label_key(value: Any) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
