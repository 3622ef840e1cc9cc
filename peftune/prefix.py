"""Prefix tuning inside attention, independent of the model's cache API.

peft trains the prefixes (its prompt encoder, saved in its own format) and hands them to the model as
`past_key_values`, a cache argument that encoders dropped in transformers 5.24 (renamed `cache`) and that
DistilBERT and DeBERTa-v2 never had. Here the same prefixes go straight into every self-attention layer:
prepended to its keys and values, the attention mask widened to match. BERT, RoBERTa, XLM-RoBERTa, ELECTRA and
DistilBERT compute attention through transformers' attention interface, so one registered attention function
does it for all of them; DeBERTa-v2's disentangled attention has its own small subclass.

The text keeps the positions it has under peft's cache (it starts after the `num_virtual_tokens` prefix
positions), so an adapter trained here gives the same logits in stock peft where stock peft works
(BERT, RoBERTa, ELECTRA on transformers 5.23), and stock peft's adapters load here.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from peftune.errors import PeftuneError
from peftune.modeling import PADDING_OFFSET_POSITIONS, max_positions

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PretrainedConfig

    from peftune.recipe import Recipe

ATTENTION = "peftune_prefix"  # the attention implementation registered with transformers
LAYER = "peftune_prefix_layer"  # attribute of each self-attention module: its layer's index
STATES = "peftune_prefix_states"  # attribute of each self-attention module: this forward's (keys, values)

# Model types and how their self-attention takes the prefix: through the attention interface, or DeBERTa's own.
FAMILIES = {
    "bert": "interface",
    "roberta": "interface",
    "xlm-roberta": "interface",
    "electra": "interface",
    "distilbert": "interface",
    "deberta-v2": "deberta",
}


def check_supported(config: PretrainedConfig) -> None:
    """Refuse, in one line, a model type whose attention peftune cannot give a prefix."""
    if config.model_type not in FAMILIES:
        raise PeftuneError(
            f"prefix tuning supports {', '.join(FAMILIES)} models, not {config.model_type}; use method=lora (or prompt)"
        )


def check_recipe(recipe: Recipe, config: PretrainedConfig) -> None:
    """Refuse, in one line, prefix settings that cannot work with this model."""
    train = recipe.train
    if train.get("gradient_checkpointing") and (train.get("gradient_checkpointing_kwargs") or {}).get("use_reentrant"):
        raise PeftuneError(
            "prefix tuning with gradient checkpointing needs non-reentrant checkpointing (the reentrant kind runs "
            "the shared prefixes backward twice); drop train.gradient_checkpointing_kwargs.use_reentrant"
        )
    limit = max_positions(config)
    virtual = int(recipe.method_block["num_virtual_tokens"])
    if limit is not None and recipe.data.max_length + virtual > limit:  # the text's positions follow the prefix's
        raise PeftuneError(
            f"data.max_length {recipe.data.max_length} and the {virtual} virtual tokens of prefix tuning are more "
            f"positions than {config.model_type} models have ({limit}); set data.max_length to {limit - virtual} "
            "or less (or lower prefix.num_virtual_tokens)"
        )


def install(model: PeftModel) -> PeftModel:
    """Make a peft prefix-tuning model feed its prefixes into attention itself; return it.

    Works on a model from `get_peft_model` (training) and from `PeftModel.from_pretrained` (a saved adapter).
    """
    base: Any = model.get_base_model()
    check_supported(base.config)
    attentions = self_attention_modules(base)
    if len(attentions) != base.config.num_hidden_layers:
        raise PeftuneError(
            f"found {len(attentions)} self-attention layers in this {base.config.model_type} model, expected "
            f"{base.config.num_hidden_layers}; prefix tuning cannot be applied to it, use method=lora"
        )
    family = FAMILIES[base.config.model_type]
    if family == "deberta" and not all(hasattr(m, name) for m in attentions for name in DEBERTA_PARTS):
        raise _unreachable(base.config)
    for index, module in enumerate(attentions):
        setattr(module, LAYER, index)
        setattr(module, STATES, None)
        if family == "deberta":
            attention_class: Any = type(module)
            module.__class__ = _deberta_attention(attention_class)
    if family == "interface":
        _register_attention()
        base.set_attn_implementation(ATTENTION)
        if base.config._attn_implementation != ATTENTION:
            raise _unreachable(base.config)
    peft_class: Any = type(model)
    model.__class__ = _prefix_model(peft_class)
    return model


# What the DeBERTa subclass uses of transformers' DisentangledSelfAttention.
DEBERTA_PARTS = ("query_proj", "key_proj", "value_proj", "num_attention_heads", "pos_att_type", "relative_attention",
                 "disentangled_attention_bias", "dropout")  # fmt: skip


def _unreachable(config: PretrainedConfig) -> PeftuneError:
    from transformers import __version__

    return PeftuneError(
        f"prefix tuning cannot reach the attention of {config.model_type} models in transformers {__version__}; "
        "install a transformers release listed under 'Supported versions' in peftune's README, or use method=lora"
    )


def self_attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention module of every layer, in layer order."""
    return [m for m in model.modules() if type(m).__name__.endswith("SelfAttention")]


