"""Fine-tuning methods, one small unit each, registered in ``METHODS``.

A method is the defaults of its recipe block, the peft config class the block is passed to, and what
it needs from an architecture; adding one is one entry in ``METHODS`` (the recipe schema takes its block
from here, `plan` its rows). Every block carries its own ``learning_rate``: adapters want rates ten to
a hundred times larger than full fine-tuning, so switching ``method`` alone gives a fair run. Importing
this module is cheap; peft and transformers are imported only when a config is built or checked.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from peft import PeftConfig, PeftModel
    from torch import nn
    from transformers import PretrainedConfig, PreTrainedModel

# Keys of a method block that peftune reads itself rather than passing to peft. `num_train_epochs`, when a block
# sets it, replaces train.num_train_epochs for that method (prefix tuning needs more passes than the others).
OWN_KEYS = ("learning_rate", "num_train_epochs")

# Targets where peft has no default for an architecture (used when the block leaves them null).
LORA_TARGETS = {"distilbert": ["q_lin", "v_lin"]}
IA3_TARGETS = {  # (target_modules, feedforward_modules)
    "distilbert": (["k_lin", "v_lin", "lin2"], ["lin2"]),
    "electra": (["key", "value", "output.dense"], ["output.dense"]),
}


@dataclass(frozen=True)
class Method:
    """One way of fine-tuning: its recipe block's defaults, the peft config it builds, what it needs."""

    name: str
    defaults: dict[str, Any]
    peft_config_class: str | None = None  # None: the whole model is trained, no adapter
    virtual_tokens: bool = False  # prompt learning: trained vectors prepended to the input or the cache
    attention_prefix: bool = False  # prefix tuning: its vectors go into every attention layer (peftune.prefix)
    mergeable: bool = False  # folds into the base weights (merge), which prompt learning cannot
    own_keys: tuple[str, ...] = OWN_KEYS  # keys of its block that peftune reads itself (not passed to peft)
    trains_pooler: bool = False  # BERT's pooler is trained in full with the head (modeling.head_modules)
    # Block keys that count something (a rank, a number of tokens): whole numbers of at least 1.
    counts: tuple[str, ...] = ()
    # (key, source, factor): a block that sets `source` and not `key` gets `key` = factor x `source` (LoRA's alpha
    # follows its rank, so that a new rank keeps the scale alpha/r that the default rate was measured with).
    follows: tuple[tuple[str, str, int], ...] = ()
    # The block with its per-architecture defaults filled from the model (targets, sizes), as a new dict;
    # None: the block as it is.
    fill_for_model: Callable[[Method, dict[str, Any], Any, Sequence[str]], dict[str, Any]] | None = None
    # The rows `peftune plan` shows for this method: one per base precision ("none", "8bit", "4bit").
    planned: tuple[str, ...] = ()
    # The model's dropout (`model.dropout`) when the recipe leaves it null; None: the checkpoint's own.
    model_dropout: float | None = None

    @property
    def is_adapter(self) -> bool:
        """True when the method trains a peft adapter instead of the whole model."""
        return self.peft_config_class is not None

    def checkpoint_problem(self, block: dict[str, Any]) -> str | None:
        """Why a checkpoint of this block cannot be loaded back to train on (best model at the end, --resume);
        None when it can.

        With `prefix_projection`, peft checkpoints the projected prefixes, not the projection being trained
        (peft issue 2256), so Trainer cannot load one back into the training model.
        """
        if self.virtual_tokens and block.get("prefix_projection"):
            return (f"with {self.name}.prefix_projection=true peft checkpoints the projected prefixes, "
                    "not the projection being trained")  # fmt: skip
        return None

    def check_architecture(self, config: PretrainedConfig) -> None:
        """Refuse, in one line, an architecture this method cannot work with."""
        if self.attention_prefix:
            from peftune import prefix

            prefix.check_supported(config)

    def peft_config(
        self, block: dict[str, Any], *, model: PreTrainedModel | None = None, modules_to_save: Sequence[str] = ()
    ) -> PeftConfig:
        """Build the peft config from a recipe block; with `model`, fill the per-architecture defaults.

        `modules_to_save` are trained in full and saved with the adapter (the newly initialised head).
        """
        import peft

        if self.peft_config_class is None:
            raise ValueError(f"method {self.name!r} has no peft config")
        options = {k: v for k, v in block.items() if k not in self.own_keys}
        if model is not None and self.fill_for_model is not None:
            options = self.fill_for_model(self, options, model, modules_to_save)
        if modules_to_save:
            options["modules_to_save"] = sorted({*(options.get("modules_to_save") or []), *modules_to_save})
        config_class = getattr(peft, self.peft_config_class)
        return config_class(task_type=peft.TaskType.SEQ_CLS, **options)

    def optimizer(self, model: nn.Module, block: dict[str, Any], lr: float, weight_decay: float) -> Any:
        """The optimizer this block asks for, or None for Trainer's own (AdamW at the learning rate `lr`).

        `loraplus_lr_ratio` (LoRA+, Hayou et al. 2024): the B matrices, which start at zero, learn that many
        times faster than the A matrices; peft's `create_loraplus_optimizer` builds the parameter groups.
        """
        ratio = block.get("loraplus_lr_ratio")
        if ratio is None:
            return None
        import torch
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(
            cast("PeftModel", model), torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio,
            loraplus_weight_decay=weight_decay,
        )  # fmt: skip


