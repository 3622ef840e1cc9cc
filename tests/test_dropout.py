"""`model.dropout`: every dropout of the model (encoder and head) set from the recipe, in every family."""

from __future__ import annotations

import json

import pytest
import tiny
import torch
from trained import batch
from transformers import AutoTokenizer, PretrainedConfig, TrainerCallback

from peftune import modeling
from peftune.data import Labels
from peftune.errors import PeftuneError
from peftune.recipe import ModelSpec, load_recipe

LABELS = Labels(names=("negative", "positive"))


def train_mode_logits(folder, dropout: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Two forward passes of the loaded classifier in training mode, on the same batch."""
    model, _ = modeling.load_base_model(ModelSpec(name_or_path=str(folder), dropout=dropout), LABELS)
    model.train()
    inputs = batch(AutoTokenizer.from_pretrained(folder))
    with torch.no_grad():
        return model(**inputs).logits, model(**inputs).logits


@pytest.mark.parametrize("arch", ["bert", "roberta", "electra", "distilbert", "deberta-v2"])
def test_dropout_zero_makes_training_passes_repeat(tiny_models, arch):
    folder = tiny_models(arch)
    first, second = train_mode_logits(folder, None)  # the checkpoint's dropout (0.1, DistilBERT's head 0.2)
    assert (first - second).abs().max().item() > 1e-4, "the checkpoint's dropout should make the passes differ"
    first, second = train_mode_logits(folder, 0.0)
    assert torch.equal(first, second), f"a dropout left on in {arch} with model.dropout=0"


def test_dropout_sets_every_probability_the_config_has(tiny_models):
    model, _ = modeling.load_base_model(ModelSpec(name_or_path=str(tiny_models("distilbert")), dropout=0.3), LABELS)
    config = model.config
    assert (config.dropout, config.attention_dropout, config.seq_classif_dropout) == (0.3, 0.3, 0.3)
    rates = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    assert rates == {0.3}


def test_no_dropout_setting_keeps_the_checkpoints(tiny_models):
    model, _ = modeling.load_base_model(ModelSpec(name_or_path=str(tiny_models("bert"))), LABELS)
    assert (model.config.hidden_dropout_prob, model.config.attention_probs_dropout_prob) == (0.1, 0.1)


def test_a_config_without_dropout_is_refused_with_the_fix():
    with pytest.raises(PeftuneError, match=r"has no dropout setting to change; remove model\.dropout"):
        modeling.dropout_settings(PretrainedConfig(), 0.2)


def test_a_config_without_dropout_has_nothing_to_turn_off():
    assert modeling.dropout_settings(PretrainedConfig(), 0.0) == {}  # LoRA's default on such a model: no refusal


def test_lora_turns_the_models_dropout_off_unless_the_recipe_sets_it(tiny_bert, reviews, tmp_path):
    recipe = str(tiny.write_recipe(tmp_path / "r.yaml", tiny_bert, *reviews))  # method: lora
    assert load_recipe(recipe).model.dropout == 0.0
    assert load_recipe(recipe, ["model.dropout=0.1"]).model.dropout == 0.1
    assert load_recipe(recipe, ["method=full"]).model.dropout is None  # the checkpoint's
    assert load_recipe(recipe, ["method=prefix"]).model.dropout is None
    assert "  dropout: 0.0\n" in load_recipe(recipe).to_yaml(), "the run's recipe.yaml says what ran"


class DropoutRates(TrainerCallback):
    """The dropout probabilities of the model the Trainer trains."""

    def __init__(self):
        self.rates: set[float] = set()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.rates = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}


def test_lora_trains_without_dropout_and_merges_to_the_checkpoints_config(tiny_bert, reviews, tmp_path):
    from peftune.merge import merge_adapter
    from peftune.train import train

    recipe = str(tiny.write_recipe(tmp_path / "r.yaml", tiny_bert, *reviews))  # method: lora, no model.dropout
    seen = DropoutRates()
    overrides = ["data.max_train_samples=16", "train.eval_strategy=no", "train.save_strategy=no"]
    run = train(load_recipe(recipe, overrides), output_dir=tmp_path / "run", callbacks=[seen])
    assert seen.rates == {0.0}, "LoRA's default should train with every dropout of the model off"
    merged = merge_adapter(run.path, output=tmp_path / "merged")
    config = json.loads((merged / "config.json").read_text())
    assert (config["hidden_dropout_prob"], config["attention_probs_dropout_prob"]) == (0.1, 0.1), (
        "the merged model should carry the checkpoint's dropout, not the run's training setting"
    )
