"""Fine-tuning methods, one small unit each, registered in ``METHODS``.

A method is the defaults of its recipe block and the peft config class the block is passed to. Every
block carries its own ``learning_rate``: adapters want rates ten to a hundred times larger than full
fine-tuning, so switching ``method`` alone gives a fair run. Importing this module is cheap; peft is
imported only when a config is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peftune.errors import PeftuneError

if TYPE_CHECKING:
    from peft import PeftConfig
    from torch import nn
    from transformers import PreTrainedModel

# Keys of a method block that peftune reads itself rather than passing to peft.
OWN_KEYS = ("learning_rate",)

# LoRA targets where peft has no default for the architecture (used when `lora.target_modules` is null).
LORA_TARGETS = {"distilbert": ["q_lin", "v_lin"]}


@dataclass(frozen=True)
class Method:
    """One way of fine-tuning: its recipe block's defaults and the peft config it builds."""

    name: str
    summary: str
    defaults: dict[str, Any]
    peft_config_class: str | None = None  # None: the whole model is trained, no adapter

    @property
    def is_adapter(self) -> bool:
        """True when the method trains a peft adapter instead of the whole model."""
        return self.peft_config_class is not None

    def peft_config(
        self, block: dict[str, Any], *, model: PreTrainedModel | None = None, modules_to_save: Sequence[str] = ()
    ) -> PeftConfig:
        """Build the peft config from a recipe block; with `model`, fill the per-architecture defaults.

        `modules_to_save` are trained in full and saved with the adapter (the newly initialised head).
        """
        import peft

        if self.peft_config_class is None:
            raise ValueError(f"method {self.name!r} has no peft config")
        options = {k: v for k, v in block.items() if k not in OWN_KEYS}
        if self.name == "lora" and model is not None:
            targets = options.get("target_modules")
            if targets is None:
                options["target_modules"] = lora_default_targets(model.config.model_type)
            elif isinstance(targets, str) and targets.lower() == "all-linear":
                options["target_modules"] = linear_layers(model, exclude=modules_to_save)
        if modules_to_save:
            options["modules_to_save"] = sorted({*(options.get("modules_to_save") or []), *modules_to_save})
        config_class = getattr(peft, self.peft_config_class)
        return config_class(task_type=peft.TaskType.SEQ_CLS, **options)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            name="full",
            summary="train every weight of the model",
            defaults={"learning_rate": 5.0e-5},
        ),
        Method(
            name="lora",
            summary="low-rank adapters on the linear layers (peft LoraConfig)",
            defaults={
                "learning_rate": 1.0e-3,
                "r": 16,
                "lora_alpha": 32,
                "lora_dropout": 0.1,
                "target_modules": "all-linear",
            },
            peft_config_class="LoraConfig",
        ),
        Method(
            name="prefix",
            summary="trained key/value prefixes in every attention layer (peft PrefixTuningConfig)",
            defaults={"learning_rate": 1.0e-2, "num_virtual_tokens": 20},
            peft_config_class="PrefixTuningConfig",
        ),
    )
}


def lora_default_targets(model_type: str) -> list[str]:
    """The attention projections LoRA adapts by default for an architecture (the LoRA paper's choice)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    targets = LORA_TARGETS.get(model_type) or PEFT_TARGETS.get(model_type)
    if targets is None:
        raise PeftuneError(
            f"LoRA has no default target modules for model type {model_type!r}; "
            "set lora.target_modules (a list of module names, or all-linear)"
        )
    return list(targets)


def linear_layers(model: nn.Module, exclude: Sequence[str] = ()) -> list[str]:
    """Every linear layer outside the `exclude` modules: what `all-linear` means for a classifier.

    peft's own `all-linear` leaves out only the top `classifier` module, so the layers inside a
    RoBERTa head or a DistilBERT `pre_classifier` would get LoRA while also being trained in full.
    """
    from torch import nn

    def excluded(name: str) -> bool:
        return any(name == e or name.startswith(e + ".") for e in exclude)

    return sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not excluded(n))