def _lora_targets(method: Method, options: dict[str, Any], model: Any, fresh: Sequence[str]) -> dict[str, Any]:
    """LoRA's `target_modules`: null is the architecture's query and value and each feed-forward input,
    `all-linear` every layer but the head."""
    targets = options.get("target_modules")
    layers = options.get("layers_to_transform")
    if targets is None:
        attention = lora_default_targets(model.config.model_type)
        inputs = in_layers(feed_forward_inputs(model, exclude=fresh), layers)
        targets = [*attention, *inputs] if attention else "all-linear"
    if isinstance(targets, str) and targets.lower() == "all-linear":
        targets = in_layers(linear_layers(model, exclude=fresh), layers)
    return {**options, "target_modules": targets}


def in_layers(names: list[str], layers: int | list[int] | None) -> list[str]:
    """The modules of `names` (named in full) in the layers `layers_to_transform` keeps (all when None).

    peft applies `layers_to_transform` only to the names it matches by suffix: a module named in full is adapted
    in every layer, so the full names peftune fills in are chosen here. The layer is the first numbered part of
    the name, as peft reads it (`bert.encoder.layer.3.intermediate.dense`: 3).
    """
    if layers is None:
        return names
    wanted = {layers} if isinstance(layers, int) else set(layers)
    return [name for name in names if (n := re.search(r"\.(\d+)\.", name)) and int(n.group(1)) in wanted]


def _ia3_targets(method: Method, options: dict[str, Any], model: Any, fresh: Sequence[str]) -> dict[str, Any]:
    """IA3's modules for the architectures peft has no default for."""
    if options.get("target_modules") is None and model.config.model_type in IA3_TARGETS:
        targets, feedforward = IA3_TARGETS[model.config.model_type]
        return {**options, "target_modules": targets, "feedforward_modules": feedforward}
    return options


