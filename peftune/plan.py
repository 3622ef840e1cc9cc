"""Plan: estimate a recipe's peak training memory under each method, without loading any weights.

The model is built from its config on the meta device (shapes, no storage), the method is attached as training
would attach it, and one training forward pass is traced there: every tensor autograd keeps for the backward
pass is counted. The estimate is the sum of

- weights: float32, or for an 8-bit base int8 linear layers (one byte a weight and a float32 scale per output
  row), for a 4-bit base NF4 ones (half a byte a weight, an 8-bit scale per block of 64 and a float32 scale per
  256 blocks: double quantization), with everything else in float32, as bitsandbytes loads them;
- AdamW's two float32 states for each trainable parameter;
- the larger of two: the activations, the tensors saved for backward at the batch size and max_length (with
  gradient checkpointing, the input of every layer plus one layer's saved tensors, recomputed in turn), plus the
  float32 gradients when gradient accumulation holds them meanwhile; or twice the gradients, for the optimizer
  step (backward frees activations as it makes gradients, so the two do not peak together);
- an allowance for the framework: ALLOWANCE_MB (CUDA context, kernels, allocator caching) plus ALLOWANCE_SHARE
  of the rest, for transient tensors of the backward pass and fragmentation.

Labels are taken from `data.labels` (two classes when the recipe does not list them; one output for regression).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from peftune import modeling
from peftune.errors import PeftuneError
from peftune.methods import METHODS
from peftune.recipe import Recipe, load_recipe

ALLOWANCE_MB = 512
ALLOWANCE_SHARE = 0.10
BUDGETS_GB = (8, 12, 16, 24)
# The rows of a plan, as each method's entry asks (Method.planned): `lora-8bit` is LoRA on an 8-bit base.
PLANNED = {
    name + ("" if kind == "none" else f"-{kind}"): [f"method={name}", f"model.quantization={kind}"]
    for name, method in METHODS.items()
    for kind in method.planned
}
MB = 2**20


@dataclass(frozen=True)
class Estimate:
    """Peak training memory of one method, in bytes, by part."""

    method: str
    batch_size: int
    max_length: int
    weights: int
    gradients: int
    optimizer: int
    activations: int  # at batch_size
    activations_checkpointed: int
    trainable: int
    accumulation: int = 1  # gradient accumulation steps: above 1, gradients are held while the next batch runs

    def core(
        self, checkpointing: bool = False, batch_size: int | None = None, accumulation: int | None = None
    ) -> float:
        """Weights, optimizer state, and activations or gradients at `batch_size`, without the allowance.

        Activations and gradients do not peak together: backward frees the saved activations as it makes the
        gradients. The optimizer step then holds the gradients and about as much again in temporaries (AdamW's
        foreach path computes the square root of its second moments as a new list), so the larger of the
        activations and twice the gradients is what comes on top of weights and optimizer state. With gradient
        accumulation the gradients of the earlier batches are held during the next one's activations.
        """
        activations = self._per_example(checkpointing) * (batch_size or self.batch_size)
        return self._fixed() + max(activations + self._held(accumulation), 2 * self.gradients)

    def total(self, checkpointing: bool = False, batch_size: int | None = None, accumulation: int | None = None) -> int:
        """The estimate: the core parts and the framework allowance."""
        return int(ALLOWANCE_MB * MB + self.core(checkpointing, batch_size, accumulation) * (1 + ALLOWANCE_SHARE))

    def largest_batch(self, budget: int, checkpointing: bool = False, accumulation: int | None = None) -> int:
        """The largest per-device batch size whose estimate fits `budget` bytes (0 when none does): total's inverse."""
        room = (budget - ALLOWANCE_MB * MB) / (1 + ALLOWANCE_SHARE) - self._fixed()
        if room + 1 < 2 * self.gradients:  # + 1: total() rounds down to whole bytes
            return 0
        return max(0, int((room - self._held(accumulation)) / self._per_example(checkpointing)))

    def _held(self, accumulation: int | None) -> int:
        return self.gradients if (accumulation or self.accumulation) > 1 else 0

    def _fixed(self) -> int:
        return self.weights + self.optimizer

    def _per_example(self, checkpointing: bool) -> float:
        return (self.activations_checkpointed if checkpointing else self.activations) / self.batch_size


