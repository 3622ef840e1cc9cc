"""Recipes: the schema, YAML loading, ``key=value`` overrides and validation.

Config flows one way: a recipe name or path is read as YAML, overrides are applied to that mapping, the
schema below checks our own keys strictly, and ``check_passthrough`` checks the keys handed to peft and
``TrainingArguments`` by building those objects. Every default lives here or in ``methods.METHODS``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.resources
import logging
import os
import re
import shutil
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from peftune.errors import PeftuneError, first_line
from peftune.methods import METHODS
from peftune.metrics import BUILTIN

# The `train` block: TrainingArguments keyword arguments. No learning rate here: it comes from the
# method's block unless the recipe sets `train.learning_rate`, which then applies to every method.
TRAIN_DEFAULTS: dict[str, Any] = {
    "num_train_epochs": 3,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 64,
    "warmup_steps": 0.06,  # a float below 1 is a fraction of the training steps
    "weight_decay": 0.01,
    "lr_scheduler_type": "linear",
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 1,
    "logging_steps": 50,
    "report_to": "none",
}

# Keys of the `train` block that peftune reads itself rather than passing to TrainingArguments.
TRAIN_OWN = (
    "class_weights",  # balanced, or one weight per label in label order (peftune.losses)
    "batch_tokens",  # training batches of up to this many tokens, padding included, or auto (peftune.batching)
)
# TrainingArguments keys that peftune sets itself, and where a recipe sets them instead.
TRAIN_OWNED = {"output_dir": "the top-level output_dir key", "seed": "the top-level seed key"}
# Keys that older transformers releases had and that recipes found online still use.
TRAIN_RENAMED = {
    "warmup_ratio": "warmup_steps (a float below 1 is a ratio)",
    "evaluation_strategy": "eval_strategy",
    "group_by_length": "train_sampling_strategy: group_by_length",
}

_log = logging.getLogger(__name__)

# How a run's base is named to people (summary line, model card): "" for a float base.
ON_BASE = {"none": "", "8bit": " on an 8-bit base", "4bit": " on a 4-bit (NF4) base"}

PACKAGE_SCHEME = "pkg://"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ModelSpec(_Strict):
    """The pretrained checkpoint to fine-tune."""

    name_or_path: str
    revision: str | None = None
    # The base's linear layers as bitsandbytes int8 or NF4 (QLoRA), for adapter methods; the head stays float.
    quantization: Literal["none", "8bit", "4bit"] = "none"
    # What the head reads: the first token (transformers' heads) or the mean of all tokens (peftune.pooling);
    # null: what the checkpoint was trained with (the mean for sentence-transformers models that average).
    pooling: Literal["cls", "mean"] | None = None
    # Every dropout probability of the model's config (BERT's hidden and attention dropout, DistilBERT's `dropout`,
    # the head's); null: the method's choice (LoRA turns it off, the others keep the checkpoint's).
    dropout: float | None = Field(default=None, ge=0.0, lt=1.0)
    trust_remote_code: bool = False
    # Pickle weight files (pytorch_model.bin) can run code when loaded: only safetensors unless this is set.
    allow_pickle: bool = False

    @model_validator(mode="before")
    @classmethod
    def _load_in_8bit_is_quantization(cls, data: Any) -> Any:
        """`load_in_8bit` (before 0.2) is `quantization: 8bit`: accepted with a line saying so."""
        if not isinstance(data, dict) or "load_in_8bit" not in data:
            return data
        data = dict(data)
        eight_bit = data.pop("load_in_8bit")
        if not isinstance(eight_bit, bool):
            raise ValueError(
                f"model.load_in_8bit must be true or false, got {eight_bit!r}; better, set model.quantization"
            )
        wanted = "8bit" if eight_bit else "none"
        if data.setdefault("quantization", wanted) != wanted:
            raise ValueError(
                f"model.load_in_8bit={str(eight_bit).lower()} contradicts model.quantization={data['quantization']}; "
                "drop load_in_8bit (model.quantization replaces it)"
            )
        if eight_bit:
            _log.warning("model.load_in_8bit is deprecated: write model.quantization: 8bit instead")
        return data

    @property
    def quantized(self) -> bool:
        return self.quantization != "none"


class DataSpec(_Strict):
    """Where the examples come from and how they become model inputs."""

    source: str | None = None
    config: str | None = None
    files: dict[str, str | list[str]] | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    train_split: str = "train"
    eval_split: str = "validation"
    validation_size: float = Field(0.1, gt=0, lt=1)
    text_columns: list[str] = Field(default_factory=lambda: ["text"], min_length=1, max_length=2)
    label_column: str = "label"
    labels: list[str] | None = None
    # multi_label: each row has any number of the labels (a list per row, or one string split at
    # label_separator), trained with a sigmoid per label; a label is predicted when its score passes its threshold.
    problem_type: Literal["classification", "multi_label", "regression"] | None = None
    label_separator: str | None = Field(None, min_length=1)
    # multi_label: one threshold for every label, one per label (in label order), or tune: each label's threshold
    # chosen for its best F1 on the eval split after training (saved with the run in labels.json).
    thresholds: float | list[float] | Literal["tune"] = 0.5
    max_length: int = Field(128, gt=0)
    # Texts longer than max_length: cut to it (truncate), or split into overlapping windows of max_length tokens
    # (chunk) that train with the text's label and whose logits are pooled into one prediction per text.
    long_text: Literal["truncate", "chunk"] = "truncate"
    stride: int | None = Field(None, gt=0)  # tokens consecutive windows share; None: a quarter of max_length
    window_pooling: Literal["mean", "max"] = "mean"
    # Training batches of similar-length examples in random order (less padding); false: plain random batches.
    bucket_by_length: bool = True
    max_train_samples: int | None = Field(None, gt=0)
    max_eval_samples: int | None = Field(None, gt=0)

    @field_validator("text_columns", mode="before")
    @classmethod
    def _one_column_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _has_a_source(self) -> DataSpec:
        if not self.source and not self.files:
            raise ValueError("data needs a source (a Hub dataset id) or files ({train: path, ...})")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError("data.labels has duplicates; list each label name once")
        return self

    @model_validator(mode="after")
    def _windows_fit(self) -> DataSpec:
        if self.long_text == "chunk" and len(self.text_columns) == 2:
            raise ValueError(
                "data.long_text=chunk splits single texts into windows, and this recipe reads sentence pairs; "
                "set data.long_text=truncate"
            )
        if self.stride is not None and self.long_text != "chunk":
            raise ValueError("data.stride sets the overlap of chunked windows; set data.long_text=chunk, or drop it")
        if self.stride is not None and self.stride >= self.max_length:
            raise ValueError(
                f"data.stride ({self.stride}) is the tokens consecutive windows share and must be smaller than the "
                f"window, data.max_length ({self.max_length}); try data.stride={self.max_length // 4}"
            )
        return self

    @model_validator(mode="after")
    def _thresholds_are_probabilities(self) -> DataSpec:
        values = [] if self.thresholds == "tune" else self.thresholds
        for value in values if isinstance(values, list) else [values]:
            if not 0 < value < 1:
                raise ValueError(f"data.thresholds are probabilities between 0 and 1 (or tune), got {value!r}")
        return self

    @property
    def window_stride(self) -> int | None:
        """Tokens consecutive windows share when long texts are chunked; None when they are cut."""
        if self.long_text != "chunk":
            return None
        return self.stride if self.stride is not None else self.max_length // 4


class _Run(_Strict):
    """What a recipe names before its method blocks."""

    name: str
    description: str = ""
    seed: int = 42
    model: ModelSpec
    data: DataSpec
    method: str = "lora"


if TYPE_CHECKING:  # mypy sees no block fields: they are read by name (`Recipe.block`)
    _WithBlocks = _Run
else:  # one block per registered method (methods.METHODS), in its order: `lora: {r: 8, ...}`
    _WithBlocks = create_model(
        "_WithBlocks",
        __base__=_Run,
        **{name: (dict[str, Any], Field(default_factory=dict, validate_default=True)) for name in METHODS},
    )


class Recipe(_WithBlocks):
    """A whole run: base model, data, method, the method blocks, training arguments."""

    train: dict[str, Any] = Field(default_factory=dict, validate_default=True)
    metrics: list[str] | None = Field(None, min_length=1)
    output_dir: str | None = None

    @field_validator("name")
    @classmethod
    def _a_folder_name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise ValueError(
                f"{name!r} cannot name a run folder; use letters, digits, '.', '_' and '-' (no slashes or spaces)"
            )
        return name

    @field_validator("metrics")
    @classmethod
    def _known_or_evaluate_metric(cls, names: list[str] | None) -> list[str] | None:
        # A name close to a built-in metric is a typo; any other name goes to evaluate.load at run time.
        for name in names or []:
            hint = _did_you_mean(name, BUILTIN)
            if name not in BUILTIN and hint:
                raise ValueError(f"unknown metric {name!r}{hint}")
        return names

    @field_validator("method")
    @classmethod
    def _registered_method(cls, name: str) -> str:
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}{_did_you_mean(name, METHODS)}; use one of: {', '.join(METHODS)}")
        return name

    @model_validator(mode="after")
    def _method_chooses_the_dropout(self) -> Recipe:
        """`model.dropout` left null takes the method's (LoRA: off), so that recipe.yaml says what ran."""
        if self.model.dropout is None and METHODS[self.method].model_dropout is not None:
            self.model.dropout = METHODS[self.method].model_dropout
        return self

    @model_validator(mode="after")
    def _quantized_needs_an_adapter(self) -> Recipe:
        if self.model.quantized and not METHODS[self.method].is_adapter:
            q = self.model.quantization
            raise ValueError(
                f"model.quantization={q} needs an adapter method: {q} weights cannot be trained in full; "
                "use method=lora, or model.quantization=none"
            )
        return self

    @model_validator(mode="after")
    def _loraplus_ratio_is_a_ratio(self) -> Recipe:
        ratio = self.block("lora").get("loraplus_lr_ratio")
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio < 1):
            raise ValueError(
                f"lora.loraplus_lr_ratio is the B matrices' learning rate over the A matrices', a number of at "
                f"least 1 (LoRA+ suggests 16), got {ratio!r}; set it to null for plain LoRA"
            )
        return self

    @model_validator(mode="after")
    def _class_weights_are_weights(self) -> Recipe:
        weights = self.train.get("class_weights")
        numbers = isinstance(weights, list) and all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in weights
        )
        if weights is not None and weights != "balanced" and not (numbers and any(weights)):
            raise ValueError(
                f"train.class_weights is balanced or a list of weights, one per label (numbers of at least 0, "
                f"not all 0), got {weights!r}"
            )
        return self

    @model_validator(mode="after")
    def _batch_tokens_hold_a_text(self) -> Recipe:
        budget = self.train.get("batch_tokens")
        if budget is None:
            return self
        if budget != "auto" and (
            isinstance(budget, bool) or not isinstance(budget, int) or budget < self.data.max_length
        ):
            raise ValueError(
                f"train.batch_tokens is the most tokens a training batch holds, padding included: auto, or a whole "
                f"number of at least data.max_length ({self.data.max_length}) so that the longest text fits, got "
                f"{budget!r}; set it to null for batches of train.per_device_train_batch_size texts"
            )
        strategy = self.train.get("train_sampling_strategy", "random")
        if strategy != "random":
            raise ValueError(
                f"train.batch_tokens forms its own batches of similar lengths and cannot be combined with "
                f"train.train_sampling_strategy={strategy}; drop one of them"
            )
        return self

    @model_validator(mode="after")
    def _method_epochs_are_epochs(self) -> Recipe:
        for name in METHODS:
            epochs = self.block(name).get("num_train_epochs")
            if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or epochs <= 0):
                raise ValueError(
                    f"{name}.num_train_epochs replaces train.num_train_epochs when method={name}: a number above 0, "
                    f"got {epochs!r}; set it to null to train train.num_train_epochs epochs"
                )
        return self

    @model_validator(mode="after")
    def _sizes_are_positive(self) -> Recipe:
        # peft accepts these in its configs and fails only when it builds the model, after the data is loaded.
        for name, method in METHODS.items():
            for key in method.counts:
                value = self.block(name).get(key)
                if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                    raise ValueError(f"{name}.{key} must be a whole number of at least 1, got {value!r}")
        return self

    @model_validator(mode="after")
    def _projected_prefixes_are_not_reloaded(self) -> Recipe:
        # Trainer would fail after the last epoch, loading the best checkpoint back.
        problem = METHODS[self.method].checkpoint_problem(self.method_block)
        if self.train.get("load_best_model_at_end") and problem:
            raise ValueError(
                f"train.load_best_model_at_end cannot keep the best checkpoint: {problem}; set one of them to false"
            )
        return self

    @field_validator(*METHODS, "train", mode="before")
    @classmethod
    def _over_defaults(cls, value: Any, info: Any) -> Any:
        defaults = TRAIN_DEFAULTS if info.field_name == "train" else METHODS[info.field_name].defaults
        if value is None:
            return dict(defaults)
        if not isinstance(value, dict):
            return value
        merged = {**defaults, **value}
        follows = METHODS[info.field_name].follows if info.field_name in METHODS else ()
        for key, source, factor in follows:  # a key tied to another the block sets (LoRA's alpha to its rank)
            if source in value and key not in value and isinstance(value[source], int):
                merged[key] = factor * value[source]
        return merged

    def block(self, method: str) -> dict[str, Any]:
        """A method's block: its defaults with the recipe's keys over them."""
        return dict(getattr(self, method))

    @property
    def method_block(self) -> dict[str, Any]:
        """The block of the method this run uses."""
        return self.block(self.method)

    @property
    def learning_rate(self) -> float:
        """`train.learning_rate` when the recipe sets it, else the method's own rate."""
        return self.train.get("learning_rate", self.method_block["learning_rate"])

    @property
    def num_train_epochs(self) -> float:
        """The method block's `num_train_epochs` when it sets one, else `train.num_train_epochs`."""
        own = self.method_block.get("num_train_epochs")
        return own if own is not None else self.train["num_train_epochs"]

    def training_arguments(self, output_dir: str) -> dict[str, Any]:
        """Keyword arguments for ``transformers.TrainingArguments``."""
        passed = {key: value for key, value in self.train.items() if key not in TRAIN_OWN}
        return {**passed, "learning_rate": self.learning_rate, "num_train_epochs": self.num_train_epochs,
                "seed": self.seed, "output_dir": output_dir}  # fmt: skip

    def to_yaml(self) -> str:
        """The resolved recipe as YAML, every default filled in."""
        return yaml.safe_dump(self.model_dump(), sort_keys=False, allow_unicode=True)

    def sha256(self) -> str:
        """A fingerprint of the resolved recipe: two runs with the same one trained the same way."""
        return hashlib.sha256(self.to_yaml().encode()).hexdigest()

    def same_as_saved(self, path: Path) -> bool:
        """Whether a run's saved recipe.yaml describes this recipe, as far as the run is concerned.

        The saved file is read back through the schema, so a key added to peftune since (with its default)
        does not make an old run look different. What never reached the run is not compared: its name and
        folder (where it went, not how it trained) and the blocks of the methods it did not run; the learning
        rate and epochs are compared as the run used them, wherever the recipe set them.
        """
        try:
            raw = _read_raw(path)
            model = raw.get("model")
            dropout_unset = not isinstance(model, dict) or model.get("dropout") is None
            saved = parse_recipe(raw)
        except PeftuneError:
            return False
        if dropout_unset and saved.model.dropout is not None:
            # Saved with `dropout` null or absent: a run from before a null took the method's choice (LoRA's 0),
            # which trained with the checkpoint's dropout (a run since always has its value written).
            saved = saved.model_copy(update={"model": saved.model.model_copy(update={"dropout": None})})
        return saved._as_trained() == self._as_trained()

    def _as_trained(self) -> dict[str, Any]:
        """The resolved settings that reach a run of this recipe (see `same_as_saved`)."""
        settings = self.model_dump(exclude={"name", "output_dir", *(name for name in METHODS if name != self.method)})
        if self.model.pooling is None:  # a run records the checkpoint's pooling it resolved to
            from peftune.pooling import of_checkpoint

            settings["model"]["pooling"] = of_checkpoint(self.model)
        used = {"learning_rate": self.learning_rate, "num_train_epochs": self.num_train_epochs}
        for key in used:  # set in the method's block or the train block: compared where the run took it from
            settings[self.method].pop(key, None)
        settings["train"].update(used)
        return settings