def _token_sizes(method: Method, options: dict[str, Any], model: Any, fresh: Sequence[str]) -> dict[str, Any]:
    """The sizes prompt learning needs, which peft looks up under BERT-style names; configs alias them
    (DistilBERT: dim, n_layers). Prefixes are attention keys and values; soft prompts are word embeddings,
    which can be narrower than the hidden size (ELECTRA's small models)."""
    config = model.config
    width = config.hidden_size if method.attention_prefix else model.get_input_embeddings().embedding_dim
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    sizes = {"token_dim": width, "num_layers": layers, "num_attention_heads": heads}
    return {**sizes, **options}  # what the block sets wins


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            name="full",
            # train every weight of the model
            defaults={"learning_rate": 5.0e-5},
            planned=("none",),
        ),
        Method(
            name="lora",
            # low-rank adapters on the attention's query and value and the feed-forward inputs (peft LoraConfig)
            defaults={
                # The attention's query and value projections (the LoRA paper's setting) and each layer's
                # feed-forward input (target_modules null: per architecture, lora_default_targets and
                # feed_forward_inputs), no dropout, so that peft takes its dropout-free path and keeps no copy of
                # each adapted layer's input. Against query and value alone at 2e-3 (the previous default) the
                # feed-forward adapters gained on SST-2, CoLA and MRPC in reports/quality.md for 1% more
                # arithmetic per step (reports/step-flops.md); on the feed-forward input rather than its output,
                # the adapter keeps the narrow hidden-size input for backward, not the wide one (reports/plan.md).
                # Against every linear layer with dropout 0.1 (the default before) it trains faster and needs
                # less memory. 1e-3: more adapted weights, a lower rate. Rank 16 (alpha 32, the same scale as 8 and
                # 16): against rank 8 it gained on SST-2, CoLA and STS-B and at every SST-2 size (MRPC level at seed
                # 42, a point lower on three seeds' mean; reports/quality.md) for 2% more arithmetic per step
                # (reports/step-flops.md) and under 1% more memory (reports/plan.md).
                "learning_rate": 1.0e-3,
                "r": 16,
                "lora_alpha": 32,
                "lora_dropout": 0.0,
                "target_modules": None,
            },
            peft_config_class="LoraConfig",
            mergeable=True,
            own_keys=(*OWN_KEYS, "loraplus_lr_ratio"),
            trains_pooler=True,
            counts=("r",),
            follows=(("lora_alpha", "r", 2),),
            fill_for_model=_lora_targets,
            planned=("none", "8bit", "4bit"),
            # The frozen model's dropout off: on reports/quality.md's four tasks LoRA was as accurate or more without
            # it, and its steps faster and lighter (no masks drawn, applied and kept for backward; BENCHMARKS.md).
            model_dropout=0.0,
        ),
        Method(
            name="prefix",
            # trained key/value prefixes in every attention layer (peft PrefixTuningConfig)
            defaults={"learning_rate": 1.0e-2, "num_virtual_tokens": 20, "prefix_projection": False},
            peft_config_class="PrefixTuningConfig",
            virtual_tokens=True,
            attention_prefix=True,
            counts=("num_virtual_tokens",),
            fill_for_model=_token_sizes,
            planned=("none",),
        ),
        Method(
            name="prompt",
            # trained soft-prompt embeddings before the input (peft PromptTuningConfig)
            defaults={"learning_rate": 3.0e-2, "num_virtual_tokens": 20},
            peft_config_class="PromptTuningConfig",
            virtual_tokens=True,
            counts=("num_virtual_tokens",),
            fill_for_model=_token_sizes,
        ),
        Method(
            name="ia3",
            # learned rescaling of attention keys/values and feed-forward activations (peft IA3Config)
            defaults={"learning_rate": 5.0e-3},
            peft_config_class="IA3Config",
            mergeable=True,
            fill_for_model=_ia3_targets,
        ),
    )
}


def lora_default_targets(model_type: str) -> list[str] | None:
    """The attention projections LoRA adapts by default (the LoRA paper's query and value), None when unknown."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    targets = LORA_TARGETS.get(model_type) or PEFT_TARGETS.get(model_type)
    return list(targets) if targets else None


def feed_forward_inputs(model: PreTrainedModel, exclude: Sequence[str] = ()) -> list[str]:
    """Each layer's feed-forward input: the linear layers that widen the hidden size (BERT, RoBERTa, ELECTRA,
    DeBERTa-v2 `intermediate.dense`, DistilBERT `ffn.lin1`), outside `exclude`."""
    hidden: int = model.config.hidden_size  # DistilBERT's config aliases it to `dim`

    def widening(name: str) -> bool:
        layer = cast("nn.Linear", model.get_submodule(name))
        return layer.in_features == hidden and layer.out_features > hidden

    return [name for name in linear_layers(model, exclude) if widening(name)]


def linear_layers(model: nn.Module, exclude: Sequence[str] = ()) -> list[str]:
    """Every linear layer outside the `exclude` modules: what `all-linear` means for a classifier.

    peft's own `all-linear` leaves out only the top `classifier` module, so the layers inside a
    RoBERTa head or a DistilBERT `pre_classifier` would get LoRA while also being trained in full.
    """
    from torch import nn

    def excluded(name: str) -> bool:
        return any(name == e or name.startswith(e + ".") for e in exclude)

    return sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not excluded(n))
