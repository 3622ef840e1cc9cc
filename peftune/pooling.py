"""Pooling: which summary of the text a classification head reads, the first token's or the mean of all tokens.

transformers' heads read the first token ([CLS]). Checkpoints trained with mean pooling (every
sentence-transformers model, all-MiniLM-L6-v2 among them) carry their sentence meaning in the mean of the token
states instead, and their first token is a poor summary. With `model.pooling: mean` the base model's output has
its first position replaced by the masked mean of all positions, so every family's own head (BERT's pooler,
RoBERTa's and ELECTRA's dense layer, DistilBERT's pre-classifier, DeBERTa's context pooler) reads the mean
unchanged, through training, merging and ONNX export alike.

Left null, the choice is the checkpoint's own (`of_checkpoint`): the mean for a sentence-transformers checkpoint
whose Pooling module averages the tokens (its `modules.json` and pooling config say so, as SetFit reads them), the
first token for every other one. A run records what it resolved to in its recipe.yaml.

The choice is saved in the model's config.json as `classifier_pooling` (the name ModernBERT's config uses for the
same choice), and every peftune load applies it again. transformers alone ignores it for other families: a
merged or full model with mean pooling needs `peftune.pooling.apply(model)` after `from_pretrained`; the ONNX
export has it in its graph and needs nothing.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from peftune.recipe import ModelSpec, Recipe

log = logging.getLogger(__name__)

POOLINGS = ("cls", "mean")
CONFIG_KEY = "classifier_pooling"
_HOOKED = "_peftune_mean_pooling"

# For model cards and merged folders' READMEs: what a user of a mean-pooled model must know.
USAGE_NOTE = (
    "The head reads the mean of the token states, not the first token (`classifier_pooling: mean`). transformers "
    'alone reads the first token: after loading, call `peftune.pooling.apply(model, "mean")`, or use '
    "`peftune predict`, or peftune's ONNX export, which has the mean in its graph."
)


def apply(model: nn.Module, pooling: str | None = None) -> nn.Module:
    """Make `model`'s head read `pooling` ("cls" or "mean"; None: what its config records) and record it there."""
    config: Any = model.config
    pooling = pooling or getattr(config, CONFIG_KEY, None) or "cls"
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    if pooling == "cls":
        if hasattr(config, CONFIG_KEY):  # a checkpoint trained with mean pooling, now trained with the first token
            config.classifier_pooling = pooling
        return model
    config.classifier_pooling = pooling
    base = getattr(model, str(getattr(model, "base_model_prefix", "")), None)
    if base is None or getattr(base, _HOOKED, False):
        return model
    base.register_forward_hook(_mean_as_first_token, with_kwargs=True)
    setattr(base, _HOOKED, True)
    return model


def resolved(recipe: Recipe) -> Recipe:
    """`recipe` with `model.pooling` decided: its own, or the checkpoint's (`of_checkpoint`) where it is null."""
    if recipe.model.pooling is not None:
        return recipe
    model = recipe.model.model_copy(update={"pooling": of_checkpoint(recipe.model)})
    return recipe.model_copy(update={"model": model})


def of_checkpoint(spec: ModelSpec) -> str:
    """The pooling `spec`'s checkpoint was trained to be read with: "mean" or "cls".

    A config.json that records `classifier_pooling` (peftune's own full and merged models) says which; a
    sentence-transformers checkpoint names its Pooling module in `modules.json`, whose config says whether it takes
    the mean of the tokens. Every other checkpoint is read by its first token, transformers' way, and so is one
    whose files cannot be reached (offline, not in the cache), with a line saying so.
    """
    return _of_checkpoint(spec.name_or_path, spec.revision)


class _Unreachable(Exception):
    pass


@functools.lru_cache(maxsize=64)
def _of_checkpoint(name: str, revision: str | None) -> str:
    try:
        recorded = (_checkpoint_json(name, revision, "config.json") or {}).get(CONFIG_KEY)
        if recorded in POOLINGS:
            return str(recorded)
        for module in _checkpoint_json(name, revision, "modules.json") or []:
            if str(module.get("type", "")).endswith(".Pooling"):
                folder = str(module.get("path") or "").strip("/")
                mode = _checkpoint_json(name, revision, f"{folder}/config.json" if folder else "config.json") or {}
                return "mean" if _averages_tokens(mode) else "cls"
    except _Unreachable as err:
        file, why = err.args
        log.warning(
            f"cannot read {file} of {name} ({why}): its head reads the first token; set model.pooling: mean if "
            "it was trained to be read by the mean of its tokens"
        )
    return "cls"


def _averages_tokens(mode: dict[str, Any]) -> bool:
    """Whether a sentence-transformers pooling config takes the plain mean of the tokens and nothing else."""
    if "pooling_mode" in mode:  # the single-name form
        return mode["pooling_mode"] == "mean"
    others = [key for key, on in mode.items() if key.startswith("pooling_mode_") and on is True]
    return others == ["pooling_mode_mean_tokens"]


def _checkpoint_json(name: str, revision: str | None, filename: str) -> Any:
    """One JSON file of a checkpoint (a local folder or a Hub repository); None when it has no such file."""
    from peftune.recipe import local_path

    path = local_path(name, "model.name_or_path")
    if os.path.isdir(path):
        file = Path(path) / filename
        return json.loads(file.read_text()) if file.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(path, filename, revision=revision)).read_text())
    except LocalEntryNotFoundError as err:  # offline, and not in the cache
        raise _Unreachable(filename, "offline and not in the cache") from err
    except EntryNotFoundError:  # the repository has no such file
        return None
    except Exception as err:  # no network, a gated or private repository, no such repository, ...
        raise _Unreachable(filename, type(err).__name__) from None


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The mean of each row's token states over the positions its attention mask keeps."""
    if mask is None:
        return hidden.mean(dim=1)
    mask = mask[:, -hidden.shape[1] :].to(hidden.dtype).unsqueeze(-1)  # virtual tokens may come first in the mask
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def _mean_as_first_token(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
    """Forward hook on the base model: its first position becomes the masked mean, and its pooler reads that."""
    import torch

    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    hidden = output[0]
    pooled = torch.cat([masked_mean(hidden, mask).unsqueeze(1), hidden[:, 1:]], dim=1)
    pooler = getattr(module, "pooler", None)
    if isinstance(output, tuple):
        rest = output[1:]
        if pooler is not None and rest:
            rest = (pooler(pooled), *rest[1:])
        return (pooled, *rest)
    output["last_hidden_state"] = pooled
    if pooler is not None and output.get("pooler_output") is not None:
        output["pooler_output"] = pooler(pooled)
    return output
