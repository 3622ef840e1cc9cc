"""Model cards: the README.md of an adapter folder (written by `train`) and of a Hub repository (by `push`).

Both have the same front matter (library, base model, pipeline tag, model-index with the eval results) and
body (what it is, how to use it, results, how it was trained, the recipe); they differ in where the model is
loaded from: the folder on this machine, or the repository.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from peftune import pooling
from peftune.data import Labels
from peftune.methods import METHODS
from peftune.recipe import ON_BASE, PACKAGE_SCHEME, Recipe
from peftune.record import Metrics

NOT_METRICS = {"loss"}

_PREFIX_NOTE = (
    "Stock peft runs prefix tuning through the model's `past_key_values`, which BERT, RoBERTa and ELECTRA take "
    "up to transformers 5.23 only (DistilBERT and DeBERTa never did); peftune puts the prefixes into attention "
    "itself and runs this adapter on any transformers 5 release."
)


@dataclass(frozen=True)
class Place:
    """Where the carded model lives: its title, what `from_pretrained` takes, what `peftune predict` takes."""

    title: str
    load_from: str
    peftune_target: str
    on_hub: bool


def hub_place(repo_id: str) -> Place:
    return Place(repo_id.split("/")[1], repo_id, repo_id, on_hub=True)


def folder_place(title: str, folder: Path, run_folder: Path) -> Place:
    return Place(title, str(folder), str(run_folder), on_hub=False)


def model_card(
    recipe: Recipe,
    metrics: Metrics,
    labels: Labels,
    place: Place,
    library: str,
    base_id: str | None,
    license: str | None = None,
) -> str:
    """README.md with YAML front matter (library, base model, pipeline tag, model-index) and usage."""
    from huggingface_hub import EvalResult, ModelCardData

    data = recipe.data
    hub_dataset = data.source if data.source and data.files is None else None
    dataset_name = hub_dataset or Path(str((data.files or {}).get("validation") or "local data")).name
    where: dict[str, Any] = {"task_type": "text-classification", "dataset_type": hub_dataset or "custom",
             "dataset_name": dataset_name, "dataset_config": data.config if hub_dataset else None,
             "dataset_split": data.eval_split}  # fmt: skip
    results = [
        EvalResult(**where, metric_type=name, metric_value=value)
        for name, value in metrics.eval.items()
        if name not in NOT_METRICS and isinstance(value, int | float)
    ]
    quantized = {"8bit": ["8-bit"], "4bit": ["4-bit"]}.get(recipe.model.quantization, [])
    tags = ["peftune", "text-classification", recipe.method, *quantized,
            *(["multi-label"] if labels.multi_label else [])]  # fmt: skip
    card_data = ModelCardData(
        library_name=library, base_model=base_id, pipeline_tag="text-classification", tags=tags,
        datasets=[hub_dataset] if hub_dataset else None, license=license, model_name=place.title,
        eval_results=results or None,
    )  # fmt: skip
    return f"---\n{card_data.to_yaml()}\n---\n\n{_body(recipe, metrics, labels, place, library, base_id)}"


def _body(recipe: Recipe, metrics: Metrics, labels: Labels, place: Place, library: str, base_id: str | None) -> str:
    if base_id:
        base = f"[{base_id}](https://huggingface.co/{base_id})"
    else:
        base = "a local base model" if place.on_hub else f"the base model `{recipe.model.name_or_path}`"
    kind = "the merged model" if library == "transformers" and METHODS[recipe.method].is_adapter else None
    what = {
        "peft": f"A {recipe.method} adapter for {base}, with its classification head",
        "transformers": f"A text classifier fine-tuned from {base}"
        + (f" ({kind}: the {recipe.method} adapter folded into the weights)" if kind else ""),
    }[library]
    label_text = ", ".join(f"`{n}`" for n in labels.names) if labels.names else "one regression score"
    budget = f" (batches of up to {metrics.batch_tokens:,} tokens)" if metrics.batch_tokens else ""
    if labels.multi_label:
        label_text = (
            f"multi-label: any number of {label_text} per text, each with its own sigmoid score; a label applies "
            "when its score reaches its threshold ("
            + ", ".join(f"`{n}` {t:g}" for n, t in zip(labels.names or (), labels.decide_thresholds(), strict=True))
            + (f", tuned on the {metrics.thresholds_tuned_on!r} split" if metrics.thresholds_tuned_on else "")
            + "; also in `labels.json`)"
        )
    usage = _usage(recipe, labels, place, library)
    primary = metrics.primary_metric
    rows = "\n".join(
        f"| {name} | {value:.4f} |" for name, value in metrics.eval.items() if isinstance(value, int | float)
    )
    versions = ", ".join(f"{k} {v}" for k, v in metrics.versions.items())
    return f"""# {place.title}

