"""The memory plan: its parts against what training really loads, its arithmetic, and the command."""

from __future__ import annotations

import json
import math

import pytest
import tiny
from click.testing import CliRunner

from peftune.cli import main
from peftune.errors import PeftuneError
from peftune.plan import ALLOWANCE_MB, ALLOWANCE_SHARE, MB, estimate, parse_memory
from peftune.recipe import load_recipe


@pytest.mark.parametrize(("text", "expected"), [("8GB", 8 * 2**30), ("12 GiB", 12 * 2**30), ("500MB", 500 * 2**20),
                                                ("1.5g", int(1.5 * 2**30))])  # fmt: skip
def test_memory_sizes(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["eight", "8", "8XB", "-1GB", ""])
def test_unreadable_memory_sizes(text):
    with pytest.raises(PeftuneError, match="cannot read the memory size"):
        parse_memory(text)


@pytest.mark.parametrize("kind", ["full", "lora", "prefix", "lora8"])
def test_weights_and_trainable_parameters_match_what_training_loaded(runs, kind):
    """The trained runs recorded the real model's parameters and weight memory (8-bit: real bitsandbytes)."""
    metrics = json.loads((runs[kind] / "metrics.json").read_text())
    planned = estimate(load_recipe(str(runs[kind] / "recipe.yaml")))
    assert planned.trainable == metrics["trainable_parameters"]
    assert planned.gradients == 4 * planned.trainable and planned.optimizer == 8 * planned.trainable
    tolerance = 0.02 if kind == "lora8" else 0.001
    # metrics.json rounds to 0.01 MB
    assert planned.weights / MB == pytest.approx(metrics["model_memory_mb"], rel=tolerance, abs=0.005)


def test_eight_bit_weights_by_hand(tiny_bert, reviews, tmp_path):
    """Tiny BERT (hidden 32, intermediate 37, two layers): the linear layers outside the head and pooler go to int8."""
    recipe = str(tiny.write_recipe(tmp_path / "r.yaml", tiny_bert, *reviews))
    fp32 = estimate(load_recipe(recipe))
    int8 = estimate(load_recipe(recipe, ["model.quantization=8bit"]))
    per_layer = 4 * 32 * 32 + 2 * 32 * 37  # query, key, value, attention output; intermediate and output
    rows_per_layer = 4 * 32 + 37 + 32
    weights, rows = 2 * per_layer, 2 * rows_per_layer  # two layers; the pooler is trained in full with the head
    assert fp32.weights - int8.weights == weights * 4 - (weights + rows * 4)
    assert int8.trainable == fp32.trainable
    # bitsandbytes would keep each int8 layer's input for its backward pass; peftune frees those of frozen layers
    # (modeling.int8_keeps_only_what_backward_needs, tested in test_quantized): the activations are float's.
    assert int8.activations == fp32.activations


def test_four_bit_weights_by_hand(tiny_bert, reviews, tmp_path):
    """NF4 with double quantization: half a byte a weight, a one-byte scale per block of 64 weights, and a float32
    scale per 256 of those; its matmuls keep no input for the backward pass, so the activations are float's."""
    recipe = str(tiny.write_recipe(tmp_path / "r.yaml", tiny_bert, *reviews))
    fp32 = estimate(load_recipe(recipe))
    nf4 = estimate(load_recipe(recipe, ["model.quantization=4bit"]))
    square = 32 * 32 // 2 + 32 * 32 // 64 + 4  # query, key, value, attention output: 1,024 weights each
    wide = 32 * 37 // 2 + math.ceil(32 * 37 / 64) + 4  # intermediate and output: 1,184 weights each
    quantized_bytes = 2 * (4 * square + 2 * wide)  # two layers; the pooler is trained in full with the head
    float_bytes = 2 * (4 * 32 * 32 + 2 * 32 * 37) * 4
    assert fp32.weights - nf4.weights == float_bytes - quantized_bytes
    assert nf4.activations == fp32.activations and nf4.trainable == fp32.trainable
    assert nf4.method == "lora-4bit"


