"""Using a trained run: eval, predict, merge and export."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import tiny
from click.testing import CliRunner

from peftune.cli import main
from peftune.errors import PeftuneError
from peftune.evaluation import evaluate, format_result
from peftune.export import export_model
from peftune.inference import batched_logits, load_target
from peftune.merge import merge_adapter
from peftune.predict import predict_file, predict_texts
from peftune.recipe import load_recipe
from peftune.record import ExportRecord
from peftune.train import train

NEW_TEXTS = [
    "The screen is gorgeous and the battery never quits.",
    "Cold food, rude staff, never again.",
    "It works.",
    "The course notes were a great reference, and the teacher explained hard ideas simply.",
]


def eval_texts(reviews) -> tuple[list[str], list[str]]:
    with open(reviews[1], encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [r["label"] for r in rows]


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(PeftuneError) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


# --- merge ----------------------------------------------------------------------------------------------


def test_merged_folder_works_in_a_plain_pipeline_like_predict(runs, reviews, tmp_path):
    from transformers import pipeline

    merged = merge_adapter(runs["lora"], output=tmp_path / "merged")
    record = json.loads((merged / "merge.json").read_text())
    assert record["check"]["passed"] and record["check"]["max_abs_logit_difference"] < 1e-3
    assert not list(merged.glob("adapter_*")), "standalone: no peft files"
    texts, _ = eval_texts(reviews)
    classifier = pipeline("text-classification", model=str(merged))
    from_pipeline = [p["label"] for p in classifier(texts)]
    from_run = [p["label"] for p in predict_texts(runs["lora"], texts)]
    assert from_pipeline == from_run
    assert set(from_pipeline) <= {"negative", "positive"}


def test_merging_twice_is_harmless(runs, tmp_path):
    first = merge_adapter(runs["lora"], output=tmp_path / "m")
    weights = (first / "model.safetensors").read_bytes()
    second = merge_adapter(runs["lora"], output=tmp_path / "m")
    assert second == first and (second / "model.safetensors").read_bytes() == weights


def test_merge_in_half_precision(runs, tmp_path):
    from transformers import AutoModelForSequenceClassification

    merged = merge_adapter(runs["lora"], output=tmp_path / "half", dtype="bfloat16")
    model = AutoModelForSequenceClassification.from_pretrained(merged)
    assert str(model.dtype) == "torch.bfloat16"
    assert json.loads((merged / "merge.json").read_text())["check"]["label_agreement"] >= 0.98


def test_merge_of_an_8bit_run_goes_into_full_precision(runs, tmp_path):
    """The fp32 merge agrees with the adapter model at least as well as a merge into int8 weights."""
    reference = load_target(runs["lora8"])  # the adapter on its int8 base, as trained
    texts = [row["text"] for row in reference.samples]
    expected = batched_logits(reference, texts)

    merged = load_target(merge_adapter(runs["lora8"], output=tmp_path / "m8"))
    assert all(p.dtype.is_floating_point for p in merged.model.parameters()), "no int8 weights in the merge"
    fp32_logits = batched_logits(merged, texts)

    reference.model = reference.model.merge_and_unload()  # what peft does to int8 weights: re-quantize
    int8_logits = batched_logits(reference, texts)

    fp32_difference = np.abs(fp32_logits - expected).mean()
    int8_difference = np.abs(int8_logits - expected).mean()
    fp32_agreement = (fp32_logits.argmax(-1) == expected.argmax(-1)).mean()
    int8_agreement = (int8_logits.argmax(-1) == expected.argmax(-1)).mean()
    print(f"mean |logit diff| fp32 {fp32_difference:.2e} int8 {int8_difference:.2e}; "
          f"agreement fp32 {fp32_agreement:.3f} int8 {int8_agreement:.3f}")  # fmt: skip
    assert fp32_agreement >= int8_agreement
    assert fp32_difference <= int8_difference


def test_merge_refusals(runs, tmp_path):
    message = one_line_error(merge_adapter, runs["prefix"])
    assert "cannot be folded into the weights" in message and "peftune predict" in message and "export" in message
    message = one_line_error(merge_adapter, runs["full"])
    assert "nothing to merge" in message and str(runs["full"] / "model") in message
    assert "not found" in one_line_error(merge_adapter, tmp_path / "no-run")
    merged = merge_adapter(runs["lora"], output=tmp_path / "merged")
    message = one_line_error(merge_adapter, merged)
    assert "is a standalone model" in message and "no adapter to merge" in message
    broken = tmp_path / "broken"
    shutil.copytree(runs["lora"], broken)
    (broken / "metrics.json").unlink()
    assert "incomplete run" in one_line_error(merge_adapter, broken)
    (tmp_path / "taken").mkdir()
    assert "is not a merge of" in one_line_error(merge_adapter, runs["lora"], output=tmp_path / "taken")


# --- export ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lora", "full", "prefix"])
def test_onnx_export_matches_pytorch_under_onnxruntime(runs, tmp_path, kind):
    import onnxruntime

    folder, record = export_model(runs[kind], "onnx", output=tmp_path / "onnx")
    # Float32 on the same inputs: far inside the tolerance (texts longer than max_length are cut for both sides).
    assert record.check is not None and record.check.max_abs_logit_difference < 1e-5
    assert json.loads((folder / "config.json").read_text())["id2label"] == {"0": "negative", "1": "positive"}
    assert (folder / "tokenizer_config.json").is_file() and (folder / "labels.json").is_file()

    session = onnxruntime.InferenceSession(str(folder / "model.onnx"))
    loaded = load_target(runs[kind])
    for size in (1, 3):  # batch and sequence sizes other than the traced example
        batch = loaded.tokenizer(NEW_TEXTS[:size], padding=True, return_tensors="np")
        inputs = {i.name: batch[i.name].astype(np.int64) for i in session.get_inputs()}
        onnx_logits = session.run(["logits"], inputs)[0]
        torch_logits = batched_logits(loaded, NEW_TEXTS[:size])
        assert np.abs(onnx_logits - torch_logits).max() < 1e-4


@pytest.mark.parametrize("kind", ["lora", "prefix"])
def test_predict_and_eval_run_an_onnx_export_like_the_run(runs, reviews, tmp_path, kind):
    folder, _ = export_model(runs[kind], "onnx", output=tmp_path / "onnx")
    assert not (folder / "model.safetensors").exists(), "the export has no torch weights to fall back on"
    texts, _ = eval_texts(reviews)
    from_run = predict_texts(runs[kind], texts, probabilities=True)
    from_export = predict_texts(folder, texts, probabilities=True)
    assert [p["label"] for p in from_export] == [p["label"] for p in from_run]
    assert np.allclose([p["score"] for p in from_export], [p["score"] for p in from_run], atol=1e-5)
    # predict's file path and eval read the export's recipe and labels as they read the run's.
    predict_file(folder, reviews[1], tmp_path / "out.csv")
    with open(tmp_path / "out.csv", encoding="utf-8") as f:
        assert [row["label"] for row in csv.DictReader(f)] == [p["label"] for p in from_run]
    on_export = evaluate(folder, output=tmp_path / "e.json")["metrics"]
    on_run = evaluate(runs[kind], output=tmp_path / "r.json")["metrics"]
    assert on_export == pytest.approx(on_run, abs=1e-6)
    message = one_line_error(export_model, folder, "safetensors", output=tmp_path / "again")
    assert "already an ONNX export" in message and "export.json" in message


def test_an_onnx_export_without_onnxruntime_says_which_extra(runs, tmp_path, monkeypatch):
    import importlib.util

    folder, _ = export_model(runs["full"], "onnx", output=tmp_path / "onnx")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    message = one_line_error(predict_texts, folder, ["Fine."])
    assert "ONNX export" in message and "pip install 'peftune[onnx]'" in message


def test_safetensors_export_in_a_chosen_dtype(runs, tmp_path):
    from transformers import AutoModelForSequenceClassification

    folder, _ = export_model(runs["full"], "safetensors", output=tmp_path / "st", dtype="float16")
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    assert str(model.dtype) == "torch.float16" and model.config.id2label[1] == "positive"
    merged_export, _ = export_model(runs["lora"], "safetensors", output=tmp_path / "lora-st")
    assert (merged_export / "model.safetensors").is_file() and not list(merged_export.glob("adapter_*"))


def test_export_of_a_lora_run_checks_its_merge_as_merge_does(runs, tmp_path, monkeypatch):
    from peftune import merge

    folder, record = export_model(runs["lora"], "safetensors", output=tmp_path / "st")
    assert record.merge_check is not None and record.merge_check.passed
    assert record.merge_check.max_abs_logit_difference < 1e-3
    saved = json.loads((folder / "export.json").read_text())
    assert ExportRecord.from_json(saved) == record and saved["check"] == {}  # no ONNX check for safetensors
    keys = ["samples", "max_abs_logit_difference", "label_agreement", "tolerance", "passed"]
    assert list(saved["merge_check"]) == keys
    assert export_model(runs["full"], "safetensors", output=tmp_path / "full")[1].merge_check is None
    monkeypatch.setattr(merge, "MAX_LOGIT_DIFFERENCE", -1.0)  # a merge that cannot pass
    assert "disagrees with the adapter model" in one_line_error(
        export_model, runs["lora"], "onnx", output=tmp_path / "bad"
    )
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()


def test_export_refusals(runs, tmp_path):
    (tmp_path / "exists").mkdir()
    assert "already exists" in one_line_error(export_model, runs["full"], "onnx", output=tmp_path / "exists")
    message = one_line_error(export_model, runs["prefix"], "safetensors", output=tmp_path / "p")
    assert "already safetensors" in message and "--format onnx" in message
    assert "ONNX export writes float32" in one_line_error(
        export_model, runs["full"], "onnx", output=tmp_path / "o", dtype="float16"
    )
    assert not (tmp_path / "p").exists() and not (tmp_path / "o").exists()


# --- eval -----------------------------------------------------------------------------------------------


def test_eval_reproduces_the_training_metrics(runs):
    result = evaluate(runs["lora"])
    recorded = json.loads((runs["lora"] / "metrics.json").read_text())["eval"]
    assert result["metrics"]["accuracy"] == pytest.approx(recorded["accuracy"])
    assert result["metrics"]["f1"] == pytest.approx(recorded["f1"])
    matrix = np.array(result["confusion_matrix"]["rows_true_columns_predicted"])
    assert matrix.sum() == 32 and matrix.trace() / 32 == pytest.approx(recorded["accuracy"])
    assert json.loads((runs["lora"] / "eval-validation.json").read_text())["metrics"] == result["metrics"]


def test_eval_gives_each_label_its_precision_and_recall_and_draws_the_matrix(runs, tmp_path):
    result = evaluate(runs["lora"], output=tmp_path / "e.json")
    matrix = np.array(result["confusion_matrix"]["rows_true_columns_predicted"])
    for i, name in enumerate(result["confusion_matrix"]["labels"]):
        scores = result["per_label"][name]
        assert scores["support"] == matrix[i].sum()
        assert scores["recall"] == pytest.approx(matrix[i, i] / matrix[i].sum())
        assert scores["precision"] == pytest.approx(matrix[i, i] / max(matrix[:, i].sum(), 1))
    f1s = [s["f1"] for s in result["per_label"].values()]
    assert result["macro"]["f1"] == pytest.approx(sum(f1s) / len(f1s))
    # Binary F1 is the positive label's; macro F1 averages both labels.
    assert result["per_label"]["positive"]["f1"] == pytest.approx(result["metrics"]["f1"])
    plot = tmp_path / "e.png"
    assert result["confusion_matrix_plot"] == str(plot) and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "e.json").read_text())["confusion_matrix_plot"] == str(plot)
    text = format_result(result)
    assert "macro" in text and f"{result['macro']['f1']:.4f}" in text


def test_eval_on_other_data_and_on_a_merged_folder(runs, tmp_path):
    other = tiny.write_reviews(tmp_path / "other.csv", 20, start=200)
    result = evaluate(runs["full"], overrides=[f"data.files.validation={other}"], output=tmp_path / "e.json")
    assert result["examples"] == 20 and (tmp_path / "e.json").is_file()
    merged = merge_adapter(runs["lora"], output=tmp_path / "merged")
    assert evaluate(merged)["metrics"] == evaluate(runs["lora"])["metrics"]
    assert "only data.* overrides" in one_line_error(evaluate, runs["lora"], overrides=["method=full"])
    train_split = evaluate(runs["lora"], split="train", output=tmp_path / "t.json")
    assert train_split["split"] == "train" and train_split["examples"] == 64


# --- predict --------------------------------------------------------------------------------------------


def test_predict_texts_and_files(runs, tmp_path):
    records = predict_texts(runs["lora"], NEW_TEXTS, probabilities=True)
    assert [r["text"] for r in records] == NEW_TEXTS
    for record in records:
        assert record["label"] in ("negative", "positive")
        assert record["score"] == pytest.approx(max(record["probabilities"].values()))
        assert sum(record["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)

    source = tiny.write_reviews(tmp_path / "in.csv", 40, start=300)
    assert predict_file(runs["lora"], source, tmp_path / "out.csv") == 40
    with open(tmp_path / "out.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["text", "label", "score"] and len(rows) == 40
    with open(source, encoding="utf-8") as f:
        texts = [r["text"] for r in csv.DictReader(f)]
    assert [r["label"] for r in rows] == [r["label"] for r in predict_texts(runs["lora"], texts)]

    predict_file(runs["full"], source, tmp_path / "out.jsonl", probabilities=True)
    first = json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])
    assert set(first) == {"text", "label", "score", "probabilities"}


def test_predict_and_eval_say_how_many_texts_were_cut(runs, tmp_path, caplog):
    """The runs read 32 tokens: a longer text is classified by its start, and predict and eval say how many were."""
    long = "The battery lasts two days and the screen is sharp, " * 10
    with caplog.at_level("WARNING", logger="peftune.data"):
        predict_texts(runs["lora"], [long, "Setup took five minutes.", long])
    said = [r.getMessage() for r in caplog.records if r.name == "peftune.data"]
    assert len(said) == 1 and said[0].startswith(
        "2 of 3 texts are longer than 32 tokens and were cut to their first 32; the model was trained on that length"
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="peftune.data"):
        predict_texts(runs["lora"], ["Setup took five minutes."])
    assert [r for r in caplog.records if r.name == "peftune.data"] == []
    # eval counts the rows of the split it scores.
    (tmp_path / "long.csv").write_text(f'text,label\n"{long}",positive\nFine.,positive\n', encoding="utf-8")
    with caplog.at_level("WARNING", logger="peftune.data"):
        evaluate(runs["lora"], overrides=[f"data.files.validation={tmp_path / 'long.csv'}"], output=tmp_path / "e.json")
    said = [r.getMessage() for r in caplog.records if r.name == "peftune.data"]
    assert len(said) == 1 and said[0].startswith("1 of 2 texts are longer than 32 tokens")


def test_predict_from_every_kind_of_target_agrees(runs, tmp_path):
    merged = merge_adapter(runs["lora"], output=tmp_path / "merged")
    exported, _ = export_model(runs["lora"], "safetensors", output=tmp_path / "exported")
    labels = [[r["label"] for r in predict_texts(t, NEW_TEXTS)] for t in (runs["lora"], merged, exported)]
    assert labels[0] == labels[1] == labels[2]


def test_predict_pairs(tmp_path, tiny_models):
    texts = tiny.corpus()[:40]
    rows = [{"a": t, "b": texts[-i], "label": i % 2} for i, t in enumerate(texts)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tiny.write_recipe(
        tmp_path / "r.yaml", tiny_models("roberta"), tmp_path / "train.jsonl", None, data__text_columns=["a", "b"]
    )
    run = train(load_recipe(str(recipe)), output_dir=tmp_path / "run").path
    records = predict_texts(run, ["first", "second"], pairs=["one", "two"])
    assert [r["pair"] for r in records] == ["one", "two"]
    assert "trained on sentence pairs" in one_line_error(predict_texts, run, ["first"])
    assert "one --pair per --text" in one_line_error(predict_texts, run, ["a", "b"], pairs=["x"])
    predict_file(run, tmp_path / "train.jsonl", tmp_path / "p.tsv")
    assert (tmp_path / "p.tsv").read_text().splitlines()[0].split("\t") == ["a", "b", "label", "score"]


def test_predict_errors(runs, tmp_path):
    source = tiny.write_reviews(tmp_path / "in.csv", 4)
    assert "also the input file" in one_line_error(predict_file, runs["lora"], source, source)
    assert "must end in" in one_line_error(predict_file, runs["lora"], source, tmp_path / "out.xlsx")
    assert "no column 'review'" in one_line_error(predict_file, runs["lora"], source, tmp_path / "o.csv", ["review"])
    assert "input file not found" in one_line_error(
        predict_file, runs["lora"], tmp_path / "nope.csv", tmp_path / "o.csv"
    )
    assert "could not be loaded from the Hub" in one_line_error(predict_texts, "some-org/some-model", ["hi"])
    assert "not a run folder" in one_line_error(predict_texts, str(tmp_path / "nothing"), ["hi"])


def test_commands(runs, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["predict", str(runs["lora"]), "--text", "Great phone.", "--text", "Awful hotel."])
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["text"] for line in result.stdout.splitlines()] == ["Great phone.", "Awful hotel."]
    result = runner.invoke(main, ["eval", str(runs["full"]), "--output", str(tmp_path / "e.json"), "--batch-size", "8"])
    assert result.exit_code == 0 and "accuracy" in result.stdout and "confusion matrix" in result.stdout
    assert "Predicting" not in result.stderr, "no progress bar when the output is not a terminal (a log file)"
    result = runner.invoke(main, ["merge", str(runs["lora"]), "--output", str(tmp_path / "m")])
    assert result.exit_code == 0 and "max |logit difference|" in result.stdout
    result = runner.invoke(main, ["export", str(runs["full"]), "--format", "onnx", "--output", str(tmp_path / "x")])
    assert result.exit_code == 0 and "onnxruntime vs PyTorch" in result.stdout
    result = runner.invoke(main, ["merge", str(runs["prefix"])])
    assert result.exit_code == 2 and result.stderr.startswith("error: prefix tuning adds trained vectors")
    result = runner.invoke(main, ["predict", str(runs["lora"])])
    assert result.exit_code == 2 and "give either --text" in result.output


# --- the adapter folder -----------------------------------------------------------------------------------


def test_the_adapter_folder_names_its_base_portably_and_its_card_loads_it(tmp_path, tiny_bert, reviews, monkeypatch):
    """A base inside an installed package (as the quickstart's) is recorded as pkg://, not as this venv's path,
    and the adapter's README.md is a card whose code loads the adapter to the logits peftune gives."""
    import importlib
    import re

    import torch

    site = tmp_path / "site"
    shutil.copytree(tiny_bert, site / "tinybase" / "model")
    (site / "tinybase" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    recipe_file = tiny.write_recipe(tmp_path / "recipe.yaml", "pkg://tinybase/model", *reviews)
    run = train(load_recipe(str(recipe_file)), output_dir=tmp_path / "run")

    config = json.loads((run.adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "pkg://tinybase/model"
    assert config["modules_to_save"] == sorted(set(config["modules_to_save"]))
    metrics = run.read_metrics()
    assert metrics.base_model == "pkg://tinybase/model"
    assert metrics.base_model_path == str(site / "tinybase" / "model")

    card = (run.adapter_dir / "README.md").read_text()
    assert "More Information Needed" not in card and "library_name: peft" in card
    assert f"**{metrics.primary_metric.value:.4f}**" in card and "`negative`, `positive`" in card
    assert f"peftune predict {run.path}" in card and str(site) not in card
    code = re.search(r"```python\n(.+?)```", card, flags=re.S).group(1)
    namespace: dict = {}
    exec(code, namespace)  # the card's own snippet, as a user would paste it
    model, tokenizer = namespace["model"].eval(), namespace["tokenizer"]
    with torch.no_grad():
        from_card = model(**tokenizer(NEW_TEXTS, padding=True, return_tensors="pt")).logits.numpy()
    assert np.abs(from_card - batched_logits(load_target(run.path), NEW_TEXTS)).max() < 1e-5
    assert model.config.id2label == {0: "negative", 1: "positive"}


# --- staged writes ------------------------------------------------------------------------------------------


def test_staged_writes_appear_whole_or_not_at_all(tmp_path):
    from peftune.rundir import staged

    with pytest.raises(RuntimeError), staged(tmp_path / "folder") as partial:
        partial.mkdir()
        (partial / "half.bin").write_text("x")
        raise RuntimeError("killed while writing")
    assert list(tmp_path.iterdir()) == [], "no target and no leftover partial"
    with staged(tmp_path / "folder") as partial:
        partial.mkdir()
        (partial / "whole.bin").write_text("x")
    assert [p.name for p in (tmp_path / "folder").iterdir()] == ["whole.bin"]
    with pytest.raises(PeftuneError, match="already exists"), staged(tmp_path / "folder") as partial:
        partial.mkdir()
    with staged(tmp_path / "folder", replace=True) as partial:
        partial.mkdir()
        (partial / "new.bin").write_text("y")
    assert [p.name for p in (tmp_path / "folder").iterdir()] == ["new.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


def test_a_prediction_file_that_fails_midway_leaves_the_old_file_and_no_partial(runs, reviews, tmp_path, monkeypatch):
    from peftune import predict

    output = tmp_path / "out.csv"
    output.write_text("the previous predictions\n")

    def broken(path, *args):
        path.write_text("label,score\npositive,0.9\n")  # part of the rows
        raise OSError("disk full")

    monkeypatch.setattr(predict, "_write", broken)
    with pytest.raises(OSError):
        predict_file(runs["lora"], reviews[1], output)
    assert output.read_text() == "the previous predictions\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]