{what}, trained with [peftune](https://pypi.org/project/peftune/) on {_data_text(recipe)}.

- Labels: {label_text}
- {primary.name} on the eval split ({metrics.eval_samples} examples): **{primary.value:.4f}**
- Trainable parameters: {metrics.trainable_parameters:,} of {metrics.total_parameters:,} \
({100 * metrics.trainable_share:.2f}%)

## Use it

{usage}

## Results

| metric | value |
|---|---|
{rows}

## Training

Method `{recipe.method}`{ON_BASE[recipe.model.quantization]}, \
{metrics.train_samples:,} training examples, learning rate {metrics.learning_rate:g}, \
{metrics.global_steps} optimizer steps{budget} in {metrics.train_runtime_s:.0f} s on {metrics.device} \
({metrics.dtype}), peak memory {metrics.peak_memory_mb:.0f} MB. Libraries: {versions}.

The resolved recipe (also in `recipe.yaml`):

```yaml
{yaml.safe_dump(_public_recipe(recipe), sort_keys=False).rstrip()}
```
"""


def _usage(recipe: Recipe, labels: Labels, place: Place, library: str) -> str:
    top_k = ", top_k=None" if labels.multi_label else ""  # every label's sigmoid score, not only the best one
    if library == "transformers":
        usage = f"""```python
from transformers import pipeline

classifier = pipeline("text-classification", model="{place.load_from}")
print(classifier("A sentence to classify."{top_k}))
```"""
    else:
        id2label = repr({int(i): name for i, name in labels.id2label.items()})  # a Python dict: integer ids
        label_args = (
            f"num_labels={labels.num_labels}, id2label=id2label, label2id={{v: k for k, v in id2label.items()}}"
        )
        if labels.multi_label:
            label_args += ', problem_type="multi_label_classification"'

        if place.on_hub:  # adapter_config.json names the base by its Hub id
            usage = f"""```python
from peft import AutoPeftModelForSequenceClassification
from transformers import AutoTokenizer

# peft rebuilds the head from the base model's config: pass the labels along.
id2label = {id2label}
model = AutoPeftModelForSequenceClassification.from_pretrained(
    "{place.load_from}", {label_args}
)
tokenizer = AutoTokenizer.from_pretrained("{place.load_from}")
```"""
        else:  # the base is named as the recipe names it, which peft may not read (pkg://): load it first
            imports, base = _base_expression(recipe.model.name_or_path)
            usage = f"""```python
{imports}from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

id2label = {id2label}
base = AutoModelForSequenceClassification.from_pretrained(
    {base}, {label_args}
)
model = PeftModel.from_pretrained(base, "{place.load_from}")
tokenizer = AutoTokenizer.from_pretrained("{place.load_from}")
```"""
        reads = "reads the labels from the repository" if place.on_hub else "reads the labels from the run folder"
        usage += f'\n\nOr with peftune, which {reads}: `peftune predict {place.peftune_target} --text "..."`.'
        if METHODS[recipe.method].attention_prefix:
            usage += "\n\n" + _PREFIX_NOTE
    if recipe.model.pooling == "mean":
        usage += "\n\n" + pooling.USAGE_NOTE
    if recipe.data.long_text == "chunk":
        usage += "\n\n" + _CHUNK_NOTE.format(length=recipe.data.max_length, pooling=recipe.data.window_pooling)
    return usage


_CHUNK_NOTE = (
    "Trained on long texts in overlapping windows of {length} tokens (`data.long_text: chunk`): `peftune predict` "
    "reads a text the same way and takes the {pooling} of its windows' logits; transformers alone reads the first "
    "{length} tokens only."
)


def _base_expression(name: str) -> tuple[str, str]:
    """Python code that names the base for `from_pretrained`: (imports, expression)."""
    if not name.startswith(PACKAGE_SCHEME):
        return "", repr(name)
    package, _, inner = name[len(PACKAGE_SCHEME) :].partition("/")
    where = f'importlib.resources.files("{package}")' + (f' / "{inner}"' if inner else "")
    return "import importlib.resources\n\n", f"str({where})"


def _data_text(recipe: Recipe) -> str:
    data = recipe.data
    if data.source and data.files is None:
        return f"`{data.source}`" + (f" (`{data.config}`)" if data.config else "")
    return "local data files"


def _public_recipe(recipe: Recipe) -> dict[str, Any]:
    """The recipe for the card, without paths of this machine (a pkg:// name is the same on every machine)."""
    raw = recipe.model_dump()
    if raw["data"].get("files"):
        raw["data"]["files"] = {split: Path(str(p)).name for split, p in raw["data"]["files"].items()}
    name = raw["model"]["name_or_path"]
    if os.path.isabs(name):
        raw["model"]["name_or_path"] = Path(name).name
    return raw
