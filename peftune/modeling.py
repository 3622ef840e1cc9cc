"""Models: load the base checkpoint with a classification head, find what is new, attach the method."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from peftune.data import Labels
from peftune.errors import PeftuneError, first_line
from peftune.methods import METHODS
from peftune.recipe import ModelSpec, Recipe, local_path

if TYPE_CHECKING:
    from peft import PeftModel
    from torch import nn
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

# Attribute names of the classification head on transformers' *ForSequenceClassification models.
HEAD_NAMES = ("classifier", "score")


def load_tokenizer(spec: ModelSpec) -> Any:
    """The base model's tokenizer."""
    from transformers import AutoTokenizer

    path = local_path(spec.name_or_path, "model.name_or_path")
    try:
        return AutoTokenizer.from_pretrained(path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as err:
        raise PeftuneError(
            f"cannot load the tokenizer of {spec.name_or_path!r}: {first_line(err)}; check model.name_or_path"
        ) from None


def load_base_model(spec: ModelSpec, labels: Labels) -> tuple[PreTrainedModel, list[str]]:
    """Load the checkpoint with a head sized for `labels`; also return the newly initialised modules."""
    from transformers import AutoModelForSequenceClassification

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
            output_loading_info=True,
        )
    except (OSError, ValueError) as err:
        raise PeftuneError(
            f"cannot load model {spec.name_or_path!r}: {first_line(err)}; "
            "check model.name_or_path (a Hub id or a local folder with config.json and weights)"
        ) from None
    new_keys = set(info["missing_keys"]) | {_key_of(k) for k in info["mismatched_keys"]}
    fresh = fresh_modules(model, new_keys)
    if fresh:
        log.info("newly initialised (trained in full): %s", ", ".join(fresh))
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
    from peft import get_peft_model

    heads = sorted({*fresh, *(name for name in HEAD_NAMES if hasattr(model, name))})
    config = method.peft_config(recipe.method_block, model=model, modules_to_save=heads)
    try:
        return get_peft_model(model, config)
    except (ValueError, TypeError) as err:
        raise PeftuneError(f"cannot apply {recipe.method} to this model: {first_line(err)}") from None


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Trainable and total parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def _key_of(entry: Any) -> str:
    return entry[0] if isinstance(entry, tuple) else entry
