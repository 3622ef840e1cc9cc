"""Models: load the base checkpoint with a classification head, find what is new, attach the method."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftune import pooling
from peftune.data import Labels
from peftune.errors import PeftuneError, first_line
from peftune.methods import METHODS
from peftune.recipe import ModelSpec, Recipe, load_recipe, local_path
from peftune.rundir import LABELS_FILE, RECIPE_FILE, SAMPLES_FILE, RunDir, open_run

if TYPE_CHECKING:
    from peft import PeftModel
    from torch import nn
    from transformers import PretrainedConfig, PreTrainedModel

log = logging.getLogger(__name__)

# Attribute names of the classification head on transformers' *ForSequenceClassification models.
HEAD_NAMES = ("classifier", "score")


def _looks_local(name: str) -> bool:
    """A path rather than a Hub id (`org/name`): absolute, relative with ./ or ~, or deeper than one slash."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def _check_reference(name: str) -> None:
    """A missing local folder gets its own message, not the Hub client's complaint about repo ids."""

    if _looks_local(name) and not os.path.exists(name):
        raise PeftuneError(
            f"model folder {name} not found; check model.name_or_path (a Hub id like org/name, or a local folder)"
        )


def load_config(spec: ModelSpec) -> PretrainedConfig:
    """The base model's config (a small file: no weights are read)."""
    from transformers import AutoConfig

    name = local_path(spec.name_or_path, "model.name_or_path")
    _check_reference(name)
    try:
        return AutoConfig.from_pretrained(
            name,
            revision=spec.revision,
            trust_remote_code=spec.trust_remote_code,
        )
    except (OSError, ValueError) as err:
        if "trust_remote_code" in str(err) and not spec.trust_remote_code:
            raise PeftuneError(
                f"cannot load the config of {spec.name_or_path!r}: it needs the repository's own Python code, which "
                "peftune does not run unless told; set model.trust_remote_code: true only if you trust that code"
            ) from None
        raise PeftuneError(
            f"cannot load the config of {spec.name_or_path!r}: {first_line(err)}; "
            "check model.name_or_path (a Hub id or a local folder with config.json)"
        ) from None


def check_model(recipe: Recipe, config: PretrainedConfig) -> None:
    """Refuse a model/method/quantization combination that cannot work, before any weights load."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    if type(config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING and not recipe.model.trust_remote_code:
        raise PeftuneError(
            f"model type {config.model_type!r} has no sequence classification head in transformers; "
            "choose an encoder such as BERT, RoBERTa, DeBERTa or DistilBERT"
        )
    method = METHODS[recipe.method]
    method.check_architecture(config)
    if method.attention_prefix:
        from peftune import prefix

        prefix.check_recipe(recipe, config)
    limit = max_positions(config)
    if limit is not None and recipe.data.max_length > limit:
        raise PeftuneError(
            f"data.max_length {recipe.data.max_length} is more than {config.model_type} models take ({limit} tokens); "
            f"set data.max_length to {limit} or less"
        )
    if recipe.model.load_in_8bit:
        try:
            import bitsandbytes  # noqa: F401
        except Exception as err:  # an ImportError, or a broken native library
            raise PeftuneError(
                f"model.load_in_8bit needs a working bitsandbytes ({first_line(err)}); "
                "pip install bitsandbytes, or set model.load_in_8bit=false"
            ) from None


# Architectures that number positions from padding_idx + 1, so two of max_position_embeddings are not usable.
PADDING_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "mpnet",
                            "roberta-prelayernorm", "longformer"}  # fmt: skip


def max_positions(config: PretrainedConfig) -> int | None:
    """The longest input the model's absolute position embeddings allow; None when positions are relative."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or getattr(config, "position_biased_input", True) is False:
        return None  # DeBERTa-v2/v3: relative positions only
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return None
    if config.model_type in PADDING_OFFSET_POSITIONS:
        limit -= (config.pad_token_id or 0) + 1
    return limit


def is_local_model(spec: ModelSpec) -> bool:
    """Whether the base model is a folder on this machine (a path, or a pkg:// reference), not a Hub id."""
    return os.path.exists(local_path(spec.name_or_path, "model.name_or_path"))


def config_if_reachable(spec: ModelSpec) -> PretrainedConfig | None:
    """The base model's config: from a local folder (its errors are the user's to fix), or from the Hub when
    it can be reached; None for a Hub id that cannot be reached (offline)."""
    if is_local_model(spec):
        return load_config(spec)
    try:
        return load_config(spec)
    except PeftuneError:
        return None


def check_model_if_reachable(recipe: Recipe) -> bool:
    """`check_model` without the weights; False when the config of a Hub model cannot be reached."""
    config = config_if_reachable(recipe.model)
    if config is None:  # a Hub id while offline: checked when training starts instead
        return False
    check_model(recipe, config)
    return True