# --- YAML ---------------------------------------------------------------------------------------------


class _YamlLoader(yaml.SafeLoader):
    """Safe YAML with the YAML 1.2 readings that matter in a recipe: `5e-4` is a float, only true/false
    are booleans (`yes`, `no`, `on` stay strings), and a duplicate key is an error."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _construct_mapping_once(loader: _YamlLoader, node: yaml.MappingNode) -> dict:
    loader.flatten_mapping(node)
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node)


_YamlLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping_once)


def parse_yaml(text: str, where: str) -> Any:
    """Parse YAML text safely; `where` names the source in the error message."""
    try:
        return yaml.load(text, Loader=_YamlLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise PeftuneError(f"{where} is not valid YAML{at}: {problem}; fix the YAML syntax") from None


# --- finding and loading ------------------------------------------------------------------------------


def recipes_dir() -> Path:
    """The folder of shipped recipes: inside the installed wheel, or `recipes/` of a source checkout."""
    packaged = Path(__file__).parent / "recipes"
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "recipes"


def shipped_recipes() -> dict[str, Path]:
    """Shipped recipe names and their files: a folder listing, no registry."""
    return {path.stem: path for path in sorted(recipes_dir().glob("*.yaml"))}


def find_recipe(ref: str) -> Path:
    """A recipe file from a path or a shipped recipe's name."""
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    shipped = shipped_recipes()
    if ref in shipped:
        return shipped[ref]
    if path.suffix in (".yaml", ".yml") or os.sep in ref:
        raise PeftuneError(f"recipe file {ref} not found; check the path, or run `peftune recipes` for names")
    raise PeftuneError(
        f"unknown recipe {ref!r}{_did_you_mean(ref, shipped)}; "
        "run `peftune recipes` for the shipped ones, or give a path to a YAML file"
    )


