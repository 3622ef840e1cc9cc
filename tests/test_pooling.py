"""Mean pooling (`model.pooling: mean`): every family's head reads the masked mean, and every way out keeps it."""

from __future__ import annotations

import json
import shutil

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


# --- the default: what the checkpoint was trained with ---------------------------------------------------------


def laid_out_as_sentence_transformers(tiny_bert, folder, **mode):
    """A copy of the tiny BERT as sentence-transformers saves a model: modules.json names its Pooling module."""
    shutil.copytree(tiny_bert, folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **mode}))
    return folder


ALL_OFF = {f"pooling_mode_{m}": False for m in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens")}


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ({**ALL_OFF, "pooling_mode_mean_tokens": True}, "mean"),  # all-MiniLM-L6-v2, all-mpnet-base-v2, e5
        ({**ALL_OFF, "pooling_mode_cls_token": True}, "cls"),  # bge
        ({**ALL_OFF, "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}, "cls"),  # not a plain mean
        ({"pooling_mode": "mean"}, "mean"),
        ({"pooling_mode": "lasttoken"}, "cls"),
        (None, "cls"),  # no modules.json: a plain transformers checkpoint
    ],
)
def test_a_checkpoint_is_read_the_way_it_was_trained(tiny_bert, tmp_path, mode, expected):
    from peftune.recipe import ModelSpec

    folder = tmp_path / "model"
    if mode is None:
        shutil.copytree(tiny_bert, folder)
    else:
        laid_out_as_sentence_transformers(tiny_bert, folder, **mode)
    assert pooling.of_checkpoint(ModelSpec(name_or_path=str(folder))) == expected


def test_a_merged_models_recorded_pooling_is_its_own(mean_run, tmp_path):
    from peftune.recipe import ModelSpec

    merged = merge_adapter(mean_run[0], output=tmp_path / "merged")  # config.json: classifier_pooling mean
    assert pooling.of_checkpoint(ModelSpec(name_or_path=str(merged))) == "mean"


def test_a_hub_checkpoint_out_of_reach_is_read_by_its_first_token_with_a_line_saying_so(monkeypatch, caplog):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    from peftune.recipe import ModelSpec

    def offline(repo_id, filename, **kwargs):
        raise LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    assert pooling.of_checkpoint(ModelSpec(name_or_path="tester/offline-model")) == "cls"
    assert "set model.pooling: mean" in caplog.text

    def config_only(repo_id, filename, **kwargs):  # reached: a repository with no sentence-transformers files
        raise EntryNotFoundError(filename)

    caplog.clear()
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", config_only)
    assert pooling.of_checkpoint(ModelSpec(name_or_path="tester/plain-model")) == "cls"
    assert caplog.text == ""


def test_a_run_on_a_mean_trained_checkpoint_reads_the_mean_unless_told(tmp_path, tiny_bert, reviews):
    from peftune.recipe import load_recipe

    model = laid_out_as_sentence_transformers(
        tiny_bert, tmp_path / "model", **{**ALL_OFF, "pooling_mode_mean_tokens": True}
    )
    runs = {}
    for name, overrides in {"default": (), "mean": ("model.pooling=mean",), "cls": ("model.pooling=cls",)}.items():
        (tmp_path / name).mkdir()
        runs[name] = train_tiny(tmp_path / name, model, reviews, *overrides)
    run, recorder = runs["default"]
    recipe = load_recipe(str(run.recipe_file))
    assert recipe.model.pooling == "mean"  # the run folder says what the head read
    assert torch.equal(recorder.logits, runs["mean"][1].logits)
    assert (recorder.logits - runs["cls"][1].logits).abs().max().item() > 1e-4
    assert (reloaded_logits(run) - recorder.logits).abs().max().item() < 1e-5
    # A run trained before the default (recipe.yaml: cls) is not this recipe's run; one that says mean is.
    as_trained = ("data.max_train_samples=24", "train.eval_strategy=no", "train.save_strategy=no")  # train_tiny's
    default = load_recipe(str(tmp_path / "default" / "recipe.yaml"), as_trained)
    assert default.model.pooling is None
    assert default.same_as_saved(run.recipe_file)
    assert not default.same_as_saved(runs["cls"][0].recipe_file)
