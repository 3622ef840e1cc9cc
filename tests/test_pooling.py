"""Mean pooling (`model.pooling: mean`): every family's head reads the masked mean, and every way out keeps it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from trained import PROBE, batch, reloaded_logits, train_tiny
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from peftune import pooling
from peftune.export import export_model
from peftune.inference import load_target
from peftune.merge import merge_adapter

# What each family's head computes from the base model's token states (eval mode: no dropout).
HEADS = {
    "bert": lambda m, seq: m.classifier(m.bert.pooler(seq)),
    "roberta": lambda m, seq: m.classifier(seq),
    "electra": lambda m, seq: m.classifier(seq),
    "distilbert": lambda m, seq: m.classifier(torch.relu(m.pre_classifier(seq[:, 0]))),
    "deberta-v2": lambda m, seq: m.classifier(m.pooler(seq)),
}


@pytest.mark.parametrize("arch", HEADS)
def test_each_familys_head_reads_the_masked_mean(tiny_models, arch):
    folder = tiny_models(arch)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    padded = batch(tokenizer)  # three texts of different lengths: the shorter ones padded
    base = getattr(model, model.base_model_prefix)
    with torch.no_grad():
        first_token = model(**padded).logits
        hidden = base(**padded)[0]
        mask = padded["attention_mask"].unsqueeze(-1).float()
        mean = (hidden * mask).sum(1) / mask.sum(1)
        expected = HEADS[arch](model, torch.cat([mean.unsqueeze(1), hidden[:, 1:]], dim=1))

        pooling.apply(model, "mean")
        logits = model(**padded).logits
        alone = model(**tokenizer(PROBE[2:], return_tensors="pt")).logits
    assert model.config.classifier_pooling == "mean"
    assert (logits - expected).abs().max().item() < 1e-5
    assert (logits[2] - alone[0]).abs().max().item() < 1e-5, "padding must not count in the mean"
    assert (logits - first_token).abs().max().item() > 1e-4, "the head must read something else than [CLS]"


def test_applying_twice_hooks_once(tiny_bert):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    with torch.no_grad():
        once = pooling.apply(model, "mean")(**batch(tokenizer)).logits
        twice = pooling.apply(pooling.apply(model))(**batch(tokenizer)).logits
    assert torch.equal(once, twice)


@pytest.mark.parametrize("method", ["lora", "full", "prefix"])
def test_a_mean_pooled_run_reloads_to_the_same_logits(tmp_path, tiny_bert, reviews, method):
    run, recorder = train_tiny(tmp_path, tiny_bert, reviews, f"method={method}", "model.pooling=mean")
    assert (reloaded_logits(run) - recorder.logits).abs().max().item() < 1e-5
    (tmp_path / "cls").mkdir()
    _, cls_recorder = train_tiny(tmp_path / "cls", tiny_bert, reviews, f"method={method}")
    assert (cls_recorder.logits - recorder.logits).abs().max().item() > 1e-4  # the option changed the model


@pytest.fixture(scope="module")
def mean_run(tmp_path_factory, tiny_models, reviews):
    folder = tmp_path_factory.mktemp("mean")
    run, recorder = train_tiny(folder, tiny_models("bert"), reviews, "model.pooling=mean", "train.num_train_epochs=2")
    return run.path, recorder.logits


def test_the_merged_model_keeps_mean_pooling(mean_run, tmp_path):
    run, trained = mean_run
    merged = merge_adapter(run, output=tmp_path / "merged")
    assert json.loads((merged / "merge.json").read_text())["check"]["passed"]
    assert json.loads((merged / "config.json").read_text())["classifier_pooling"] == "mean"
    assert 'peftune.pooling.apply(model, "mean")' in (merged / "README.md").read_text()
    loaded = load_target(merged)
    with torch.no_grad():
        assert (loaded.model(**batch(loaded.tokenizer)).logits - trained).abs().max().item() < 1e-4
        # transformers alone reads [CLS] (what the docs say); one call restores the run's pooling.
        plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
        assert (plain(**batch(loaded.tokenizer)).logits - trained).abs().max().item() > 1e-4
        restored = pooling.apply(plain)(**batch(loaded.tokenizer)).logits
    assert (restored - trained).abs().max().item() < 1e-4


def test_the_onnx_export_has_mean_pooling_in_its_graph(mean_run, tmp_path):
    import onnxruntime

    run, trained = mean_run
    folder, record = export_model(run, "onnx", output=tmp_path / "onnx")
    assert record.check is not None and record.check.max_abs_logit_difference < 1e-5
    tokenizer = AutoTokenizer.from_pretrained(folder)
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"))
    inputs = tokenizer(PROBE, padding=True, truncation=True, max_length=32, return_tensors="np")
    feed = {i.name: inputs[i.name].astype(np.int64) for i in session.get_inputs()}
    assert np.abs(session.run(["logits"], feed)[0] - trained.numpy()).max() < 1e-4


def test_the_pushed_card_says_how_to_load_it_and_that_way_works(mean_run, tmp_path, tiny_bert):
    from peft import PeftModel

    from peftune.push import stage
    from peftune.rundir import complete_run

    run, trained = mean_run
    folder = stage(complete_run(run), tmp_path / "stage", "tester/mean", base_model_id="tester/tiny-bert", echo=str)
    assert pooling.USAGE_NOTE in (folder / "README.md").read_text()
    # The card's way with stock peft: the base, the adapter, then the pooling.
    labels = {0: "negative", 1: "positive"}
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert, id2label=labels, label2id={"negative": 0, "positive": 1}
    )
    model = pooling.apply(PeftModel.from_pretrained(base, str(folder)).eval(), "mean")
    with torch.no_grad():
        logits = model(**batch(AutoTokenizer.from_pretrained(folder))).logits
    assert (logits - trained).abs().max().item() < 1e-5
