"""Export: a trained classifier as ONNX (checked under onnxruntime) or as safetensors in a chosen dtype.

Full runs, merged folders and LoRA/IA3 runs (merged on the way) export the same way, so their artifacts
compare like for like. Prefix and prompt adapters export to ONNX with their vectors built in.
"""

from __future__ import annotations

import json
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from peftune import rundir
from peftune.errors import PeftuneError
from peftune.inference import (
    LoadedModel,
    OnnxClassifier,
    Target,
    batched_logits,
    load_target,
    require_onnx,
    resolve_target,
)
from peftune.merge import DTYPES, checked_merge
from peftune.methods import METHODS
from peftune.recipe import load_recipe
from peftune.record import ExportRecord, MergeCheck, OnnxCheck

FORMATS = ("onnx", "safetensors")
ONNX_OPSET = 17
ONNX_TOLERANCE = 1e-4  # max |logit difference| between onnxruntime and PyTorch, float32
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def export_model(
    target: str | Path, fmt: str, output: str | Path | None = None, dtype: str = "float32"
) -> tuple[Path, ExportRecord]:
    """Export a run folder or model folder; return the new folder and its record (with the checks)."""
    if fmt not in FORMATS:
        raise PeftuneError(f"unknown export format {fmt!r}; use one of: {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise PeftuneError(f"unknown dtype {dtype!r}; use one of: {', '.join(DTYPES)}")
    if fmt == "onnx" and dtype != "float32":
        raise PeftuneError("ONNX export writes float32; leave --dtype out (or export safetensors in a half dtype)")
    if fmt == "onnx":
        require_onnx("ONNX export")
    resolved = resolve_target(target)
    if resolved.kind == "onnx":
        raise PeftuneError(
            f"{target} is already an ONNX export; export the run or merged folder it came from "
            f"(its {rundir.EXPORT_FILE} names it)"
        )
    # The export of a Hub id (a run `peftune push` uploaded, or another model) goes to ./NAME-export-FORMAT.
    name = rundir.export_dir(fmt)
    folder = resolved.local_folder
    default = folder / name if folder else Path(f"{resolved.given.split('/')[-1]}-{name}")
    destination = Path(output) if output else default
    if destination.exists():
        raise PeftuneError(f"{destination} already exists; choose another --output or remove it first")

    loaded, merge_check = _standalone(resolved, fmt)
    with rundir.staged(destination) as partial:
        partial.mkdir(parents=True)
        if fmt == "onnx":
            check = _export_onnx(loaded, partial / rundir.ONNX_FILE)
        else:
            import torch

            loaded.model.to(getattr(torch, dtype)).save_pretrained(partial)
            check = None
        loaded.tokenizer.save_pretrained(partial)
        _config_of(loaded.model).save_pretrained(partial)
        if resolved.path is not None:
            rundir.copy_records(resolved.path, partial)
        record = ExportRecord(
            source=str(folder.resolve()) if folder else resolved.given,
            format=fmt,
            dtype=dtype,
            check=check,
            merge_check=merge_check,
            exported_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        (partial / rundir.EXPORT_FILE).write_text(json.dumps(record.to_json(), indent=2) + "\n", encoding="utf-8")
    return destination, record


def _standalone(resolved: Target, fmt: str) -> tuple[LoadedModel, MergeCheck | None]:
    """The model to export: a full or merged model as loaded, or an adapter run merged into its base and
    checked as `merge` checks it; with the merge's check, if there was one."""
    if resolved.kind != "run" or resolved.path is None:
        return load_target(resolved), None
    run = rundir.complete_run(resolved.path)
    recipe = load_recipe(str(run.recipe_file))
    method = METHODS[recipe.method]
    if method.mergeable:
        return checked_merge(run, recipe, "float32")
    if method.is_adapter and fmt == "safetensors":
        raise PeftuneError(
            f"{recipe.method} adapters have no standalone weights to export: the adapter folder "
            f"{run.adapter_dir} is already safetensors; export --format onnx for a standalone model"
        )
    return load_target(resolved), None


def _export_onnx(loaded: LoadedModel, path: Path) -> OnnxCheck:
    """Trace the model to ONNX with dynamic batch and sequence axes, then compare onnxruntime with PyTorch."""
    import torch

    model, tokenizer = loaded.model, loaded.tokenizer
    names = [n for n in INPUT_NAMES if n in tokenizer.model_input_names]
    texts = _check_texts(loaded)
    example = tokenizer(texts[:2], *_pair_args(loaded, texts[:2]), padding=True, return_tensors="pt")

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.model(**dict(zip(names, inputs, strict=True))).logits

    wrapper = Logits().eval()
    axes = {name: {0: "batch", 1: "sequence"} for name in names} | {"logits": {0: "batch"}}
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns that Python values (shapes, the prefix length) become constants and that the graph
        # "might not generalize": the exported graph is checked against PyTorch right after, at other shapes.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # Its note that index operators give wrong results for negative indices: the model uses none (the check).
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        # The TorchScript exporter: the dynamo one writes invalid graphs for prefix-tuned models today.
        torch.onnx.export(
            wrapper, tuple(example[n] for n in names), str(path), input_names=names, output_names=["logits"],
            dynamic_axes=axes, opset_version=ONNX_OPSET, dynamo=False,
        )  # fmt: skip
    model.eval()  # the exporter puts the module back into the training mode the wrapper was created in
    return _check_onnx(loaded, path, texts)


def _check_onnx(loaded: LoadedModel, path: Path, texts: list[str]) -> OnnxCheck:
    """The graph under onnxruntime against PyTorch, through the code `predict` runs on an export folder."""
    import onnxruntime

    pairs = _pairs(loaded, texts)
    expected = batched_logits(loaded, texts, pairs, batch_size=16)
    # Batches of other sizes and lengths than the traced example.
    exported = LoadedModel(OnnxClassifier(path), loaded.tokenizer, loaded.labels, loaded.recipe, [])
    difference = float(np.abs(batched_logits(exported, texts, pairs, batch_size=16) - expected).max())
    check = OnnxCheck(runtime=f"onnxruntime {onnxruntime.__version__}", samples=len(texts),
                      max_abs_logit_difference=difference, tolerance=ONNX_TOLERANCE)  # fmt: skip
    if difference > ONNX_TOLERANCE:
        raise PeftuneError(
            f"onnxruntime's logits differ from PyTorch's by {difference:.3g} (tolerance {ONNX_TOLERANCE}); "
            "nothing was written: report this with the model"
        )
    return check


def _check_texts(loaded: LoadedModel) -> list[str]:
    if loaded.samples and loaded.recipe is not None:
        return [row[loaded.recipe.data.text_columns[0]] for row in loaded.samples][:64]
    return ["A short sentence.", "A somewhat longer sentence, to give the sequence axis another length.", "Third."]


def _pairs(loaded: LoadedModel, texts: list[str]) -> list[str] | None:
    if loaded.recipe is None or len(loaded.recipe.data.text_columns) < 2:
        return None
    second = loaded.recipe.data.text_columns[1]
    by_first = {row[loaded.recipe.data.text_columns[0]]: row[second] for row in loaded.samples}
    return [by_first.get(text, "") for text in texts]


def _pair_args(loaded: LoadedModel, texts: list[str]) -> list[list[str]]:
    pairs = _pairs(loaded, texts)
    return [pairs] if pairs is not None else []


def _config_of(model: Any) -> Any:
    """The transformers config with the labels (a peft model keeps it on its base)."""
    return model.get_base_model().config if hasattr(model, "get_base_model") else model.config
