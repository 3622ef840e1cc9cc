"""Share: an adapter (or the merged model) on the Hugging Face Hub, with a model card the Hub understands.

The folder to upload is staged first and is exactly what the Hub receives (`--dry-run` stops there). The
token comes from `HF_TOKEN` or the huggingface_hub login and goes only into request headers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from peftune import modeling, pooling, rundir
from peftune.data import Labels
from peftune.errors import PeftuneError, first_line
from peftune.methods import METHODS
from peftune.recipe import ON_BASE, Recipe, load_recipe

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
RUN_FILES = (rundir.RECIPE_FILE, rundir.LABELS_FILE, rundir.METRICS_FILE, rundir.SAMPLES_FILE)
NOT_METRICS = {"loss"}


@dataclass
class PushResult:
    folder: Path  # the staged folder (kept for a dry run)
    files: list[tuple[str, int]]  # path in the repository, size in bytes
    url: str | None = None  # the commit, after a real push


def push(
    run_path: str | Path,
    repo_id: str,
    *,
    merged: bool = False,
    private: bool = True,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    base_model_id: str | None = None,
    license: str | None = None,
    output: str | Path | None = None,
    echo: Callable[[str], Any] = print,
) -> PushResult:
    """Stage the run's adapter (or merged model) with its card, then upload it unless `dry_run`."""
    check_repo_id(repo_id)
    run = rundir.open_run(run_path)
    if dry_run:
        folder = Path(output) if output else run.path / ("hub-upload-merged" if merged else "hub-upload")
        stage(run, folder, repo_id, merged=merged, base_model_id=base_model_id, license=license, echo=echo)
        return PushResult(folder, _listing(folder))
    api, token = _client()
    with _hub_errors(api, token, repo_id):  # a bad token or no network stops the push before any work
        api.whoami(token=token)
    with tempfile.TemporaryDirectory(prefix="peftune-push-") as tmp:
        folder = Path(tmp) / "upload"
        stage(run, folder, repo_id, merged=merged, base_model_id=base_model_id, license=license, echo=echo)
        files = _listing(folder)
        url = _upload(api, token, folder, repo_id, private, revision, commit_message or f"Upload {run.path.name}")
    return PushResult(folder, files, url)


