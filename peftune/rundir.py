"""The run folder: the one module that knows its file names.

A run folder describes itself: every later command needs nothing but the folder. `metrics.json` is
written last, under a temporary name and then renamed, so its presence marks a complete run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftune.errors import PeftuneError
from peftune.record import Metrics

RECIPE_FILE = "recipe.yaml"  # the fully resolved recipe
LABELS_FILE = "labels.json"  # id2label / label2id and the problem type
METRICS_FILE = "metrics.json"  # eval metrics, parameters, time, memory, versions; written last
ADAPTER_DIR = "adapter"  # adapter methods: peft adapter with the classifier head, and the tokenizer
ADAPTER_CONFIG = "adapter_config.json"  # in the adapter folder: peft's config, the base named portably
CARD_FILE = "README.md"  # in the adapter folder, a merged folder and a Hub upload: the model card
MODEL_DIR = "model"  # full fine-tuning: a standalone transformers model folder, and the tokenizer
CHECKPOINTS_DIR = "checkpoints"  # Trainer checkpoints
SAMPLES_FILE = "eval_samples.jsonl"  # eval rows kept so merge and export can check their output offline
MERGED_DIR = "merged"  # `peftune merge`: a standalone model folder
MERGE_FILE = "merge.json"  # in a merged folder: where it came from and how closely it matches the adapter
EXPORT_FILE = "export.json"  # in an exported folder: format, dtype and the check against PyTorch
ONNX_FILE = "model.onnx"  # in an ONNX export: the graph, which `predict` and `eval` run under onnxruntime
MODEL_CONFIG = "config.json"  # transformers' config: marks a standalone model folder (merged, exported, full)
HUB_UPLOAD_DIR = "hub-upload"  # `push --dry-run`: the folder the Hub would receive (-merged with --merged)
CHECKPOINT_PREFIX = "checkpoint-"  # Trainer's checkpoint folders in checkpoints/, one per saved step
ELAPSED_FILE = "peftune_elapsed.json"  # in each checkpoint: training seconds up to it, for resumed runs
TRAINER_STATE = "trainer_state.json"  # in each checkpoint, written last by Trainer: the checkpoint is complete
TRAINING_ARGS = "training_args.bin"  # what Trainer saves beside the weights: a pickle, removed from the run folder
RUNS_DIR = Path("runs")  # where runs (and sweeps) go by default, under the current folder
# A sweep folder: its runs, their report, comparison tables and plot, the grid it ran and the runs' logs.
SWEEP_REPORT_FILE = "report.md"
SWEEP_PLOT_FILE = "comparison.png"
SWEEP_TABLE_FILES = ("comparison.csv", "comparison.json")
SWEEP_FILE = "sweep.json"
SWEEP_LOGS_DIR = "logs"


def eval_file(split: str) -> str:
    """`peftune eval`'s record, written into the folder it scored."""
    return f"eval-{split}.json"


def export_dir(fmt: str) -> str:
    """`peftune export`'s folder inside the run (or merged folder) it exported."""
    return f"export-{fmt}"


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run folder."""

    path: Path

    @property
    def recipe_file(self) -> Path:
        return self.path / RECIPE_FILE

    @property
    def labels_file(self) -> Path:
        return self.path / LABELS_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def adapter_dir(self) -> Path:
        return self.path / ADAPTER_DIR

    @property
    def model_dir(self) -> Path:
        return self.path / MODEL_DIR

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    def weights_dir(self, is_adapter: bool) -> Path:
        """Where the trained weights live for an adapter or a full run.

        A run pushed to the Hub keeps them at the top of the repository, where peft and transformers look.
        """
        folder = self.adapter_dir if is_adapter else self.model_dir
        marker = self.path / (ADAPTER_CONFIG if is_adapter else MODEL_CONFIG)
        return self.path if not folder.is_dir() and marker.is_file() else folder

    @property
    def samples_file(self) -> Path:
        return self.path / SAMPLES_FILE

    @property
    def merged_dir(self) -> Path:
        return self.path / MERGED_DIR

    def read_samples(self) -> list[dict[str, Any]]:
        """The eval rows kept at training time (text columns and label)."""
        lines = self.samples_file.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def is_complete(self) -> bool:
        """True once training finished and every file was written."""
        return self.metrics_file.is_file()

    def write_text(self, name: str, text: str) -> Path:
        """Write a file atomically: a reader sees the old file or the whole new one, never a part."""
        with staged(self.path / name, replace=True) as partial:
            partial.write_text(text, encoding="utf-8")
        return self.path / name

    def write_json(self, name: str, data: Any) -> Path:
        return self.write_text(name, json.dumps(data, indent=2, sort_keys=False) + "\n")

    def read_metrics(self) -> Metrics:
        return Metrics.from_json(json.loads(self.metrics_file.read_text(encoding="utf-8")))


RECORDS = (RECIPE_FILE, LABELS_FILE, SAMPLES_FILE)  # what a merged or exported folder keeps of its run


def copy_records(source: Path, folder: Path, names: tuple[str, ...] = RECORDS) -> None:
    """Copy the run's records that exist in `source` (a run, merged or exported folder) into `folder`."""
    for name in names:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)


@contextlib.contextmanager
def staged(target: Path, replace: bool = False) -> Iterator[Path]:
    """Write a file or folder as `TARGET.partial`, renamed to `target` only when the block ends without error.

    A reader never sees a half-written target, and a failure leaves nothing behind (the partial is removed).
    `replace` lets it take the place of an existing target; otherwise an existing target is an error.
    """
    partial = target.with_name(target.name + ".partial")
    _remove(partial)  # leftovers of a process that was killed
    try:
        yield partial
        if target.exists() and not replace:
            raise PeftuneError(f"{target} already exists; choose another destination or remove it first")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir() and partial.is_dir():
            shutil.rmtree(target)
        os.replace(partial, target)
    except BaseException:
        _remove(partial)
        raise


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def complete_run(path: str | Path) -> RunDir:
    """A complete run folder, or a clear error saying why it cannot be used."""
    run = RunDir(Path(path))
    if not run.path.is_dir():
        raise PeftuneError(f"run folder {run.path} not found; give the folder that `peftune train` wrote")
    if not run.recipe_file.is_file():
        raise PeftuneError(f"{run.path} is not a peftune run folder (no {RECIPE_FILE}); check the path")
    if not run.is_complete():
        raise PeftuneError(
            f"{run.path} holds an incomplete run (no {METRICS_FILE}): training did not finish; continue it with "
            f"`peftune train RECIPE --resume --output-dir {run.path}`"
        )
    return run
