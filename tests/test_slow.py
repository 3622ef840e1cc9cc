"""End-to-end runs on real data with the real checkpoint (minutes each): `python -m pytest -m slow`."""

from __future__ import annotations

import json

import pytest

from peftune.recipe import load_recipe
from peftune.train import train

pytestmark = pytest.mark.slow
SHORT = ["data.max_train_samples=8000"]  # sst2-minilm trains on all 67,349 sentences; these runs on 8,000


@pytest.fixture
def data_dir(shared_data, monkeypatch):
    folder = shared_data("sst2").parent
    monkeypatch.setenv("PEFTUNE_DATA_DIR", str(folder))
    return folder


def test_quickstart_is_clearly_above_chance(tmp_path):
    metrics = train(load_recipe("quickstart"), output_dir=tmp_path / "run").read_metrics()
    assert metrics.primary_metric.value >= 0.8


def test_sst2_lora_defaults_reach_83_percent_in_one_epoch(tmp_path, data_dir):
    recipe = load_recipe("sst2-minilm", SHORT)
    assert recipe.method == "lora" and "learning_rate" not in recipe.train
    metrics = train(recipe, output_dir=tmp_path / "lora").read_metrics()
    assert metrics.train_samples == 8000 and metrics.eval_samples == 872
    assert metrics.eval["accuracy"] >= 0.83


def test_sst2_full_runs_with_its_own_learning_rate(tmp_path, data_dir):
    metrics = train(load_recipe("sst2-minilm", [*SHORT, "method=full"]), output_dir=tmp_path / "full").read_metrics()
    assert metrics.learning_rate == pytest.approx(5e-5)
    assert metrics.eval["accuracy"] >= 0.8


@pytest.mark.parametrize("overrides", [["method=prefix"], ["model.quantization=8bit"]], ids=["prefix", "lora-8bit"])
def test_sst2_prefix_and_8bit_lora_complete(tmp_path, data_dir, overrides):
    metrics = train(load_recipe("sst2-minilm", [*SHORT, *overrides]), output_dir=tmp_path / "run").read_metrics()
    assert metrics.train_samples == 8000 and metrics.eval_samples == 872
    assert metrics.quantization == ("8bit" if "model.quantization=8bit" in overrides else "none")
    assert metrics.eval["accuracy"] >= 0.75, "clearly learned (chance is 0.51)"


def test_sst2_merged_lora_in_a_plain_pipeline_agrees_with_predict(tmp_path, data_dir):
    from transformers import pipeline

    from peftune.merge import merge_adapter
    from peftune.predict import predict_file

    run = train(load_recipe("sst2-minilm", SHORT), output_dir=tmp_path / "lora")
    merged = merge_adapter(run.path)
    dev = data_dir / "sst2" / "dev.tsv"
    predict_file(run.path, dev, tmp_path / "predictions.jsonl")
    predicted = [json.loads(line)["label"] for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    texts = [line.split("\t")[0] for line in dev.read_text(encoding="utf-8").splitlines()[1:]]
    piped = [out["label"] for out in pipeline("text-classification", model=str(merged))(texts, batch_size=64)]
    assert len(piped) == len(predicted) == 872
    assert piped == predicted