def stage(
    run: rundir.RunDir,
    folder: Path,
    repo_id: str,
    *,
    merged: bool = False,
    base_model_id: str | None = None,
    license: str | None = None,
    echo: Callable[[str], Any] = print,
) -> Path:
    """Write the folder to upload: the weights, the tokenizer, the run's records and README.md."""
    recipe = load_recipe(str(run.recipe_file))
    method = METHODS[recipe.method]
    base_id = hub_base_model(recipe, base_model_id, echo)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    if not method.is_adapter:
        weights, library = run.weights_dir(is_adapter=False), "transformers"
    elif merged:
        weights, library = _merged_folder(run), "transformers"
    else:
        weights, library = run.weights_dir(is_adapter=True), "peft"
    for file in sorted(weights.iterdir()):
        if file.is_file() and file.name != "README.md":
            shutil.copyfile(file, folder / file.name)
    for name in RUN_FILES:
        if (run.path / name).is_file():
            shutil.copyfile(run.path / name, folder / name)
    if (folder / ADAPTER_CONFIG).is_file():  # the Hub copy names the base by its Hub id, not this machine's path
        config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = base_id or config["base_model_name_or_path"]
        (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    card = model_card(recipe, run.read_metrics(), Labels.read(run.labels_file), repo_id, library, base_id, license)
    (folder / "README.md").write_text(card, encoding="utf-8")
    return folder


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise PeftuneError(f"--repo-id {repo_id!r} is not a valid repository id ({first_line(err)})") from None
    if repo_id.count("/") != 1:
        raise PeftuneError(f"--repo-id {repo_id!r} needs a namespace: write it as NAMESPACE/NAME (your user or org)")


def hub_base_model(recipe: Recipe, given: str | None, echo: Callable[[str], Any]) -> str | None:
    """The base model as a Hub id: the recipe's, or `--base-model-id` when the base was a local folder."""
    if given:
        check_repo_id(given)
        return given
    name = recipe.model.name_or_path
    if name.startswith("pkg://") or modeling.is_local_model(recipe.model):
        echo(
            f"warning: the base model was loaded from {name}, not a Hub id; the card leaves base_model out "
            "(pass --base-model-id ORG/NAME to name it)"
        )
        return None
    return name


def model_card(
    recipe: Recipe,
    metrics: dict[str, Any],
    labels: Labels,
    repo_id: str,
    library: str,
    base_id: str | None,
    license: str | None,
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
        for name, value in metrics["eval"].items()
        if name not in NOT_METRICS and isinstance(value, int | float)
    ]
    quantized = {"8bit": ["8-bit"], "4bit": ["4-bit"]}.get(recipe.model.quantization, [])
    tags = ["peftune", "text-classification", recipe.method, *quantized]
    card_data = ModelCardData(
        library_name=library, base_model=base_id, pipeline_tag="text-classification", tags=tags,
        datasets=[hub_dataset] if hub_dataset else None, license=license, model_name=repo_id.split("/")[1],
        eval_results=results or None,
    )  # fmt: skip
    return f"---\n{card_data.to_yaml()}\n---\n\n{_card_body(recipe, metrics, labels, repo_id, library, base_id)}"


def _card_body(
    recipe: Recipe, metrics: dict[str, Any], labels: Labels, repo_id: str, library: str, base_id: str | None
) -> str:
    base = f"[{base_id}](https://huggingface.co/{base_id})" if base_id else "a local base model"
    kind = "the merged model" if library == "transformers" and METHODS[recipe.method].is_adapter else None
    what = {
        "peft": f"A {recipe.method} adapter for {base}, with its classification head",
        "transformers": f"A text classifier fine-tuned from {base}"
        + (f" ({kind}: the {recipe.method} adapter folded into the weights)" if kind else ""),
    }[library]
    label_text = ", ".join(f"`{n}`" for n in labels.names) if labels.names else "one regression score"
    if library == "peft":
        id2label = repr({int(i): name for i, name in labels.id2label.items()})  # a Python dict: integer ids
        usage = f"""```python
from peft import AutoPeftModelForSequenceClassification
from transformers import AutoTokenizer

# peft rebuilds the head from the base model's config: pass the labels along.
id2label = {id2label}
model = AutoPeftModelForSequenceClassification.from_pretrained(
    "{repo_id}", num_labels={labels.num_labels}, id2label=id2label, label2id={{v: k for k, v in id2label.items()}}
)
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
```

Or with peftune, which reads the labels from the repository: `peftune predict {repo_id} --text "..."`."""
        if METHODS[recipe.method].attention_prefix:
            usage += (
                "\n\nStock peft runs prefix tuning through the model's `past_key_values`, which BERT, RoBERTa and "
                "ELECTRA take up to transformers 5.23 only (DistilBERT and DeBERTa never did); peftune puts the "
                "prefixes into attention itself and runs this adapter on any transformers 5 release."
            )
    else:
        usage = f"""```python
from transformers import pipeline

classifier = pipeline("text-classification", model="{repo_id}")
print(classifier("A sentence to classify."))
```"""
    if recipe.model.pooling == "mean":
        usage += "\n\n" + pooling.USAGE_NOTE
    primary = metrics["primary_metric"]
    rows = "\n".join(
        f"| {name} | {value:.4f} |" for name, value in metrics["eval"].items() if isinstance(value, int | float)
    )
    versions = ", ".join(f"{k} {v}" for k, v in metrics.get("versions", {}).items())
    return f"""# {repo_id.split("/")[1]}

{what}, trained with [peftune](https://pypi.org/project/peftune/) on {_data_text(recipe)}.

- Labels: {label_text}
- {primary["name"]} on the eval split ({metrics["eval_samples"]} examples): **{primary["value"]:.4f}**
- Trainable parameters: {metrics["trainable_parameters"]:,} of {metrics["total_parameters"]:,} \
({100 * metrics["trainable_share"]:.2f}%)

## Use it

{usage}

## Results

| metric | value |
|---|---|
{rows}

## Training

Method `{recipe.method}`{ON_BASE[recipe.model.quantization]}, \
{metrics["train_samples"]:,} training examples, learning rate {metrics["learning_rate"]:g}, \
{metrics["global_steps"]} optimizer steps in {metrics["train_runtime_s"]:.0f} s on {metrics["device"]} \
({metrics["dtype"]}), peak memory {metrics["peak_memory_mb"]:.0f} MB. Libraries: {versions}.

The resolved recipe (also in `recipe.yaml`):

```yaml
{yaml.safe_dump(_public_recipe(recipe), sort_keys=False).rstrip()}
```
"""


def _data_text(recipe: Recipe) -> str:
    data = recipe.data
    if data.source and data.files is None:
        return f"`{data.source}`" + (f" (`{data.config}`)" if data.config else "")
    return "local data files"


def _public_recipe(recipe: Recipe) -> dict[str, Any]:
    """The recipe for the card, without paths of this machine."""
    raw = recipe.model_dump()
    if raw["data"].get("files"):
        raw["data"]["files"] = {split: Path(str(p)).name for split, p in raw["data"]["files"].items()}
    name = raw["model"]["name_or_path"]
    if name.startswith("pkg://") or os.path.isabs(name):
        raw["model"]["name_or_path"] = Path(name).name
    return raw


def _merged_folder(run: rundir.RunDir) -> Path:
    """The run's merged model, merged now if it was not yet."""
    if not (run.merged_dir / rundir.MERGE_FILE).is_file():
        from peftune.merge import merge_adapter

        merge_adapter(run.path)
    return run.merged_dir


def _listing(folder: Path) -> list[tuple[str, int]]:
    return [(str(f.relative_to(folder)), f.stat().st_size) for f in sorted(folder.rglob("*")) if f.is_file()]


def _client() -> tuple[Any, str]:
    from huggingface_hub import HfApi, constants, get_token

    if constants.is_offline_mode():
        raise PeftuneError("HF_HUB_OFFLINE is set, so nothing can be pushed; unset it (or use --dry-run)")
    token = get_token()
    if not token:
        raise PeftuneError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)")
    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or constants.ENDPOINT), token