def load_tokenizer(spec: ModelSpec | str) -> Any:
    """The tokenizer of the base model (a spec) or of a saved folder (a path)."""
    from transformers import AutoTokenizer

    if isinstance(spec, str):
        path, revision, remote_code = spec, None, False
    else:
        path = local_path(spec.name_or_path, "model.name_or_path")
        revision, remote_code = spec.revision, spec.trust_remote_code
    _check_reference(path)
    try:
        return AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=remote_code)
    except (OSError, ValueError) as err:
        raise PeftuneError(
            f"cannot load the tokenizer of {path!r}: {first_line(err)}; check model.name_or_path"
        ) from None


def load_base_model(spec: ModelSpec, labels: Labels) -> tuple[PreTrainedModel, list[str]]:
    """Load the checkpoint with a head sized for `labels`; also return the newly initialised modules.

    With `load_in_8bit`, the linear layers load as bitsandbytes int8, except inside the new modules:
    those are trained in full, and an int8 head crashes LoRA training or makes it diverge.
    """
    from transformers import AutoModelForSequenceClassification

    quantization = None
    if spec.load_in_8bit:
        from transformers import BitsAndBytesConfig

        # The head and the pooler it reads may be trained in full (head_modules): loaded as they are, not in int8.
        # Names match as a module path's start or end: "pooler.dense" is BERT's `bert.pooler.dense`.
        skip = [*HEAD_NAMES, "pooler", "pooler.dense"]
        quantization = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    path = local_path(spec.name_or_path, "model.name_or_path")
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path,
            revision=spec.revision,
            trust_remote_code=spec.trust_remote_code,
            num_labels=labels.num_labels,
            id2label=labels.id2label,
            label2id=labels.label2id,
            problem_type="regression" if labels.problem_type == "regression" else "single_label_classification",
            # A checkpoint that is already a classifier with another label count gets a fresh head.
            ignore_mismatched_sizes=True,
            quantization_config=quantization,
            output_loading_info=True,
            use_safetensors=None if spec.allow_pickle else True,
        )
    except (OSError, ValueError) as err:
        if not spec.allow_pickle and "safetensors" in str(err):
            raise PeftuneError(
                f"model {spec.name_or_path!r} has no safetensors weights; pickle weight files (.bin) can run code "
                "when loaded: convert the checkpoint to safetensors, or set model.allow_pickle: true if you trust it"
            ) from None
        raise PeftuneError(
            f"cannot load model {spec.name_or_path!r}: {first_line(err)}; "
            "check model.name_or_path (a Hub id or a local folder with config.json and weights)"
        ) from None
    new_keys = set(info["missing_keys"]) | {_key_of(k) for k in info["mismatched_keys"]}
    fresh = fresh_modules(model, new_keys)
    if fresh:
        log.info("newly initialised (trained in full): %s", ", ".join(fresh))
    if spec.load_in_8bit:
        _full_precision(model, fresh)
    pooling.apply(model, spec.pooling)
    return model, fresh


def fresh_modules(model: nn.Module, new_keys: set[str]) -> list[str]:
    """The largest modules all of whose parameters are newly initialised (the head, and e.g. a pooler)."""
    params = [name for name, _ in model.named_parameters()]
    new = {key for key in new_keys if key in set(params)}
    found: set[str] = set()
    for key in sorted(new):
        parts = key.split(".")[:-1]
        for depth in range(1, len(parts) + 1):
            prefix = ".".join(parts[:depth])
            if all(p in new for p in params if p.startswith(prefix + ".")):
                found.add(prefix)
                break
    return sorted(found)


def attach_method(model: PreTrainedModel, recipe: Recipe, fresh: list[str]) -> PreTrainedModel | PeftModel:
    """Wrap the model for the recipe's method: unchanged for full fine-tuning, a peft model otherwise."""
    method = METHODS[recipe.method]
    if not method.is_adapter:
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if recipe.model.load_in_8bit:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=bool(recipe.train.get("gradient_checkpointing")),
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    trained = head_modules(model, fresh, pooler=method.trains_pooler)
    config = method.peft_config(recipe.method_block, model=model, modules_to_save=trained)
    try:
        return _with_attention_prefix(get_peft_model(model, config))
    except (ValueError, TypeError) as err:
        raise PeftuneError(f"cannot apply {recipe.method} to this model: {first_line(err)}") from None


def _with_attention_prefix(model: PeftModel) -> PeftModel:
    """A prefix-tuning model feeds its prefixes into attention itself (peftune.prefix); other methods as they are."""
    from peft.utils import PeftType

    if model.active_peft_config.peft_type != PeftType.PREFIX_TUNING:
        return model
    from peftune import prefix

    return prefix.install(model)