def load_recipe(ref: str, overrides: Sequence[str] = ()) -> Recipe:
    """Read a recipe (name or path), apply `key=value` overrides, and check it against the schema."""
    path = find_recipe(ref)
    raw = _read_raw(path)
    for item in overrides:
        apply_override(raw, item)
    _anchor_paths(raw, Path.cwd())
    return parse_recipe(raw)


def _read_raw(path: Path) -> dict[str, Any]:
    """A recipe file as a mapping, its relative paths anchored at its folder, its name defaulting to the file's."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise PeftuneError(f"cannot read recipe {path}: {err}; check the file") from None
    raw = parse_yaml(text, f"recipe {path}")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise PeftuneError(f"recipe {path} must be a YAML mapping of keys to values, not a {type(raw).__name__}")
    _anchor_paths(raw, path.parent)
    raw.setdefault("name", path.stem)
    return raw


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set one `dotted.key=value` override in a raw recipe mapping; the value is read as YAML."""
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise PeftuneError(f"override {item!r} is not key=value; write it like train.num_train_epochs=1")
    value = parse_yaml(text, f"the value of override {key}") if text.strip() else None
    if value == "" and text.strip() in ("|", ">"):  # YAML reads a lone | or > as an empty block: the character
        value = text.strip()
    parts = key.split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            parent = ".".join(parts[: depth + 1])
            raise PeftuneError(f"override {key}: {parent} is {child!r}, not a mapping; override {parent} itself")
        node = child
    node[parts[-1]] = value


