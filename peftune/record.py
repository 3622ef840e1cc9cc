"""The typed records of run, merged and exported folders: `metrics.json` (what `train` writes when a run
completes, and what every later command reads), `merge.json` and `export.json`.

`Metrics.from_json` also reads the records of earlier peftune versions (a key they lack takes its default;
`load_in_8bit` becomes `quantization`); `to_json` writes the keys in the order of the fields below.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(kw_only=True)
class Primary:
    """The run's primary metric: its name, its value, and the epoch the kept weights come from."""

    name: str
    value: float | None
    epoch: float | None = None


@dataclass(kw_only=True)
class Metrics:
    """What the run is, how well it did, what it cost, and with what software."""

    name: str
    method: str
    base_model: str  # as the recipe names it: a Hub id, a pkg:// path or a folder
    base_model_path: str | None = None  # the folder it was read from on the training machine (None: a Hub id)
    problem_type: str | None = None
    num_labels: int | None = None
    primary_metric: Primary
    eval: dict[str, Any]  # the final evaluation, metric name -> value (and the eval loss)
    eval_history: list[dict[str, Any]] = field(default_factory=list)  # each evaluation during training
    trainable_parameters: int
    total_parameters: int
    trainable_share: float
    fresh_modules: list[str] = field(default_factory=list)  # new in the model, trained in full
    learning_rate: float | None = None
    class_weights: list[float] | None = None  # train.class_weights, one per label; None: unweighted loss
    batch_tokens: int | None = None  # the training batches' token budget (train.batch_tokens); None: a count of texts
    thresholds: dict[str, float] | None = None  # multi-label: each label's threshold on its sigmoid score
    thresholds_tuned_on: str | None = None  # the split data.thresholds=tune chose them on (None: as the recipe set)
    train_samples: int  # texts (with data.long_text=chunk, the windows are train_windows)
    eval_samples: int
    train_windows: int | None = None
    eval_windows: int | None = None
    global_steps: int | None = None
    world_size: int | None = None
    resumed_from_step: int | None = None
    fit: dict[str, Any] | None = None  # what `train --fit` chose
    tokenize_s: float | None = None
    train_runtime_s: float
    eval_during_training_s: float | None = None
    train_samples_per_second: float | None = None  # rows (windows when chunked); the evaluations left out
    train_tokens_per_second: float | None = None  # non-padding tokens
    train_loss: float | None = None
    peak_memory_mb: float | None = None
    peak_memory_kind: str | None = None  # cuda_max_allocated, or process_max_rss on a CPU
    model_memory_mb: float | None = None  # the loaded model's parameters and buffers
    weights_mb: float | None = None  # the saved adapter or model on disk
    standalone_model_mb: float | None = None  # a standalone model of this run (an adapter merged into its base)
    quantization: str = "none"  # the base's linear layers in training: none, 8bit or 4bit
    device: str | None = None
    dtype: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    recipe_sha256: str | None = None
    finished_at: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Metrics:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        values["primary_metric"] = Primary(**data["primary_metric"])
        if "quantization" not in data:  # before 0.2
            values["quantization"] = "8bit" if data.get("load_in_8bit") else "none"
        return cls(**values)


def _without_nones(data: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in data.items() if value is not None}


@dataclass(kw_only=True)
class MergeCheck:
    """A merged model's logits against the adapter model's on the run's kept eval rows, judged by a tolerance."""

    samples: int
    max_abs_logit_difference: float
    label_agreement: float | None = None  # share of rows given the same label (classification only)
    tolerance: dict[str, float]  # the measure judged and its bound: the logits when exact, else the labels
    passed: bool

    def to_json(self) -> dict[str, Any]:
        return _without_nones(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MergeCheck:
        return cls(**data)


@dataclass(kw_only=True)
class OnnxCheck:
    """An ONNX graph under onnxruntime against PyTorch on the same texts."""

    runtime: str
    samples: int
    max_abs_logit_difference: float
    tolerance: float


@dataclass(kw_only=True)
class MergeRecord:
    """merge.json, in a merged folder: where the model came from and how closely it matches the adapter."""

    source_run: str
    method: str
    base_model: str
    trained_on: str  # the base's weights in training: none, 8bit or 4bit
    dtype: str
    check: MergeCheck
    merged_at: str

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "check": self.check.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MergeRecord:
        return cls(**{**data, "check": MergeCheck.from_json(data["check"])})


@dataclass(kw_only=True)
class ExportRecord:
    """export.json, in an exported folder: what was exported, how, and the checks it passed."""

    source: str  # the folder exported, or the Hub id
    format: str
    dtype: str
    check: OnnxCheck | None  # ONNX: onnxruntime against PyTorch
    merge_check: MergeCheck | None  # an adapter run merged on the way: against the adapter model, as `merge`
    exported_at: str

    def to_json(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "check": dataclasses.asdict(self.check) if self.check else {},  # {}: no check (safetensors)
            "merge_check": self.merge_check.to_json() if self.merge_check else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExportRecord:
        merge_check = data.get("merge_check")
        return cls(**{
            **data,
            "check": OnnxCheck(**data["check"]) if data.get("check") else None,
            "merge_check": MergeCheck.from_json(merge_check) if merge_check else None,
        })  # fmt: skip