def test_four_bit_plan_matches_the_loaded_model(tiny_bert, reviews, tmp_path):
    from peftune.data import Labels
    from peftune.modeling import load_base_model, memory_footprint

    recipe = load_recipe(str(tiny.write_recipe(tmp_path / "r.yaml", tiny_bert, *reviews)), ["model.quantization=4bit"])
    planned = estimate(load_recipe(str(tmp_path / "r.yaml"), ["model.quantization=4bit", "method=lora"]))
    model, fresh = load_base_model(recipe.model, Labels(names=("negative", "positive")))
    from peftune.modeling import attach_method

    loaded = memory_footprint(attach_method(model, recipe, fresh))
    assert planned.weights == pytest.approx(loaded, rel=0.01)


def test_activations_scale_with_the_batch_and_checkpointing_saves_them(tiny_bert, reviews, tmp_path):
    recipe = str(tiny.write_recipe(tmp_path / "r.yaml", tiny_bert, *reviews))
    small = estimate(load_recipe(recipe, ["train.per_device_train_batch_size=4"]))
    large = estimate(load_recipe(recipe, ["train.per_device_train_batch_size=8"]))
    assert large.activations == pytest.approx(2 * small.activations, rel=1e-4)  # a few scalars do not scale
    assert 0 < large.activations_checkpointed < large.activations
    longer = estimate(load_recipe(recipe, ["train.per_device_train_batch_size=8", "data.max_length=64"]))
    assert longer.activations > 2 * large.activations * 0.99, "longer inputs cost at least linearly more"
    budget = large.total(batch_size=40)
    assert large.largest_batch(budget) in (39, 40), "the inverse of total()"
    budget = large.total(batch_size=40, accumulation=2)
    assert large.largest_batch(budget, accumulation=2) in (39, 40), "the inverse of total(), accumulating"


def test_the_plan_leaves_out_what_dropout_keeps_when_it_is_off(tiny_bert, reviews, tmp_path):
    """Dropout keeps its mask and its output for backward; `model.dropout=0` plans without them."""
    recipe = str(tiny.write_recipe(tmp_path / "r.yaml", tiny_bert, *reviews))
    kept = estimate(load_recipe(recipe, ["model.dropout=0.1"]))
    off = estimate(load_recipe(recipe, ["model.dropout=0"]))
    assert off.weights == kept.weights and off.trainable == kept.trainable
    assert 0 < off.activations < 0.9 * kept.activations


def saved_on_cpu(recipe) -> int:
    """Bytes autograd keeps for backward in one real training forward pass on the CPU (weights not counted)."""
    import torch

    from peftune import modeling
    from peftune.data import Labels

    base, fresh = modeling.load_base_model(recipe.model, Labels(names=("negative", "positive")))
    model = modeling.attach_method(base, recipe, fresh)
    model.train()
    weights = {id(p) for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        if id(tensor) not in weights and id(tensor._base) not in weights:
            saved[id(tensor)] = tensor.numel() * tensor.element_size()
        return tensor

    batch, length = recipe.train["per_device_train_batch_size"], recipe.data.max_length
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=torch.randint(5, 90, (batch, length)), labels=torch.zeros(batch, dtype=torch.long))
    return sum(saved.values())


@pytest.mark.parametrize("settings", [["model.dropout=0"], ["model.dropout=0.1"], ["method=full"]])
def test_planned_activations_are_what_training_keeps_on_the_cpu(tiny_bert, reviews, tmp_path, settings):
    """Without dropout torch's fused attention keeps no attention matrix, with it the step-by-step one does: the
    plan, traced on the meta device where attention is always step by step, counts what the CPU keeps."""
    path = str(tiny.write_recipe(tmp_path / "r.yaml", tiny_bert, *reviews))
    recipe = load_recipe(path, ["train.per_device_train_batch_size=4", "data.max_length=64", *settings])
    assert estimate(recipe).activations == pytest.approx(saved_on_cpu(recipe), rel=0.02)