def parse_recipe(raw: dict[str, Any]) -> Recipe:
    """Validate a raw recipe mapping against the schema; one clear line on the first problem."""
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise PeftuneError(_schema_message(err, raw)) from None


def check_passthrough(recipe: Recipe) -> None:
    """Check the keys passed to peft and TrainingArguments by building those objects (no weights load)."""
    import peft
    from transformers import TrainingArguments

    for name, method in METHODS.items():
        block = getattr(recipe, name)
        if method.peft_config_class is None:
            _check_keys(name, block, set(method.own_keys), {})
            continue
        config_class = getattr(peft, method.peft_config_class)
        known = {f.name for f in dataclasses.fields(config_class) if f.init} | set(method.own_keys)
        _check_keys(name, block, known - {"task_type"}, {"task_type": "peftune sets it (sequence classification)"})
        _check_types(name, block, config_class)
        try:
            method.peft_config(block)
        except (TypeError, ValueError) as err:
            raise PeftuneError(f"{name}: {first_line(err)}; fix the {name} block") from None

    known = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    _check_keys("train", recipe.train, (known - set(TRAIN_OWNED)) | set(TRAIN_OWN), {**TRAIN_OWNED, **TRAIN_RENAMED})
    _check_types("train", recipe.train, TrainingArguments)
    try:
        TrainingArguments(**recipe.training_arguments(output_dir="unused"))
    except (TypeError, ValueError) as err:
        raise PeftuneError(f"train: {first_line(err)}; fix the train block") from None