def head_modules(model: nn.Module, fresh: list[str], pooler: bool = True) -> list[str]:
    """Modules trained in full with an adapter: the new ones, the classification head, and (`pooler`) its pooler.

    BERT-style models pool the first token through a dense layer inside the encoder (`bert.pooler`); other
    families put that layer in their head (RoBERTa's and ELECTRA's `classifier.dense`, DistilBERT's
    `pre_classifier`, DeBERTa's `pooler`), which is new and trained in full. Training BERT's in full too makes
    every family's head the same (as AdapterHub's heads do), and matters where the checkpoint's pooler was never
    trained: sentence-transformers models such as all-MiniLM-L6-v2 pool by the mean and leave it at its random start.
    Methods whose learning rates are far above a pretrained layer's scale (prefix and prompt tuning) leave it out.
    """
    names = {*fresh, *(name for name in HEAD_NAMES if hasattr(model, name))}
    prefix = str(getattr(model, "base_model_prefix", ""))
    if pooler and prefix and getattr(getattr(model, prefix, None), "pooler", None) is not None:
        names.add(f"{prefix}.pooler")
    return sorted(name for name in names if not any(name.startswith(other + ".") for other in names))


def load_run(run: RunDir) -> tuple[Any, Any, Labels]:
    """The trained model of a run folder (base plus adapter, or the full model), its tokenizer and labels."""
    from transformers import AutoModelForSequenceClassification

    recipe = load_recipe(str(run.recipe_file))
    labels = Labels.read(run.labels_file)
    method = METHODS[recipe.method]
    weights = run.weights_dir(method.is_adapter)
    tokenizer = load_tokenizer(str(weights))
    if not method.is_adapter:
        model = pooling.apply(AutoModelForSequenceClassification.from_pretrained(weights, use_safetensors=True))
    else:
        from peft import PeftModel

        base, _ = load_base_model(recipe.model, labels)
        model = _with_attention_prefix(PeftModel.from_pretrained(base, str(weights)))
    model.eval()
    return model, tokenizer, labels


@dataclass
class LoadedModel:
    """A trained classifier ready for inference, with what peftune knows about it."""

    model: Any
    tokenizer: Any
    labels: Labels
    recipe: Recipe | None  # None for a model peftune did not write (a Hub id)
    samples: list[dict[str, Any]]  # eval rows kept with it, for checks; may be empty


def load_target(target: str | Path) -> LoadedModel:
    """Load what `eval`, `predict`, `merge` and `export` work on: a run folder, a model folder, or a Hub id."""
    path = Path(target).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return _load_model_folder(path)
        if (path / RECIPE_FILE).is_file():
            run = open_run(path)
            model, tokenizer, labels = load_run(run)
            recipe = load_recipe(str(run.recipe_file))
            samples = run.read_samples() if run.samples_file.is_file() else []
            return LoadedModel(model, tokenizer, labels, recipe, samples)
        raise PeftuneError(f"{path} holds neither a peftune run (recipe.yaml) nor a model (config.json)")
    if path.exists() or _looks_local(str(target)):
        raise PeftuneError(f"{target} is not a run folder or a model folder; give the folder `peftune train` wrote")
    pushed = pushed_run(str(target))
    return load_target(pushed) if pushed else _load_hub_model(str(target))


def pushed_run(repo_id: str) -> Path | None:
    """A run `peftune push` put on the Hub (it has recipe.yaml), downloaded; None for any other Hub model."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        hf_hub_download(repo_id, RECIPE_FILE)
    except (HfHubHTTPError, OSError, ValueError):  # not there, not a peftune repository, or offline
        return None
    return Path(snapshot_download(repo_id))


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


def _labels_of(config: Any) -> Labels:
    if config.problem_type == "regression" or config.num_labels == 1:
        return Labels(names=None)
    return Labels(names=tuple(config.id2label[i] for i in range(config.num_labels)))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Trainable and total parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def memory_footprint(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (int8 weights count one byte each)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _full_precision(model: PreTrainedModel, fresh: list[str]) -> None:
    """Swap the int8 linear layers inside the new modules for plain ones with the same initial weights."""
    import bitsandbytes as bnb
    from torch import nn

    for prefix in fresh:
        for name, module in list(model.get_submodule(prefix).named_modules()):
            if not isinstance(module, bnb.nn.Linear8bitLt):
                continue
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            if module.weight.dtype.is_floating_point:  # not quantized yet: keep its random initialisation
                linear.weight.data.copy_(module.weight.data.float())
                if module.bias is not None:
                    linear.bias.data.copy_(module.bias.data.float())
            else:
                model._init_weights(linear)
            path = f"{prefix}.{name}" if name else prefix
            parent, _, attribute = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attribute, linear)


def _key_of(entry: Any) -> str:
    return entry[0] if isinstance(entry, tuple) else entry