def test_a_token_budget_is_planned_as_its_costliest_batch(tiny_bert, reviews, tmp_path):
    """Batches of up to N tokens peak at N // max_length texts of max_length tokens, whatever the batch size."""
    recipe = str(tiny.write_recipe(tmp_path / "r.yaml", tiny_bert, *reviews))
    six = estimate(load_recipe(recipe, ["train.per_device_train_batch_size=6"]))
    budget = estimate(load_recipe(recipe, ["train.batch_tokens=200", "train.per_device_train_batch_size=32"]))
    assert budget.batch_size == 6 and budget.max_length == 32 and budget.activations == six.activations


def test_activations_and_gradients_do_not_peak_together(tiny_bert, reviews, tmp_path):
    """Weights and optimizer state always; on top, the activations or twice the gradients (the optimizer step),
    whichever is larger; accumulating, the gradients of earlier batches are held during the next forward."""
    recipe = str(tiny.write_recipe(tmp_path / "r.yaml", tiny_bert, *reviews))

    def total(core):
        return int(ALLOWANCE_MB * MB + core * (1 + ALLOWANCE_SHARE))

    # LoRA: few gradients, the activations set the peak; accumulation adds the held gradients to them.
    lora = estimate(load_recipe(recipe))
    assert lora.activations > 2 * lora.gradients
    assert lora.total() == total(lora.weights + lora.optimizer + lora.activations)
    assert lora.total(accumulation=4) == total(lora.weights + lora.optimizer + lora.activations + lora.gradients)
    accumulating = estimate(load_recipe(recipe, ["train.gradient_accumulation_steps=2"]))
    assert accumulating.total() == lora.total(accumulation=2), "the recipe's accumulation is the default"

    # Full fine-tuning of this tiny model: its 4 MB of gradients (mostly the embeddings) outweigh a batch of
    # activations, so the optimizer step sets the peak whatever the batch size, and a budget below it fits none.
    full = estimate(load_recipe(recipe, ["method=full"]))
    step = total(full.weights + full.optimizer + 2 * full.gradients)
    assert full.activations < 2 * full.gradients
    assert full.total() == full.total(batch_size=1) == step
    assert full.largest_batch(step - MB) == 0 and full.largest_batch(step) >= 8


def test_plan_command(tiny_models, reviews, tmp_path):
    recipe = str(tiny.write_recipe(tmp_path / "r.yaml", tiny_models("bert"), *reviews))
    result = CliRunner().invoke(main, ["plan", recipe])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines[2:]] == ["full", "lora", "lora-8bit", "lora-4bit", "prefix"]
    assert lines[1].split()[-8:] == ["8", "GB", "12", "GB", "16", "GB", "24", "GB"]
    assert "up to" in lines[2]

    distilbert = str(tiny.write_recipe(tmp_path / "d.yaml", tiny_models("distilbert"), *reviews))
    result = CliRunner().invoke(main, ["plan", distilbert, "--memory", "12GB"])
    assert result.exit_code == 0 and [line.split()[0] for line in result.stdout.splitlines()[2:]][-1] == "prefix"
    albert = tmp_path / "albert"  # an architecture prefix tuning does not reach: its row says why
    albert.mkdir()
    (albert / "config.json").write_text('{"model_type": "albert", "hidden_size": 32, "num_attention_heads": 2}')
    result = CliRunner().invoke(main, ["plan", recipe, f"model.name_or_path={albert}"])
    assert result.exit_code == 0 and "prefix: prefix tuning supports bert, roberta" in result.stdout

    none = CliRunner().invoke(main, ["plan", recipe, "--memory", "100MB"])
    assert none.exit_code == 2 and none.stderr.startswith("error: nothing fits 100MB at batch 8 x 32 tokens")
    assert "not even one example" in none.stderr and none.stderr.count("\n") == 1
    # A budget where no method fits the recipe's batch of 8 but one fits 4: a smaller batch with accumulation.
    from peftune.plan import plan

    budget = min(e.total(batch_size=4, accumulation=2) for _, e in plan(recipe) if not isinstance(e, str))
    tight = CliRunner().invoke(main, ["plan", recipe, "--memory", f"{budget / 2**20:.3f}MB"])
    assert tight.exit_code == 2 and "what would: " in tight.stderr
    assert "train.gradient_accumulation_steps=" in tight.stderr
    bad = CliRunner().invoke(main, ["plan", recipe, "--memory", "lots"])
    assert bad.exit_code == 2 and "cannot read the memory size 'lots'" in bad.stderr