@dataclass(frozen=True)
class RecipeSummary:
    """One line of `peftune recipes`."""

    name: str
    task: str
    model: str
    method: str
    description: str


def list_recipes() -> list[RecipeSummary]:
    """Summaries of the shipped recipes, by name."""
    summaries = []
    for name, path in shipped_recipes().items():
        recipe = load_recipe(str(path))
        first_file = next(iter(recipe.data.files.values()), None) if recipe.data.files else None
        if isinstance(first_file, list):
            first_file = first_file[0]
        task = recipe.data.config or recipe.data.source or Path(str(first_file)).parent.name
        summaries.append(RecipeSummary(name, task, recipe.model.name_or_path, recipe.method, recipe.description))
    return summaries


def copy_recipe(ref: str, dest: str | Path, force: bool = False) -> Path:
    """Copy a recipe file (comments and all) to `dest`, a file or a folder; refuse to overwrite unless forced."""
    source = find_recipe(ref)
    target = Path(dest)
    if target.is_dir():
        target = target / source.name
    if target.exists() and not force:
        raise PeftuneError(f"{target} already exists; choose another destination or pass --force to overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def local_path(value: str, key: str) -> str:
    """Expand `$VARS` and `pkg://package/path` in a path-like recipe value (`key` names it in errors)."""
    expanded = os.path.expandvars(value)
    unset = re.search(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", expanded)
    if unset:
        var = unset.group(1)
        raise PeftuneError(f"{key} uses ${var}, which is not set; export {var}=... or override {key}=PATH")
    if not expanded.startswith(PACKAGE_SCHEME):
        return expanded
    package, _, inner = expanded[len(PACKAGE_SCHEME) :].partition("/")
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        dist = package.replace("_", "-")
        raise PeftuneError(
            f"{key} refers to Python package {package!r}, which is not installed; pip install {dist}"
        ) from None
    return str(root / inner) if inner else str(root)


# --- helpers ------------------------------------------------------------------------------------------


def _anchor_paths(raw: dict[str, Any], base: Path) -> None:
    """Make relative data files (and `./`-style model paths) absolute, relative to `base`."""

    def anchor(path: Any) -> Any:
        if isinstance(path, str) and "\0" in path:
            raise PeftuneError(
                f"the path {path!r} holds a NUL character, which no file name can; fix the recipe or override"
            )
        if not isinstance(path, str) or "$" in path or "://" in path or os.path.isabs(os.path.expanduser(path)):
            return os.path.expanduser(path) if isinstance(path, str) and path.startswith("~") else path
        return str((base / path).resolve())

    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("files"), dict):
        data["files"] = {
            split: [anchor(p) for p in paths] if isinstance(paths, list) else anchor(paths)
            for split, paths in data["files"].items()
        }
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("name_or_path"), str):
        name = model["name_or_path"]
        if name.startswith(("./", "../", "~")):
            model["name_or_path"] = anchor(name)


