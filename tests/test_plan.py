"""The memory plan: its parts against what training really loads, its arithmetic, and the command."""

from __future__ import annotations

import json

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
    assert planned.weights / MB == pytest.approx(metrics["model_memory_mb"], rel=tolerance)


def test_eight_bit_weights_by_hand(tiny_bert, reviews, tmp_path):
    """Tiny BERT (hidden 32, intermediate 37, two layers): the linear layers outside the new head go to int8."""
    recipe = str(tiny.write_recipe(tmp_path / "r.yaml", tiny_bert, *reviews))
    fp32 = estimate(load_recipe(recipe))
    int8 = estimate(load_recipe(recipe, ["model.load_in_8bit=true"]))
    per_layer = 4 * 32 * 32 + 2 * 32 * 37  # query, key, value, attention output; intermediate and output
    rows_per_layer = 4 * 32 + 37 + 32
    weights, rows = 2 * per_layer + 32 * 32, 2 * rows_per_layer + 32  # two layers and the pooler
    assert fp32.weights - int8.weights == weights * 4 - (weights + rows * 4)
    assert int8.trainable == fp32.trainable and int8.activations == fp32.activations


def test_activations_scale_with_the_batch_and_checkpointing_saves_them(tiny_bert, reviews, tmp_path):
    recipe = str(tiny.write_recipe(tmp_path / "r.yaml", tiny_bert, *reviews))
    small = estimate(load_recipe(recipe, ["train.per_device_train_batch_size=4"]))
    large = estimate(load_recipe(recipe, ["train.per_device_train_batch_size=8"]))
    assert large.activations == pytest.approx(2 * small.activations, rel=1e-4)  # a few scalars do not scale
    assert 0 < large.activations_checkpointed < large.activations
    longer = estimate(load_recipe(recipe, ["train.per_device_train_batch_size=8", "data.max_length=64"]))
    assert longer.activations > 2 * large.activations * 0.99, "longer inputs cost at least linearly more"
    core = large.weights + large.gradients + large.optimizer + large.activations
    assert large.total() == int(ALLOWANCE_MB * MB + core * (1 + ALLOWANCE_SHARE))
    budget = large.total(batch_size=40)
    assert large.largest_batch(budget) == 40 or large.largest_batch(budget) == 39, "the inverse of total()"


def test_plan_command(tiny_models, reviews, tmp_path):
    recipe = str(tiny.write_recipe(tmp_path / "r.yaml", tiny_models("bert"), *reviews))
    result = CliRunner().invoke(main, ["plan", recipe])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines[2:]] == ["full", "lora", "lora-8bit", "prefix"]
    assert lines[1].split()[-8:] == ["8", "GB", "12", "GB", "16", "GB", "24", "GB"]
    assert "up to" in lines[2]

    distilbert = str(tiny.write_recipe(tmp_path / "d.yaml", tiny_models("distilbert"), *reviews))
    result = CliRunner().invoke(main, ["plan", distilbert, "--memory", "12GB"])
    assert result.exit_code == 0 and "prefix: prefix tuning needs a model that accepts past_key_values" in result.stdout

    none = CliRunner().invoke(main, ["plan", recipe, "--memory", "100MB"])
    assert none.exit_code == 2 and none.stderr.startswith("error: nothing fits 100MB at batch 8 x 32 tokens")
    assert "not even one example" in none.stderr and none.stderr.count("\n") == 1
    # A budget where no method fits the recipe's batch of 8 but one fits 4: a smaller batch with accumulation.
    from peftune.plan import plan

    budget = min(e.total(batch_size=4) for _, e in plan(recipe) if not isinstance(e, str))
    tight = CliRunner().invoke(main, ["plan", recipe, "--memory", f"{budget / 2**20:.3f}MB"])
    assert tight.exit_code == 2 and "what would: " in tight.stderr
    assert "train.gradient_accumulation_steps=" in tight.stderr
    bad = CliRunner().invoke(main, ["plan", recipe, "--memory", "lots"])
    assert bad.exit_code == 2 and "cannot read the memory size 'lots'" in bad.stderr