def prefix_states(model: PeftModel) -> torch.Tensor:
    """The prefixes of every layer as peft lays them out: [2 * layers, 1, heads, virtual tokens, head size].

    Keys of layer i at 2i, values at 2i + 1. Trained with `prefix_projection`, the encoder computes them; a
    reloaded adapter stores the computed ones (peft's inference mode), as peft's own `get_prompt` does.
    """
    config = model.active_peft_config
    encoder: Any = model.prompt_encoder[model.active_adapter]
    tokens = model.prompt_tokens[model.active_adapter][: config.num_virtual_tokens]
    flat = encoder.embedding.weight if config.inference_mode else encoder(tokens.to(encoder.embedding.weight.device))
    heads = config.num_attention_heads
    states = flat.view(1, config.num_virtual_tokens, config.num_layers * 2, heads, config.token_dim // heads)
    return states.permute(2, 0, 3, 1, 4)


def text_positions(config: PretrainedConfig, input_ids: torch.Tensor, virtual_tokens: int) -> torch.Tensor:
    """Position ids of the text after `virtual_tokens` prefix positions, as the model numbers them under a cache."""
    if config.model_type in PADDING_OFFSET_POSITIONS:
        text = input_ids.ne(config.pad_token_id).int()
        return ((text.cumsum(1) + virtual_tokens) * text).long() + config.pad_token_id
    # cumsum instead of arange keeps the sequence length dynamic when the model is traced (ONNX export).
    return (input_ids.new_ones(input_ids.shape).cumsum(1) - 1 + virtual_tokens).long()


def _with_prefix(module: Any, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Keys and values [batch, heads, length, size] with the module's prefix in front, and the prefix length."""
    import torch

    states = getattr(module, STATES, None)
    if states is None:
        return key, value, 0
    prefix_keys, prefix_values = states
    batch = key.shape[0]
    prefix_keys = prefix_keys.to(key.dtype).expand(batch, -1, -1, -1)
    prefix_values = prefix_values.to(value.dtype).expand(batch, -1, -1, -1)
    return torch.cat([prefix_keys, key], dim=2), torch.cat([prefix_values, value], dim=2), prefix_keys.shape[2]


def _widen_mask(mask: torch.Tensor | None, virtual_tokens: int) -> torch.Tensor | None:
    """The attention mask [..., queries, keys] with the prefix columns open (True, 1 or an additive 0)."""
    from torch.nn import functional

    if mask is None or virtual_tokens == 0:
        return mask
    open_value = 0.0 if mask.dtype.is_floating_point else 1
    return functional.pad(mask, (virtual_tokens, 0), value=open_value)


def prefix_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any) -> Any:
    """transformers' SDPA attention with the layer's prefix prepended to its keys and values."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    key, value, virtual_tokens = _with_prefix(module, key, value)
    return sdpa_attention_forward(module, query, key, value, _widen_mask(attention_mask, virtual_tokens), **kwargs)


@functools.cache
def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, prefix_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


@functools.cache
def _prefix_model(peft_class: Any) -> type:
    """A subclass of the peft model's class whose forward gives the prefixes to the attention layers."""
    from peft.utils import PeftType

    class PrefixTuned(peft_class):  # type: ignore[valid-type,misc]
        def forward(self, input_ids: Any = None, attention_mask: Any = None, inputs_embeds: Any = None,
                    labels: Any = None, **kwargs: Any) -> Any:  # fmt: skip
            config = self.active_peft_config
            if config.peft_type != PeftType.PREFIX_TUNING:
                return super().forward(input_ids, attention_mask, inputs_embeds, labels, **kwargs)
            kwargs.pop("task_ids", None)
            base = self.get_base_model()
            states = prefix_states(self)
            attentions = [m for m in base.modules() if hasattr(m, LAYER)]
            for module in attentions:
                index = getattr(module, LAYER)
                setattr(module, STATES, (states[2 * index], states[2 * index + 1]))
            if kwargs.get("position_ids") is None and input_ids is not None:
                kwargs["position_ids"] = text_positions(base.config, input_ids, config.num_virtual_tokens)
            kwargs = {k: v for k, v in kwargs.items() if v is not None}
            try:
                return base(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                            labels=labels, **kwargs)  # fmt: skip
            finally:
                # Gradient checkpointing runs the layers again during backward: they need the prefixes then.
                import torch

                if not (torch.is_grad_enabled() and getattr(base, "is_gradient_checkpointing", False)):
                    for module in attentions:
                        setattr(module, STATES, None)

    PrefixTuned.__name__ = PrefixTuned.__qualname__ = f"PrefixTuned{peft_class.__name__}"
    return PrefixTuned


@functools.cache
def _deberta_attention(attention_class: Any) -> type:
    """DeBERTa-v2's disentangled self-attention with the layer's prefix in front of its keys and values.

    The prefix columns get content scores only (they have no relative position), as in AdapterHub's adapters.
    """
    import math

    import torch
    from torch.nn import functional

    class PrefixDisentangledSelfAttention(attention_class):  # type: ignore[valid-type,misc]
        def forward(self, hidden_states: Any, attention_mask: Any, output_attentions: bool = False,
                    query_states: Any = None, relative_pos: Any = None, rel_embeddings: Any = None) -> Any:  # fmt: skip
            if getattr(self, STATES, None) is None:
                return super().forward(hidden_states, attention_mask, output_attentions, query_states, relative_pos,
                                       rel_embeddings)  # fmt: skip
            heads = self.num_attention_heads
            batch, length = hidden_states.shape[0], hidden_states.shape[1]

            def split(x: torch.Tensor) -> torch.Tensor:  # [batch, length, heads * size] -> [batch, heads, length, size]
                return x.view(x.shape[0], x.shape[1], heads, -1).permute(0, 2, 1, 3)

            query = split(self.query_proj(hidden_states if query_states is None else query_states))
            own_key = split(self.key_proj(hidden_states))
            key, value, virtual_tokens = _with_prefix(self, own_key, split(self.value_proj(hidden_states)))
            size = query.shape[-1]
            query, own_key = query.reshape(-1, length, size), own_key.reshape(-1, length, size)
            key, value = (x.reshape(-1, virtual_tokens + length, size) for x in (key, value))

            scale_factor = 1 + ("c2p" in self.pos_att_type) + ("p2c" in self.pos_att_type)
            scores = torch.bmm(query, key.transpose(-1, -2) / math.sqrt(size * scale_factor))
            if self.relative_attention:
                bias = self.disentangled_attention_bias(
                    query, own_key, relative_pos, self.pos_dropout(rel_embeddings), scale_factor
                )
                scores = scores + functional.pad(bias, (virtual_tokens, 0))
            scores = scores.view(batch, heads, length, virtual_tokens + length)
            closed = ~_widen_mask(attention_mask.bool(), virtual_tokens)  # type: ignore[operator]
            scores = scores.masked_fill(closed, torch.finfo(query.dtype).min)
            probs = self.dropout(functional.softmax(scores, dim=-1))
            context = torch.bmm(probs.view(-1, length, virtual_tokens + length), value)
            context = context.view(batch, heads, length, size).permute(0, 2, 1, 3).reshape(batch, length, -1)
            return context, (probs if output_attentions else None)

    return PrefixDisentangledSelfAttention