def _check_keys(block: str, values: dict[str, Any], known: set[str], refused: dict[str, str]) -> None:
    for key in values:
        if key in refused:
            raise PeftuneError(f"{block}.{key} is not accepted here; use {refused[key]}")
        if key not in known:
            hint = _did_you_mean(key, known)
            raise PeftuneError(f"unknown key {_shown(f'{block}.{key}')}{hint}; fix the {block} block")


def _check_types(block: str, values: dict[str, Any], config_class: type) -> None:
    """Check values against the annotations of the dataclass they are passed to (peft checks few itself)."""
    hints = typing.get_type_hints(config_class)
    for key, value in values.items():
        if key not in hints:
            continue
        try:
            TypeAdapter(hints[key]).validate_python(value, strict=True)
        except ValidationError as err:
            message = err.errors()[0]["msg"]
            raise PeftuneError(
                f"{block}.{key}: {message[0].lower()}{message[1:]}, got {value!r}; fix the {block} block"
            ) from None


def _shown(key: str) -> str:
    """A key as typed, quoted when it has spaces or invisible characters (or is empty)."""
    return key if key.isprintable() and key and " " not in key else repr(key)


def _did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _schema_message(err: ValidationError, raw: dict[str, Any]) -> str:
    first = err.errors()[0]
    loc = _data_location(first["loc"], raw)
    key = ".".join(str(part) for part in loc) or "recipe"
    if first["type"] == "extra_forbidden":
        known = _schema_keys(loc[:-1])
        return f"unknown recipe key {_shown(key)}{_did_you_mean(str(loc[-1]), known)}; fix or remove it"
    if first["type"] == "missing":
        return f"recipe key {key} is required; add it to the recipe or pass {key}=..."
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] in _BOUNDS:  # pydantic's "Input should be greater than 0", in our words
        bound = next(iter(first.get("ctx", {}).values()), "")
        return f"recipe key {key} must be {_BOUNDS[first['type']]} {bound}, got {first.get('input')!r}"
    if first["type"].endswith("_type") or first["type"] in ("literal_error", "string_pattern_mismatch"):
        return f"recipe key {key}: {message[0].lower()}{message[1:]}, got {first.get('input')!r}"
    return f"recipe key {key}: {message}" if loc else message


_BOUNDS = {"greater_than": "greater than", "greater_than_equal": "at least", "less_than": "less than",
           "less_than_equal": "at most"}  # fmt: skip


def _data_location(loc: tuple, raw: Any) -> tuple:
    """The part of a pydantic error location that names real keys (it also names union members)."""
    kept, node = [], raw
    for part in loc:
        if (isinstance(node, dict) and part in node) or (
            isinstance(node, list) and isinstance(part, int) and part < len(node)
        ):
            node = node[part]
        elif node is raw or isinstance(node, dict):
            node = None  # a key that is not in the data (missing, or unknown and already reported)
        else:
            continue
        kept.append(part)
    return tuple(kept)


def _schema_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in loc:
        annotation = model.model_fields[str(part)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)