def test_plan_of_a_recipe_on_a_quantized_base_has_every_row(tiny_models, reviews, tmp_path):
    # Each row sets its own base precision: the full fine-tuning row of an 8-bit recipe is a float run.
    recipe = str(tiny.write_recipe(tmp_path / "r.yaml", tiny_models("bert"), *reviews))
    float_rows = CliRunner().invoke(main, ["plan", recipe]).stdout.splitlines()[2:]
    result = CliRunner().invoke(main, ["plan", recipe, "model.quantization=8bit"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[2:] == float_rows


def test_fit_keeps_the_effective_batch_and_records_its_choice(tiny_bert, reviews, tmp_path):
    from peftune.plan import fit

    recipe_file = str(tiny.write_recipe(tmp_path / "r.yaml", tiny_bert, *reviews))
    recipe = load_recipe(recipe_file)  # per-device batch 8, no accumulation
    planned = estimate(recipe)

    same, choice = fit(recipe, planned.total() + MB, "roomy")
    assert same.train == recipe.train | {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1}
    assert choice["gradient_checkpointing"] is False

    # Room for a batch of 4 but not 8: four per device, two accumulation steps, no checkpointing.
    smaller, choice = fit(recipe, planned.total(batch_size=4, accumulation=2), "tight")
    assert (smaller.train["per_device_train_batch_size"], smaller.train["gradient_accumulation_steps"]) == (4, 2)
    assert "gradient_checkpointing" not in smaller.train and choice["effective_batch"] == 8

    # Room only with checkpointing (not even one example fits without): it is turned on.
    budget = planned.total(batch_size=1, accumulation=8) - 1
    checkpointed, choice = fit(recipe, budget, "only-ckpt")
    batch = choice["per_device_train_batch_size"]
    assert checkpointed.train["gradient_checkpointing"] is True and choice["gradient_checkpointing"] is True
    assert planned.total(True, batch, 8 // batch) <= budget and 8 % batch == 0
    assert checkpointed.train["gradient_accumulation_steps"] == 8 // batch

    with pytest.raises(PeftuneError, match=r"nothing fits 100MB"):
        fit(recipe, 100 * MB, "100MB")
    # Prefix tuning checkpoints too (its prefixes reach the recomputed layers).
    prefix = load_recipe(recipe_file, ["method=prefix"])
    _, choice = fit(prefix, estimate(prefix).total(batch_size=1, accumulation=8) - 1, "tight")
    assert choice["gradient_checkpointing"] is True

    # Through training: the run trains with the choice, records it, and its effective batch is the recipe's.
    tight = f"{math.ceil(planned.total(batch_size=4, accumulation=2) / MB * 1000) / 1000:.3f}MB"  # not rounded down
    result = CliRunner().invoke(
        main, ["--quiet", "train", recipe_file, "--fit", tight, "--output-dir", str(tmp_path / "run")]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["fit"]["per_device_train_batch_size"] == 4 and metrics["fit"]["gradient_accumulation_steps"] == 2
    assert metrics["global_steps"] == 8, "64 reviews, effective batch 8: 8 optimizer steps, as without --fit"
