"""Models: load the base checkpoint with a classification head, find what is new, attach the method."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftune import pooling
from peftune.data import HF_PROBLEM_TYPES, Labels
from peftune.errors import PeftuneError, first_line
from peftune.methods import METHODS
from peftune.recipe import PACKAGE_SCHEME, ModelSpec, Recipe, local_path

if TYPE_CHECKING:
    from peft import PeftModel
    from torch import nn
    from transformers import PretrainedConfig, PreTrainedModel

log = logging.getLogger(__name__)

# Attribute names of the classification head on transformers' *ForSequenceClassification models.
HEAD_NAMES = ("classifier", "score")
# Layers of the head that some families keep beside it: DistilBERT's `pre_classifier`, DeBERTa's `pooler`.
HEAD_PARTS = ("pre_classifier", "pooler")


def looks_local(name: str) -> bool:
    """A path rather than a Hub id (`org/name`): absolute, relative with ./ or ~, or deeper than one slash."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def _check_reference(name: str) -> None:
    """A missing local folder gets its own message, not the Hub client's complaint about repo ids."""

    if looks_local(name) and not os.path.exists(name):
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
    if recipe.model.dropout is not None:
        dropout_settings(config, recipe.model.dropout)  # a config without any says so before the data loads
    if recipe.model.quantized:
        try:
            import bitsandbytes  # noqa: F401
        except Exception as err:  # an ImportError, or a broken native library
            raise PeftuneError(
                f"model.quantization={recipe.model.quantization} needs a working bitsandbytes ({first_line(err)}); "
                "pip install bitsandbytes, or set model.quantization=none"
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


def hub_id(spec: ModelSpec) -> str | None:
    """The base model's Hub id, or None when it is a folder on this machine (a path, or a pkg:// reference)."""
    if spec.name_or_path.startswith(PACKAGE_SCHEME):  # without resolving it: the package may not be installed here
        return None
    return None if is_local_model(spec) else spec.name_or_path


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


def load_base_model(
    spec: ModelSpec, labels: Labels, compute_dtype: str = "float32"
) -> tuple[PreTrainedModel, list[str]]:
    """Load the checkpoint with a head sized for `labels`; also return the newly initialised modules.

    With `quantization`, the base's linear layers load as bitsandbytes int8 or NF4 (computing in
    `compute_dtype`), except those decided before loading to stay in full precision (`kept_in_full_precision`):
    the head, the pooler it reads and every module the checkpoint lacks, which are trained in full.
    """
    from transformers import AutoModelForSequenceClassification

    quantization, device_map, dropouts = None, None, {}
    if spec.quantized or spec.dropout is not None:  # both are decided from the config, read once
        config = load_config(spec)
        if spec.dropout is not None:
            dropouts = dropout_settings(config, spec.dropout)
        if spec.quantized:
            if spec.quantization == "8bit":
                int8_keeps_only_what_backward_needs()
            skip = kept_in_full_precision(spec, config)
            quantization = quantization_config(spec.quantization, skip, compute_dtype)
            device_map = {"": process_device()}
    path = local_path(spec.name_or_path, "model.name_or_path")
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path,
            **dropouts,
            revision=spec.revision,
            trust_remote_code=spec.trust_remote_code,
            num_labels=labels.num_labels,
            id2label=labels.id2label,
            label2id=labels.label2id,
            problem_type=HF_PROBLEM_TYPES[labels.problem_type],
            # A checkpoint that is already a classifier with another label count gets a fresh head.
            ignore_mismatched_sizes=True,
            quantization_config=quantization,
            device_map=device_map,
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
        log.debug("newly initialised: %s", ", ".join(fresh))
    if spec.quantized:
        _check_full_precision(model, fresh)
        _no_cpu_packing(model)
    pooling.apply(model, spec.pooling or pooling.of_checkpoint(spec))
    return model, fresh


def dropout_settings(config: PretrainedConfig, value: float) -> dict[str, float]:
    """`model.dropout` as config keys: every dropout probability the family's config has (BERT's
    `hidden_dropout_prob` and `attention_probs_dropout_prob`, DistilBERT's `dropout` and `attention_dropout`, the
    heads' `classifier_dropout`, `seq_classif_dropout`, `pooler_dropout` ...), each set to `value`. A head whose own
    dropout is unset (null) falls back to the hidden one, so it is set too. A config with no dropout setting has
    nothing to turn off (0, LoRA's default, asks nothing of it) and none to set to anything else."""
    found = {
        key
        for key, held in config.to_dict().items()
        if "dropout" in key and not isinstance(held, bool) and isinstance(held, (float, int, type(None)))
    }
    if not found and value:
        raise PeftuneError(
            f"model.dropout is set but the {config.model_type} config has no dropout setting to change; "
            "remove model.dropout"
        )
    return dict.fromkeys(sorted(found), value)


def int8_keeps_only_what_backward_needs() -> None:
    """Make bitsandbytes' int8 matmuls keep a layer's input for the backward pass only when its weight trains.

    On a frozen int8 layer (an adapter's base) backward needs the weight alone (grad_input = grad_output @ W), but
    bitsandbytes 0.50's autograd functions keep the input, and on the GPU its int8 copies, whether or not a weight
    gradient is wanted: every quantized layer's input then stays alive until backward reaches it, and LoRA on an
    8-bit base peaked above full fine-tuning of the float model (reports/plan.md). The forward is wrapped to drop
    those references when the weight gets no gradient; backward reads them only for the weight's gradient.
    Idempotent; a bitsandbytes without these functions is left as it is.
    """
    try:
        from bitsandbytes.autograd import _functions as functions
    except ImportError:
        return
    for name, field in (("MatMul8bitFp", "A"), ("MatMul8bitLt", "tensors")):
        function = getattr(functions, name, None)
        if function is None or hasattr(function.forward, "peftune_original"):
            continue

        def forward(ctx: Any, *args: Any, _original: Any = function.forward, _field: str = field) -> Any:
            output = _original(ctx, *args)
            if not ctx.needs_input_grad[1] and hasattr(ctx, _field):  # the weight (B) gets no gradient
                setattr(ctx, _field, None if _field == "A" else (None, None, None))
            return output

        forward.peftune_original = function.forward  # type: ignore[attr-defined]
        function.forward = staticmethod(forward)


def quantization_config(kind: str, skip: list[str], compute_dtype: str = "float32") -> Any:
    """bitsandbytes settings: int8 (LLM.int8) or NF4 with double quantization (QLoRA's), `skip` left in float."""
    import torch
    from transformers import BitsAndBytesConfig

    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
        llm_int8_skip_modules=skip,  # transformers reads this list for 4-bit too
    )


