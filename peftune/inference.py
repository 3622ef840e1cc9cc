"""Trained models as the commands use them: what a target is, loading it, and its logits.

`eval`, `predict`, `merge` and `export` point at a target: a run folder, a standalone model folder (a full run's
model, a merge, a safetensors export), an ONNX export, a pushed run's Hub id or any other Hub model.
`resolve_target` decides which, `load_target` loads it, `batched_logits` runs it. Building a model to train is
`modeling`'s side.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from peftune import data, pooling
from peftune.data import Labels
from peftune.errors import PeftuneError, first_line
from peftune.methods import METHODS
from peftune.modeling import compute_dtype, load_base_model, load_tokenizer, looks_local, with_attention_prefix
from peftune.recipe import Recipe, load_recipe
from peftune.rundir import LABELS_FILE, MODEL_CONFIG, ONNX_FILE, RECIPE_FILE, SAMPLES_FILE, RunDir, complete_run


@dataclass
class LoadedModel:
    """A trained classifier ready for inference, with what peftune knows about it."""

    model: Any
    tokenizer: Any
    labels: Labels
    recipe: Recipe | None  # None for a model peftune did not write (a Hub id)
    samples: list[dict[str, Any]]  # eval rows kept with it, for checks; may be empty


TargetKind = Literal["run", "model", "onnx", "hub"]


@dataclass(frozen=True)
class Target:
    """What a command was pointed at, decided in one place.

    `kind`: "run" (a run folder, or a run `peftune push` uploaded, downloaded), "model" (a standalone
    transformers folder: a full run's model, a merge, a safetensors export), "onnx" (an ONNX export) or "hub"
    (any other Hub model id). `path` is the local folder, None for "hub".
    """

    kind: TargetKind
    path: Path | None
    given: str  # as the user wrote it
    pushed: bool = False  # a Hub id of a pushed run

    @property
    def local_folder(self) -> Path | None:
        """The folder on this machine the user named; None for a Hub id (pushed run or model)."""
        return None if self.pushed else self.path


def resolve_target(target: str | Path) -> Target:
    """Decide what `target` is: a local folder by the files it holds, else a Hub id (a pushed run, or a model)."""
    given = str(target)
    path = Path(target).expanduser()
    if path.is_dir():
        return Target(_folder_kind(path), path, given)
    if path.exists():
        raise PeftuneError(
            f"{target} is a file, not a run folder or a model folder; give the folder `peftune train` wrote"
        )
    if looks_local(given):
        raise PeftuneError(f"{target} not found: not a run folder, a model folder or a Hub id; check the path")
    pushed = pushed_run(given)
    if pushed is None:
        return Target("hub", None, given)
    return Target(_folder_kind(pushed), pushed, given, pushed=True)


def _folder_kind(path: Path) -> TargetKind:
    if (path / ONNX_FILE).is_file():
        return "onnx"
    if (path / MODEL_CONFIG).is_file():
        return "model"
    if (path / RECIPE_FILE).is_file():
        return "run"
    raise PeftuneError(f"{path} holds neither a peftune run ({RECIPE_FILE}) nor a model ({MODEL_CONFIG})")


def load_target(target: str | Path | Target) -> LoadedModel:
    """Load what `eval`, `predict`, `merge` and `export` work on: a run folder, a model folder, or a Hub id."""
    resolved = target if isinstance(target, Target) else resolve_target(target)
    if resolved.path is None:
        return _load_hub_model(resolved.given)
    if resolved.kind == "onnx":
        return _load_onnx_folder(resolved.path)
    if resolved.kind == "model":
        return _load_model_folder(resolved.path)
    return _load_run_folder(resolved.path)


def _load_run_folder(path: Path) -> LoadedModel:
    """A run folder's trained model: its base with the adapter on it, or the full run's model."""
    from transformers import AutoModelForSequenceClassification

    run = complete_run(path)
    recipe = load_recipe(str(run.recipe_file))
    labels = Labels.read(run.labels_file)
    method = METHODS[recipe.method]
    weights = run.weights_dir(method.is_adapter)
    if not method.is_adapter:
        model = pooling.apply(AutoModelForSequenceClassification.from_pretrained(weights, use_safetensors=True))
    else:
        from peft import PeftModel

        # The checkpoint's dropout, not the run's training setting (LoRA's is off): the same model in eval mode,
        # and a merge of it carries the checkpoint's config.
        base, _ = load_base_model(
            recipe.model.model_copy(update={"dropout": None}), labels, compute_dtype(recipe.train)
        )
        model = with_attention_prefix(PeftModel.from_pretrained(base, str(weights)))
    model.eval()
    samples = run.read_samples() if run.samples_file.is_file() else []
    return LoadedModel(model, load_tokenizer(str(weights)), labels, recipe, samples)


_SAFETENSORS_ONLY = " (peftune loads safetensors weights only: pickle files can run code when loaded)"


def _load_model_folder(path: Path) -> LoadedModel:
    from transformers import AutoModelForSequenceClassification

    try:
        model = pooling.apply(AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True))
    except (OSError, ValueError) as err:
        raise PeftuneError(f"cannot load the model in {path}: {first_line(err)}{_SAFETENSORS_ONLY}") from None
    model.eval()
    labels = Labels.read(path / LABELS_FILE) if (path / LABELS_FILE).is_file() else _labels_of(model.config)
    recipe = load_recipe(str(path / RECIPE_FILE)) if (path / RECIPE_FILE).is_file() else None
    samples_file = path / SAMPLES_FILE
    samples = RunDir(path).read_samples() if samples_file.is_file() else []
    return LoadedModel(model, load_tokenizer(str(path)), labels, recipe, samples)


def _load_onnx_folder(path: Path) -> LoadedModel:
    require_onnx(f"{path} is an ONNX export; running it", ("onnxruntime",))
    from transformers import AutoConfig

    labels = (
        Labels.read(path / LABELS_FILE)
        if (path / LABELS_FILE).is_file()
        else _labels_of(AutoConfig.from_pretrained(path))
    )
    recipe = load_recipe(str(path / RECIPE_FILE)) if (path / RECIPE_FILE).is_file() else None
    samples = RunDir(path).read_samples() if (path / SAMPLES_FILE).is_file() else []
    return LoadedModel(OnnxClassifier(path / ONNX_FILE), load_tokenizer(str(path)), labels, recipe, samples)


def _load_hub_model(model_id: str) -> LoadedModel:
    from transformers import AutoModelForSequenceClassification

    try:
        model = pooling.apply(AutoModelForSequenceClassification.from_pretrained(model_id, use_safetensors=True))
    except (OSError, ValueError) as err:
        raise PeftuneError(
            f"{model_id!r} is not a local folder and could not be loaded from the Hub: {first_line(err)}"
            f"{_SAFETENSORS_ONLY}"
        ) from None
    model.eval()
    return LoadedModel(model, load_tokenizer(model_id), _labels_of(model.config), None, [])


def pushed_run(repo_id: str) -> Path | None:
    """A run `peftune push` put on the Hub (it has recipe.yaml), downloaded; None for any other Hub model."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        hf_hub_download(repo_id, RECIPE_FILE)
    except (HfHubHTTPError, OSError, ValueError):  # not there, not a peftune repository, or offline
        return None
    return Path(snapshot_download(repo_id))


def _labels_of(config: Any) -> Labels:
    if config.problem_type == "regression" or config.num_labels == 1:
        return Labels(names=None)
    names = tuple(config.id2label[i] for i in range(config.num_labels))
    return Labels(names=names, multi_label=config.problem_type == "multi_label_classification")


class OnnxClassifier:
    """An exported `model.onnx` under onnxruntime, called like a transformers classifier: `model(**batch).logits`.

    The graph holds everything the model computes (adapter, prefixes, pooling), so an ONNX export predicts
    without torch weights, peft or peftune's hooks.
    """

    device = "cpu"

    def __init__(self, path: Path) -> None:
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        # The exporter drops inputs the graph does not use (DeBERTa-v3 has no token types): feed what it takes.
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, **batch: Any) -> Any:
        import numpy as np
        import torch
        from transformers.modeling_outputs import SequenceClassifierOutput

        feed = {name: np.asarray(batch[name].cpu(), dtype=np.int64) for name in self.input_names}
        return SequenceClassifierOutput(logits=torch.from_numpy(self.session.run(["logits"], feed)[0]))