def parse_memory(text: str) -> int:
    """`8GB`, `12 GiB`, `500MB`, `1.5G` as bytes (GB and GiB both mean 2**30 here, as GPU makers' sizes do)."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT])(?:i?B)?\s*", text, flags=re.IGNORECASE)
    if not found:
        raise PeftuneError(f"cannot read the memory size {text!r}; write it like 8GB, 12GiB or 500MB")
    power = "KMGT".index(found.group(2).upper()) + 1
    value = float(found.group(1)) * 1024**power
    if value <= 0:
        raise PeftuneError(f"the memory size {text!r} is not positive; write it like 8GB")
    return int(value)


def estimate(recipe: Recipe, config: Any = None) -> Estimate:
    """The memory estimate of the recipe's method at its batch size and max_length (no weights are loaded)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    config = config if config is not None else modeling.load_config(recipe.model)
    modeling.check_model(recipe, config)
    problem = recipe.data.problem_type or "classification"
    num_labels = 1 if problem == "regression" else len(recipe.data.labels or ["0", "1"])
    config.num_labels = num_labels
    if recipe.model.dropout is not None:  # the masks dropout keeps for backward are activations too
        for key, value in modeling.dropout_settings(config, recipe.model.dropout).items():
            setattr(config, key, value)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    prefix = f"{model.base_model_prefix}."
    new_keys = {name for name, _ in model.named_parameters() if not name.startswith(prefix)}
    fresh = modeling.fresh_modules(model, new_keys)
    kind = recipe.model.quantization
    kept = modeling.head_modules(model, fresh)  # loaded in full precision on a quantized base
    linear_weights = _quantized_linear_bytes(model, kept, kind) if recipe.model.quantized else None
    # Quantized layers keep no input for backward (peftune frees what bitsandbytes' int8 matmuls kept, see
    # modeling.int8_keeps_only_what_backward_needs): their activations are counted as a float base's.
    attached = modeling.attach_method(model, _unquantized(recipe), fresh)
    trainable = sum(p.numel() for p in attached.parameters() if p.requires_grad)
    weights = sum(p.numel() * 4 for p in attached.parameters())
    weights += sum(b.numel() * b.element_size() for b in attached.buffers())
    if linear_weights is not None:
        weights -= linear_weights[0] - linear_weights[1]  # float32 linear weights replaced by their quantized form
    length = recipe.data.max_length
    # A token budget's costliest batch is its longest texts: as many of max_length tokens as it holds. An auto
    # budget (the batch size times the data's mean length) holds at most the batch size of them.
    tokens = recipe.train.get("batch_tokens")
    batch = int(recipe.train.get("per_device_train_batch_size", 8))
    if isinstance(tokens, int):
        batch = max(1, tokens // length)
    activations, layer_inputs, layers = _traced_activations(attached, config, batch, length)
    checkpointed = layer_inputs + (activations // max(layers, 1) if layers else activations)
    return Estimate(recipe.method + (f"-{kind}" if recipe.model.quantized else ""), batch, length, weights,
                    trainable * 4, trainable * 8, activations, checkpointed, trainable,
                    int(recipe.train.get("gradient_accumulation_steps", 1)))  # fmt: skip


def plan(ref: str, overrides: list[str] | tuple[str, ...] = ()) -> list[tuple[str, Estimate | str]]:
    """An estimate for each method (full, LoRA, LoRA on 8-bit and on 4-bit, prefix), or the reason it does not apply."""
    base = load_recipe(ref, overrides)
    config = modeling.load_config(base.model)
    rows: list[tuple[str, Estimate | str]] = []
    for name, switch in PLANNED.items():
        recipe = load_recipe(ref, [*overrides, *switch])
        try:
            METHODS[recipe.method].check_architecture(config)
        except PeftuneError as err:
            rows.append((name, str(err).split(";")[0]))
            continue
        rows.append((name, estimate(recipe, config)))
    return rows


def render(rows: list[tuple[str, Estimate | str]], budgets: list[int], memory: str | None = None) -> str:
    """The plan as a table: parts of the estimate in MB, and per budget the largest batch that fits.

    With `memory` given and no method fitting it at the recipe's batch size, a PeftuneError says what would.
    """
    estimates = [e for _, e in rows if isinstance(e, Estimate)]
    if memory and estimates and not any(e.largest_batch(budgets[0]) >= e.batch_size for e in estimates):
        raise PeftuneError(advice(estimates, budgets[0], memory))
    header = ["method", "trainable", "weights", "grad+optim", "activations", "total", "total ckpt"]
    table = [header + [f"{b / 2**30:g} GB" for b in budgets]]
    notes = []
    for name, e in rows:
        if not isinstance(e, Estimate):
            notes.append(f"{name}: {e}")
            continue
        cells = []
        for budget in budgets:
            plain, ckpt = e.largest_batch(budget), e.largest_batch(budget, checkpointing=True)
            cells.append(f"up to {plain}" if plain >= e.batch_size else (f"ckpt, up to {ckpt}" if ckpt else "no"))
        parts = (e.weights, e.gradients + e.optimizer, e.activations, e.total(), e.total(checkpointing=True))
        table.append([name, f"{e.trainable:,}", *(f"{value / MB:,.0f}" for value in parts), *cells])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
    if estimates:
        first = estimates[0]
        lines.insert(0, f"Peak training memory in MB at batch {first.batch_size} x {first.max_length} tokens per "
                     "device (estimate; includes a framework allowance). A budget column: the largest per-device "
                     "batch that fits, with gradient checkpointing (ckpt) when only that fits.")  # fmt: skip
    return "\n".join([*lines, *notes])


def fit(recipe: Recipe, budget: int, text: str) -> tuple[Recipe, dict[str, Any]]:
    """The recipe with a per-device batch size, gradient accumulation and checkpointing that fit `budget`.

    The effective batch (per-device batch x accumulation steps) stays the recipe's; gradient checkpointing is
    turned on only when no batch size fits without it. Returns the recipe and what was chosen.
    """
    if recipe.train.get("batch_tokens"):
        raise PeftuneError(
            f"--fit {text} chooses how many texts a batch holds, and train.batch_tokens sets a "
            "budget of tokens instead; drop one of them (`peftune plan` shows what a budget costs)"
        )
    planned = estimate(recipe)
    effective = planned.batch_size * int(recipe.train.get("gradient_accumulation_steps", 1))
    choice: dict[str, Any] = {"budget_mb": round(budget / MB), "effective_batch": effective}
    options = (True,) if recipe.train.get("gradient_checkpointing") else (False, True)
    sizes = [b for b in range(planned.batch_size, 0, -1) if effective % b == 0]  # divisors: effective batch kept
    for checkpointing in options:
        fitting = [b for b in sizes if planned.total(checkpointing, b, effective // b) <= budget]
        if fitting:
            batch = fitting[0]
            train = {**recipe.train, "per_device_train_batch_size": batch,
                     "gradient_accumulation_steps": effective // batch}  # fmt: skip
            if checkpointing:
                train["gradient_checkpointing"] = True
            choice.update(per_device_train_batch_size=batch, gradient_accumulation_steps=effective // batch,
                          gradient_checkpointing=checkpointing,
                          estimate_mb=round(planned.total(checkpointing, batch, effective // batch) / MB))  # fmt: skip
            return recipe.model_copy(update={"train": train}), choice
    raise PeftuneError(advice([planned], budget, text))


def advice(estimates: list[Estimate], budget: int, text: str) -> str:
    """One line for a budget no method fits at the recipe's batch size: what would fit instead."""
    options = []
    for e in estimates:
        # Below the recipe's batch, accumulation makes up the difference (and holds the gradients meanwhile).
        plain, ckpt = e.largest_batch(budget, accumulation=2), e.largest_batch(budget, True, accumulation=2)
        if plain >= 1:
            steps = -(-e.batch_size // plain)
            options.append(
                f"{e.method} with train.per_device_train_batch_size={plain} train.gradient_accumulation_steps={steps}"
            )
        elif ckpt >= 1:
            options.append(f"{e.method} with train.gradient_checkpointing=true and batch size {ckpt}")
    first = estimates[0]
    where = f"at batch {first.batch_size} x {first.max_length} tokens"
    if not options:
        return (f"nothing fits {text} {where}, not even one example with gradient checkpointing; use a smaller "
                "data.max_length or a smaller model")  # fmt: skip
    return f"nothing fits {text} {where}; what would: " + "; ".join(options[:3]) + " (or a smaller data.max_length)"


def _unquantized(recipe: Recipe) -> Recipe:
    """The recipe with a float base: the adapter is attached the same way, and quantization is counted separately."""
    return recipe.model_copy(update={"model": recipe.model.model_copy(update={"quantization": "none"})})


def _quantized_linears(model: Any, kept: list[str]) -> list[Any]:
    """The linear layers bitsandbytes quantizes: all but those inside the modules kept in full precision."""
    from torch import nn

    return [
        module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not any(name == k or name.startswith(k + ".") for k in kept)
    ]


def _quantized_linear_bytes(model: Any, kept: list[str], kind: str = "8bit") -> tuple[int, int]:
    """(float32 bytes, quantized bytes) of the linear weights bitsandbytes quantizes (all but the `kept` modules')."""
    linears = _quantized_linears(model, kept)
    fp32 = sum(module.weight.numel() * 4 for module in linears)
    if kind == "8bit":  # a byte a weight, and a float32 scale a row
        return fp32, sum(module.weight.numel() + module.out_features * 4 for module in linears)
    sizes = [module.weight.numel() for module in linears]  # NF4: half a byte a weight, scales per block
    return fp32, sum(-(-n // 2) + -(-n // 64) + 4 * -(-n // (64 * 256)) for n in sizes)


def _fused_attention() -> Any:
    """A torch function mode that traces attention without dropout as torch trains it: a fused kernel that keeps
    its query, key, value, output and one log-sum-exp per query for backward, not the batch x heads x length x
    length attention matrix that `scaled_dot_product_attention` keeps on the meta device (it computes attention
    step by step there). With dropout torch's CPU kernel keeps the matrix, as the step-by-step trace counts."""
    import torch
    from torch.overrides import TorchFunctionMode

    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")

    class FusedAttention(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.nn.functional.scaled_dot_product_attention:
                call = {**dict(zip(names, args, strict=False)), **kwargs}
                if not call.get("dropout_p") and not call.get("enable_gqa") and call["query"].dim() == 4:
                    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                        call["query"], call["key"], call["value"], 0.0, bool(call.get("is_causal")),
                        attn_mask=call.get("attn_mask"), scale=call.get("scale"),
                    )[0]  # fmt: skip
            return func(*args, **kwargs)

    return FusedAttention()


def _traced_activations(model: Any, config: Any, batch: int, length: int) -> tuple[int, int, int]:
    """Bytes autograd saves in one training forward pass on the meta device; bytes of the layer inputs; layers."""
    import torch

    saved: dict[int, int] = {}
    parameters = {id(p) for p in model.parameters()}  # weights saved for backward are counted as weights

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in parameters and id(tensor._base) not in parameters:
            saved[id(tensor)] = tensor.numel() * tensor.element_size()
        return tensor

    model.train()
    ids = torch.zeros((batch, length), dtype=torch.long, device="meta")
    labels = torch.zeros((batch,), dtype=torch.float if config.num_labels == 1 else torch.long, device="meta")
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), _fused_attention():
            model(input_ids=ids, labels=labels)
    except (RuntimeError, NotImplementedError, TypeError) as err:
        raise PeftuneError(
            f"cannot trace {config.model_type} on the meta device to estimate its activations ({err}); "
            "the plan covers encoder classifiers such as BERT, RoBERTa, DistilBERT and DeBERTa"
        ) from None
    layers = int(getattr(config, "num_hidden_layers", getattr(config, "n_layers", 0)) or 0)
    hidden = int(getattr(config, "hidden_size", getattr(config, "dim", 0)) or 0)
    return sum(saved.values()), layers * batch * length * hidden * 4, layers