def compute_dtype(train: dict[str, Any]) -> str:
    """The dtype a 4-bit base computes in: the training precision (bf16, fp16, else float32)."""
    return "bfloat16" if train.get("bf16") else "float16" if train.get("fp16") else "float32"


def process_device() -> Any:
    """This process's device: its own GPU under torchrun or accelerate launch (`LOCAL_RANK`), else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def kept_in_full_precision(spec: ModelSpec, config: PretrainedConfig) -> list[str]:
    """Modules a quantized base keeps in float, decided before loading: the head and the pooler it reads (by
    the architecture) and every module whose weights the checkpoint lacks (by its safetensors files' keys)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=spec.trust_remote_code)
    kept = set(head_modules(model, [], pooler=True))
    stored = checkpoint_keys(spec)
    if stored is not None:
        prefix = str(getattr(model, "base_model_prefix", ""))
        expected = {name for name, _ in model.named_parameters()}
        # A bare encoder checkpoint (BertModel) stores `encoder.…` where the classifier has `bert.encoder.…`.
        stored |= {f"{prefix}.{key}" for key in stored}
        kept |= set(fresh_modules(model, expected - stored))
    return sorted(kept)


def checkpoint_keys(spec: ModelSpec) -> set[str] | None:
    """The tensor names in the checkpoint's safetensors files (headers only); None when they cannot be read."""
    from safetensors import safe_open
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file

    name = local_path(spec.name_or_path, "model.name_or_path")
    kwargs = {"revision": spec.revision, "_raise_exceptions_for_missing_entries": False}
    try:
        index = cached_file(name, SAFE_WEIGHTS_INDEX_NAME, **kwargs)
        if index is not None:
            return set(json.loads(Path(index).read_text(encoding="utf-8"))["weight_map"])
        single = cached_file(name, SAFE_WEIGHTS_NAME, **kwargs)
        if single is None:
            return None
        with safe_open(single, framework="pt") as weights:
            return set(weights.keys())
    except (OSError, ValueError, KeyError):
        return None


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

    if recipe.model.quantized:
        # peft refuses to add prefixes to a model that already checkpoints; Trainer turns checkpointing on later.
        checkpointing = bool(recipe.train.get("gradient_checkpointing")) and not method.attention_prefix
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    trained = head_modules(model, fresh, pooler=method.trains_pooler)
    config = method.peft_config(recipe.method_block, model=model, modules_to_save=trained)
    try:
        return with_attention_prefix(get_peft_model(model, config))
    except (ValueError, TypeError) as err:
        raise PeftuneError(f"cannot apply {recipe.method} to this model: {first_line(err)}") from None


def with_attention_prefix(model: PeftModel) -> PeftModel:
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
    `pre_classifier`, DeBERTa's `pooler`), trained in full as part of the head, new or kept from a checkpoint
    that is already a classifier. Training BERT's in full too makes
    every family's head the same (as AdapterHub's heads do), and matters where the checkpoint's pooler was never
    trained: sentence-transformers models such as all-MiniLM-L6-v2 pool by the mean and leave it at its random start.
    Methods whose learning rates are far above a pretrained layer's scale (prefix and prompt tuning) leave it out.
    """
    names = {*fresh, *(name for name in (*HEAD_NAMES, *HEAD_PARTS) if hasattr(model, name))}
    prefix = str(getattr(model, "base_model_prefix", ""))
    if pooler and prefix and getattr(getattr(model, prefix, None), "pooler", None) is not None:
        names.add(f"{prefix}.pooler")
    return sorted(name for name in names if not any(name.startswith(other + ".") for other in names))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Trainable and total parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(_weights_in(p) for p in model.parameters())
    return trainable, total


def _weights_in(parameter: Any) -> int:
    """How many weights a parameter holds: an NF4 tensor packs two in each of its bytes."""
    state = getattr(parameter, "quant_state", None)
    return int(state.shape.numel()) if state is not None else int(parameter.numel())


def memory_footprint(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (int8 weights count one byte each, NF4 weights half a
    byte), with the block scales that NF4 weights keep beside them."""
    tensors = [*model.parameters(), *model.buffers()]
    for parameter in model.parameters():
        state = getattr(parameter, "quant_state", None)
        if state is not None:
            tensors.append(state.absmax)
            if getattr(state, "state2", None) is not None:  # double quantization: the scales' own scales
                tensors.append(state.state2.absmax)
    return sum(t.numel() * t.element_size() for t in tensors)


def _check_full_precision(model: PreTrainedModel, fresh: list[str]) -> None:
    """Every new module must have loaded in float (it is trained in full); say which did not, if one did not."""
    import bitsandbytes as bnb

    for prefix in fresh:
        for name, module in model.get_submodule(prefix).named_modules():
            if isinstance(module, bnb.nn.Linear8bitLt | bnb.nn.Linear4bit):
                raise PeftuneError(
                    f"{prefix}.{name} is new in this model but was quantized, so it cannot be trained; "
                    "this checkpoint's layout is not one peftune knows: set model.quantization=none"
                )


def _no_cpu_packing(model: PreTrainedModel) -> None:
    """Keep bitsandbytes from repacking NF4 weights for its CPU inference kernel.

    bitsandbytes 0.50 repacks a Linear4bit's weights in place the first time it runs in eval mode on a CPU with
    AVX512-BF16; training after that evaluation then fails inside its matmul, and the repacking cannot handle
    rows shorter than a quantization block. The unpacked path computes the same outputs.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _key_of(entry: Any) -> str:
    return entry[0] if isinstance(entry, tuple) else entry