def _upload(api: Any, token: str, folder: Path, repo_id: str, private: bool, revision: str | None, message: str) -> str:
    """Create the repository (and branch) when missing, and commit the folder; return the commit URL."""
    with _hub_errors(api, token, repo_id):
        api.create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
        info = api.upload_folder(
            folder_path=folder, repo_id=repo_id, token=token, revision=revision, commit_message=message
        )
    return str(info.commit_url)


@contextlib.contextmanager
def _hub_errors(api: Any, token: str, repo_id: str) -> Iterator[None]:
    """The Hub client's errors as one line that says what to do (and never shows the token)."""
    from huggingface_hub.errors import HfHubHTTPError

    try:  # the HTTP client huggingface_hub uses: httpx2 from huggingface_hub 2, httpx before
        from httpx2 import TransportError
    except ImportError:
        from httpx import TransportError  # type: ignore[no-redef]
    try:
        yield
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status == 401:
            raise PeftuneError(
                "the Hub rejected the token (HF_TOKEN or the stored login); create a token with write access "
                "at https://huggingface.co/settings/tokens"
            ) from None
        if status == 403:
            raise PeftuneError(
                f"the token may not write to {repo_id}; use a namespace you own, or a token with write access"
            ) from None
        raise PeftuneError(f"the Hub refused the upload to {repo_id} ({_redact(first_line(err), token)})") from None
    except (TransportError, OSError) as err:  # no connection, DNS, timeouts
        raise PeftuneError(_unreachable(api.endpoint, err, token)) from None
    except ValueError as err:  # the client's own checks, e.g. of the card's metadata
        raise PeftuneError(f"cannot push to {repo_id}: {_redact(first_line(err), token)}") from None


def _unreachable(endpoint: str, err: BaseException, token: str) -> str:
    return (
        f"cannot reach the Hub at {endpoint} ({_redact(first_line(err), token)}); "
        "check the network connection, or HF_ENDPOINT"
    )


def _redact(text: str, token: str) -> str:
    return text.replace(token, "***") if token else text