def require_onnx(what: str, modules: tuple[str, ...] = ("onnx", "onnxruntime")) -> None:
    """onnx and onnxruntime come with the `onnx` extra; say so when they are missing."""
    import importlib.util

    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise PeftuneError(f"{what} needs {' and '.join(missing)}: pip install 'peftune[onnx]'")


DEFAULT_MAX_LENGTH = 512


def batched_logits(
    loaded: LoadedModel,
    texts: Sequence[str],
    pairs: Sequence[str] | None = None,
    batch_size: int = 64,
    progress: bool = False,
    say_cut: bool = False,
) -> np.ndarray:
    """Logits for every text (or text pair), batched by length so that little padding is computed.

    A run trained with `data.long_text=chunk` reads each text in windows as it trained, and a text's logits are
    its windows' pooled. `say_cut`: otherwise warn, in one line, how many texts were longer than the model reads
    (they are cut to it).
    """
    import torch
    from tqdm.auto import tqdm

    model, tokenizer = loaded.model, loaded.tokenizer
    max_length = input_length(loaded)
    spec = loaded.recipe.data if loaded.recipe is not None else None
    stride = spec.window_stride if spec is not None else None
    if not texts:
        return np.empty((0, loaded.labels.num_labels), dtype=np.float32)
    encoded, rows = data.encode_texts(tokenizer, texts, pairs, max_length, stride)
    if say_cut and stride is None:
        data.say_cut(sum(data.were_cut(encoded, max_length)), len(texts), "texts", max_length,
                     "the model was trained on that length: a longer one needs a run trained with a larger "
                     "data.max_length")  # fmt: skip
    lengths = np.array([len(ids) for ids in encoded["input_ids"]])
    order = np.argsort(-lengths, kind="stable")  # longest first: an out-of-memory shows up at once
    device = model.device  # transformers and peft models have one, as does an ONNX export under onnxruntime
    out: np.ndarray | None = None
    starts = range(0, len(order), batch_size)
    # A bar on a terminal only: in a log file each redraw is another line.
    shown = progress and len(starts) > 1 and sys.stderr.isatty()
    for start in tqdm(starts, desc="Predicting", unit="batch", disable=not shown):
        index = order[start : start + batch_size]
        batch = tokenizer.pad({k: [encoded[k][i] for i in index] for k in encoded}, return_tensors="pt")
        with torch.inference_mode():
            logits = model(**batch.to(device)).logits.float().cpu().numpy()
        if out is None:
            out = np.empty((len(order), logits.shape[-1]), dtype=np.float32)
        out[index] = logits
    assert out is not None
    if spec is not None and stride is not None:
        return data.pool_windows(out, rows, len(texts), spec.window_pooling)
    return out


def input_length(loaded: LoadedModel) -> int:
    """The tokens a text is cut to: the run's `data.max_length`, else what the tokenizer says the model takes."""
    if loaded.recipe is not None:
        return loaded.recipe.data.max_length
    length = getattr(loaded.tokenizer, "model_max_length", DEFAULT_MAX_LENGTH)
    return length if isinstance(length, int) and 0 < length <= 8192 else DEFAULT_MAX_LENGTH
