"""Merge: fold a LoRA or IA3 adapter into its base model and write a standalone model folder.

The base is always reloaded in full precision, also for an adapter trained on an 8-bit or 4-bit base: merging
into re-quantized weights would add a second rounding to every weight. The merged model is then
checked against the adapter model on the eval rows kept in the run folder, and only a model that passes
is written.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from peftune import pooling, rundir
from peftune.data import Labels
from peftune.errors import PeftuneError
from peftune.inference import LoadedModel, batched_logits, load_target, resolve_target
from peftune.methods import METHODS
from peftune.metrics import sigmoid
from peftune.modeling import load_base_model
from peftune.recipe import Recipe, load_recipe
from peftune.record import MergeCheck, MergeRecord

DTYPES = ("float32", "float16", "bfloat16")
# How closely a merged model must match the adapter model it came from, on the kept eval rows. A float32
# merge of a float32 adapter differs only by rounding (about 1e-6 measured); a half-precision merge, or a
# merge of an adapter trained on an int8 or NF4 base, differs by rounding the weights, so it is judged by labels.
MAX_LOGIT_DIFFERENCE = 1e-3
MIN_LABEL_AGREEMENT = 0.98
MAX_REGRESSION_DIFFERENCE = 0.1  # the same judgement for a regression output, in its own units


def merge_adapter(run_path: str | Path, output: str | Path | None = None, dtype: str = "float32") -> Path:
    """Merge the run's adapter into its base, check it, write a standalone model folder; return its path.

    `run_path` may also be the Hub id of an adapter `peftune push` uploaded; its merge goes to ./NAME-merged.
    """
    resolved = resolve_target(run_path)
    if resolved.kind != "run" or resolved.path is None:
        what = {"model": "a standalone model (a full run's model, a merge or an export)", "onnx": "an ONNX export",
                "hub": "a Hub model without a peftune run"}[resolved.kind]  # fmt: skip
        raise PeftuneError(f"{run_path} is {what}: there is no adapter to merge; give the run folder it came from")
    if resolved.pushed and output is None:
        output = Path(f"{resolved.given.split('/')[-1]}-merged")
    run = rundir.complete_run(resolved.path)
    recipe = load_recipe(str(run.recipe_file))
    method = METHODS[recipe.method]
    if not method.is_adapter:
        raise PeftuneError(
            f"{run.path} is a full fine-tuning run: there is nothing to merge, its standalone model is {run.model_dir}"
        )
    if not method.mergeable:
        raise PeftuneError(
            f"{recipe.method} tuning adds trained vectors to every input, which cannot be folded into the weights; "
            f"use the adapter folder as it is (peftune predict {run.path}) or peftune export {run.path}"
        )
    if dtype not in DTYPES:
        raise PeftuneError(f"unknown dtype {dtype!r}; use one of: {', '.join(DTYPES)}")
    target = Path(output) if output else run.merged_dir
    _check_destination(target, run)

    merged, check = checked_merge(run, recipe, dtype)

    record = MergeRecord(
        source_run=str(run.path.resolve()),
        method=recipe.method,
        base_model=recipe.model.name_or_path,
        trained_on=recipe.model.quantization,
        dtype=dtype,
        check=check,
        merged_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    with rundir.staged(target, replace=True) as partial:  # an earlier merge of this run (checked above)
        merged.model.save_pretrained(partial)
        merged.tokenizer.save_pretrained(partial)
        rundir.copy_records(run.path, partial)
        (partial / rundir.MERGE_FILE).write_text(json.dumps(record.to_json(), indent=2) + "\n", encoding="utf-8")
        (partial / rundir.CARD_FILE).write_text(_readme(recipe, merged.labels, record), encoding="utf-8")
    return target


def checked_merge(run: rundir.RunDir, recipe: Recipe, dtype: str) -> tuple[LoadedModel, MergeCheck]:
    """The run's adapter folded into its base in `dtype`, checked against the adapter model on the eval rows
    the run keeps: the merged model and the check. Raises, with nothing written, when the check fails.

    An adapter trained on a float base is merged in place, after the adapter model's own logits are taken (the
    base loads once); one trained on a quantized base is merged into the base reloaded in full precision.
    """
    reference = load_target(run.path)
    expected = sample_logits(reference)
    if recipe.model.quantized:
        model = merged_model(run, recipe, reference.labels)
    else:
        _keep_trained_copies(reference.model)
        model = reference.model.merge_and_unload()
        model.eval()
    model.to(_torch_dtype(dtype))
    merged = LoadedModel(model, reference.tokenizer, reference.labels, recipe, reference.samples)
    exact = dtype == "float32" and not recipe.model.quantized
    check = judge(expected, sample_logits(merged), reference.labels, exact=exact)
    if not check.passed:
        raise PeftuneError(
            f"the merged model disagrees with the adapter model beyond tolerance ({describe(check)}); "
            "nothing was written: report this with the run folder"
        )
    return merged, check


def merged_model(run: rundir.RunDir, recipe: Recipe, labels: Labels) -> Any:
    """The run's adapter folded into a full-precision copy of its base (a plain transformers model).

    The base keeps its checkpoint's dropout whatever the run trained with (LoRA turns it off), as `load_target`'s
    does: the merged model's config is the checkpoint's, for whoever fine-tunes it further."""
    from peft import PeftModel

    base, _ = load_base_model(recipe.model.model_copy(update={"quantization": "none", "dropout": None}), labels)
    adapted = PeftModel.from_pretrained(base, str(run.weights_dir(is_adapter=True)))
    _keep_trained_copies(adapted)
    model = adapted.merge_and_unload()
    model.eval()
    return model


def _keep_trained_copies(model: Any) -> None:
    """Put each module trained in full (the head, a pooler) in place of its wrapper, as the trained copy.

    peft's IA3 unloading treats a wrapped module as a linear layer and fails on a head made of several
    (RoBERTa's, DeBERTa's pooler); with the wrappers gone, every method merges only its adapter layers.
    """
    from peft.utils import ModulesToSaveWrapper

    for name, module in list(model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.modules_to_save[module.active_adapter])


def sample_logits(loaded: LoadedModel) -> np.ndarray:
    """Logits of a model on the eval rows kept with it (the run's `eval_samples.jsonl`)."""
    if not loaded.samples:
        raise PeftuneError("the run folder keeps no eval rows to check against; train it again with this peftune")
    assert loaded.recipe is not None
    columns = loaded.recipe.data.text_columns
    texts = [row[columns[0]] for row in loaded.samples]
    pairs = [row[columns[1]] for row in loaded.samples] if len(columns) == 2 else None
    return batched_logits(loaded, texts, pairs)


def judge(expected: np.ndarray, got: np.ndarray, labels: Labels, exact: bool) -> MergeCheck:
    """Logit difference and label agreement of two models' logits on the same rows, judged by the tolerances:
    `exact` (float32 throughout) by the logits, otherwise by the labels (or a regression's own units)."""
    difference = float(np.abs(expected - got).max())
    if labels.names is None:
        bound = MAX_LOGIT_DIFFERENCE if exact else MAX_REGRESSION_DIFFERENCE
        return MergeCheck(samples=len(expected), max_abs_logit_difference=difference,
                          tolerance={"max_abs_logit_difference": bound}, passed=difference <= bound)  # fmt: skip
    if labels.multi_label:  # the same set of labels over each row's thresholds
        agreement = float((labels.decide(sigmoid(expected)) == labels.decide(sigmoid(got))).all(-1).mean())
    else:
        agreement = float((expected.argmax(-1) == got.argmax(-1)).mean())
    if exact:
        tolerance, passed = {"max_abs_logit_difference": MAX_LOGIT_DIFFERENCE}, difference <= MAX_LOGIT_DIFFERENCE
    else:
        tolerance, passed = {"label_agreement": MIN_LABEL_AGREEMENT}, agreement >= MIN_LABEL_AGREEMENT
    return MergeCheck(samples=len(expected), max_abs_logit_difference=difference, label_agreement=agreement,
                      tolerance=tolerance, passed=passed)  # fmt: skip


def _check_destination(target: Path, run: rundir.RunDir) -> None:
    """An existing folder may only be replaced when it is an earlier merge of the same run."""
    if not target.exists():
        return
    record_file = target / rundir.MERGE_FILE
    if record_file.is_file():
        source = json.loads(record_file.read_text(encoding="utf-8")).get("source_run")  # any version's record
        if source == str(run.path.resolve()):
            return
    raise PeftuneError(f"{target} already exists and is not a merge of {run.path}; choose another --output")


def _torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def describe(check: MergeCheck) -> str:
    """The check in words: `max |logit difference| 1.2e-06, label agreement 1.000, tolerance {...}`."""
    parts = [f"max |logit difference| {check.max_abs_logit_difference:.3g}"]
    if check.label_agreement is not None:
        parts.append(f"label agreement {check.label_agreement:.3f}")
    parts.append(f"tolerance {check.tolerance}")
    return ", ".join(parts)


def _readme(recipe: Recipe, labels: Labels, record: MergeRecord) -> str:
    names = ", ".join(labels.names) if labels.names else "a regression score"
    if labels.multi_label:
        names += " (multi-label: any number per text; thresholds in labels.json)"
    note = f"\n{pooling.USAGE_NOTE}\n" if recipe.model.pooling == "mean" else ""
    call = (
        'classifier("A sentence to classify.", top_k=None)'
        if labels.multi_label
        else 'classifier("A sentence to classify.")'
    )

    return f"""# {recipe.name} (merged)

A standalone text classifier: the {recipe.method} adapter of peftune run `{recipe.name}` folded into
`{recipe.model.name_or_path}`, saved in {record.dtype}. It needs no peft to load.

- Labels: {names}
- Check against the adapter model on {record.check.samples} eval rows: {describe(record.check)}

```python
from transformers import pipeline

classifier = pipeline("text-classification", model="path/to/this/folder")
print({call})
```
{note}
`recipe.yaml` is the training recipe, `merge.json` the record of this merge.
"""
