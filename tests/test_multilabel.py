"""Multi-label classification: labels read from lists or separated strings, a sigmoid per label with its threshold,
the metrics, and the same scores from the run, its reload, predict, a merge, transformers' pipeline and ONNX."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tiny
import torch
from trained import PROBE, Recorder

from peftune import metrics
from peftune.data import Labels, infer_labels, load_splits, tokenize
from peftune.errors import PeftuneError
from peftune.losses import class_weights, warn_if_skewed, weighted_loss
from peftune.recipe import load_recipe, parse_recipe

FEEDBACK = tiny.QUICKSTART.parent / "feedback"
TOPICS = ["account", "billing", "delivery", "product", "returns"]


def write_topics(folder: Path, train_rows: int = 64, eval_rows: int = 32) -> tuple[Path, Path, Path, Path]:
    """Feedback messages as JSONL (a list of topics per row) and as CSV (one string, topics joined by '|')."""
    made = []
    for split, rows in (("train", train_rows), ("validation", eval_rows)):
        with open(FEEDBACK / f"{split}.jsonl", encoding="utf-8") as f:
            records = [json.loads(line) for line in f][:rows]
        jsonl = folder / f"{split}.jsonl"
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        csv_file = folder / f"{split}.csv"
        lines = ["text,topics"] + [f'"{r["text"]}",{"|".join(r["topics"])}' for r in records]
        csv_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
        made += [jsonl, csv_file]
    return made[0], made[2], made[1], made[3]  # train.jsonl, validation.jsonl, train.csv, validation.csv


@pytest.fixture(scope="module")
def topics(tmp_path_factory) -> tuple[Path, Path, Path, Path]:
    return write_topics(tmp_path_factory.mktemp("topics"))


def topic_recipe(folder: Path, model_dir: Path, train_file: Path, eval_file: Path, *overrides: str):
    recipe_file = tiny.write_recipe(folder / "topics.yaml", model_dir, train_file, eval_file)
    return load_recipe(str(recipe_file), ["data.label_column=topics", *overrides])


def test_label_lists_and_separated_strings_give_the_same_multi_hot_targets(tmp_path, tiny_bert, topics):
    from transformers import AutoTokenizer

    train_jsonl, eval_jsonl, train_csv, eval_csv = topics
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    targets = []
    for files in ((train_jsonl, eval_jsonl), (train_csv, eval_csv)):
        extra = ["data.label_separator=|"] if files[0].suffix == ".csv" else []
        # A list column is multi-label by itself; a string column needs data.problem_type and the separator.
        recipe = topic_recipe(tmp_path, tiny_bert, *files, "data.problem_type=multi_label", *extra)
        train, evaluation = load_splits(recipe.data, recipe.seed)
        labels = infer_labels(recipe.data, train, evaluation)
        assert labels.multi_label and labels.names == tuple(TOPICS) and labels.thresholds == (0.5,) * 5
        targets.append(tokenize(train, tokenizer, recipe.data, labels, "train")["labels"])
    assert targets[0] == targets[1]
    with open(train_jsonl, encoding="utf-8") as f:
        first = json.loads(f.readline())["topics"]
    assert [TOPICS[i] for i, v in enumerate(targets[0][0]) if v == 1.0] == sorted(first)

    recipe = topic_recipe(tmp_path, tiny_bert, train_jsonl, eval_jsonl)  # no problem_type: the lists say it
    assert infer_labels(recipe.data, *load_splits(recipe.data, recipe.seed)).multi_label


def test_labels_keep_thresholds_and_separator_through_labels_json():
    labels = Labels(names=("a", "b"), multi_label=True, separator=";", thresholds=(0.3, 0.7))
    again = Labels.from_json(json.loads(json.dumps(labels.to_json())))
    assert again == labels
    assert again.encode("b; a") == [1.0, 1.0] and again.encode([]) == [0.0, 0.0]
    assert again.decide(np.array([[0.31, 0.69], [0.29, 0.71]])).tolist() == [[True, False], [False, True]]
    with pytest.raises(ValueError, match="'c' is not one of"):
        again.encode("a;c")


def test_multi_label_metrics_are_subset_accuracy_and_micro_and_macro_f1():
    true = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    scores = np.array([[0.9, 0.2, 0.6], [0.1, 0.8, 0.2], [0.7, 0.3, 0.1], [0.2, 0.1, 0.3]])
    logits = np.log(scores / (1 - scores))
    got = metrics.compute_metrics(["accuracy", "f1_micro", "f1_macro", "hamming_loss"], logits, true, "multi_label")
    # At 0.5: rows 1 and 2 right; row 3 misses label 1, row 4 misses label 2.
    # label 0: tp 2; label 1: tp 1, fn 1; label 2: tp 1, fn 1 -> micro: tp 4, fp 0, fn 2
    assert got["accuracy"] == pytest.approx(0.5)
    assert got["f1_micro"] == pytest.approx(2 * 4 / (2 * 4 + 0 + 2))
    assert got["f1_macro"] == pytest.approx((1.0 + 2 / 3 + 2 / 3) / 3)
    assert got["hamming_loss"] == pytest.approx(2 / 12)
    # A lower threshold for label 2 takes row 4's label: every row right.
    lower = metrics.compute_metrics(["accuracy"], logits, true, "multi_label", thresholds=[0.5, 0.25, 0.25])
    assert lower["accuracy"] == pytest.approx(1.0)
    with pytest.raises(PeftuneError, match="does not apply to multi_label"):
        metrics.check_metrics(["matthews_correlation"], "multi_label")


def test_tuned_thresholds_maximise_each_labels_f1():
    rng = np.random.default_rng(0)
    true = rng.random((200, 2)) < 0.3
    # Label 0 scores positives at 0.3-0.45 and negatives below 0.25: the best threshold sits between them.
    scores = np.where(true, 0.3 + 0.15 * rng.random((200, 2)), 0.25 * rng.random((200, 2)))
    scores[:, 1] = np.where(true[:, 1], 0.9, 0.1)  # label 1 is separated at 0.5 already: it keeps 0.5
    chosen = metrics.tune_thresholds(np.log(scores / (1 - scores)), true.astype(float))
    assert 0.25 <= chosen[0] <= 0.3 and chosen[1] == 0.5
    assert metrics.tune_thresholds(np.zeros((3, 1)), np.zeros((3, 1))) == [0.5]  # no positive: 0.5


def test_balanced_multi_label_weights_are_negatives_over_positives_and_weigh_the_positive_terms():
    labels = Labels(names=("a", "b"), multi_label=True)
    hot = [[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [1.0, 0.0]]  # a: 3 of 4, b: 1 of 4
    assert class_weights("balanced", labels, hot) == pytest.approx([1 / 3, 3.0])
    with pytest.raises(PeftuneError, match="b has no example there"):
        class_weights("balanced", labels, [[1.0, 0.0]])
    with pytest.raises(PeftuneError, match="has 3 weights but the data has 2 labels"):
        class_weights([1, 2, 3], labels, hot)
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.3], [-1.0, -2.0], [0.0, 1.0]])
    target = torch.tensor(hot)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor([0.5, 4.0]))
    got = weighted_loss([0.5, 4.0], multi_label=True)({"logits": logits}, target)
    assert got.item() == pytest.approx(expected.item())
    plain = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    assert weighted_loss([1.0, 1.0], multi_label=True)({"logits": logits}, target).item() == pytest.approx(plain.item())


def test_a_rare_label_gets_the_skew_warning(caplog):
    labels = Labels(names=("common", "rare"), multi_label=True)
    with caplog.at_level("WARNING", logger="peftune.losses"):
        warn_if_skewed(labels, [[1.0, 0.0]] * 50 + [[1.0, 1.0]] * 2, weighted=False)
    assert len(caplog.messages) == 1 and "skewed" in caplog.messages[0]


@pytest.fixture(scope="module")
def multi_run(tmp_path_factory, tiny_models, topics):
    """A tiny multi-label LoRA run with tuned thresholds and class weights, and the logits in memory at its end."""
    from transformers import AutoTokenizer

    from peftune.train import train

    folder = tmp_path_factory.mktemp("multi-run")
    model_dir = tiny_models("bert")
    recipe = topic_recipe(folder, model_dir, topics[0], topics[1], "data.thresholds=tune",
                          "train.class_weights=balanced", "train.num_train_epochs=2")  # fmt: skip
    recorder = Recorder(AutoTokenizer.from_pretrained(model_dir))
    run = train(recipe, output_dir=folder / "run", callbacks=[recorder])
    return run, recorder


def test_a_multi_label_run_keeps_its_tuned_thresholds_and_weighted_loss(multi_run, topics):
    from peftune.inference import batched_logits, load_target

    run, _ = multi_run
    record = run.read_metrics()
    labels = Labels.read(run.labels_file)
    assert record.problem_type == "multi_label" and labels.multi_label
    assert record.thresholds == dict(zip(TOPICS, labels.thresholds, strict=True))
    assert record.thresholds_tuned_on == "validation"
    assert set(record.eval) >= {"f1_micro", "f1_macro", "accuracy", "loss"}
    # The recorded metrics are the tuned thresholds' on the eval split; the eval loss went through the weights.
    loaded = load_target(run.path)
    rows = [json.loads(line) for line in topics[1].read_text().splitlines()]
    logits = batched_logits(loaded, [r["text"] for r in rows])
    true = np.array([labels.encode(r["topics"]) for r in rows])
    again = metrics.compute_metrics(["f1_micro", "accuracy"], logits, true, "multi_label", labels.thresholds)
    assert record.eval["f1_micro"] == pytest.approx(again["f1_micro"], abs=1e-6)
    assert record.eval["accuracy"] == pytest.approx(again["accuracy"], abs=1e-6)
    assert record.eval["f1_micro"] >= metrics.compute_metrics(["f1_micro"], logits, true, "multi_label")["f1_micro"]
    weights = record.class_weights
    assert weights is not None and len(weights) == 5
    weighted = weighted_loss(weights, multi_label=True)({"logits": torch.from_numpy(logits)}, torch.tensor(true))
    plain = torch.nn.functional.binary_cross_entropy_with_logits(torch.from_numpy(logits), torch.tensor(true).float())
    assert abs(weighted.item() - plain.item()) > 1e-3
    assert record.eval["loss"] == pytest.approx(weighted.item(), abs=1e-4)


def test_multi_label_scores_agree_from_run_reload_predict_merge_pipeline_and_onnx(multi_run, tmp_path):
    from transformers import pipeline

    from peftune.export import export_model
    from peftune.merge import merge_adapter
    from peftune.predict import predict_texts

    run, recorder = multi_run
    labels = Labels.read(run.labels_file)
    in_memory = torch.sigmoid(recorder.logits).numpy()  # the trained model at the end of training

    def scores(records):
        return np.array([[r["probabilities"][name] for name in TOPICS] for r in records])

    from_run = predict_texts(run.path, PROBE, probabilities=True)
    assert np.abs(scores(from_run) - in_memory).max() < 1e-5
    for record, row in zip(from_run, in_memory, strict=True):  # every label over its threshold, best first
        chosen = [TOPICS[i] for i in np.argsort(-row) if row[i] >= labels.thresholds[i]]
        assert record["labels"] == chosen and record["scores"] == pytest.approx([row[TOPICS.index(n)] for n in chosen])

    merged = merge_adapter(run.path, output=tmp_path / "merged")
    assert json.loads((merged / "config.json").read_text())["problem_type"] == "multi_label_classification"
    assert Labels.read(merged / "labels.json") == labels
    assert np.abs(scores(predict_texts(merged, PROBE, probabilities=True)) - in_memory).max() < 1e-5
    classifier = pipeline("text-classification", model=str(merged))
    piped = classifier(PROBE, top_k=None)
    from_pipeline = np.array([[{p["label"]: p["score"] for p in row}[name] for name in TOPICS] for row in piped])
    assert np.abs(from_pipeline - in_memory).max() < 1e-5

    exported, _ = export_model(run.path, "onnx", output=tmp_path / "onnx")
    from_onnx = predict_texts(exported, PROBE, probabilities=True)
    assert np.abs(scores(from_onnx) - in_memory).max() < 1e-4
    assert [r["labels"] for r in from_onnx] == [r["labels"] for r in from_run]


def test_multi_label_eval_and_predict_file_and_card(multi_run, topics, tmp_path):
    from peftune.evaluation import evaluate, format_result
    from peftune.predict import predict_file

    run, _ = multi_run
    result = evaluate(run.path, output=tmp_path / "eval.json")
    assert set(result["per_label"]) == set(TOPICS) and "confusion_matrix" not in result
    assert result["thresholds"] == run.read_metrics().thresholds
    assert result["per_label"]["billing"]["support"] == sum(
        "billing" in json.loads(line)["topics"] for line in topics[1].read_text().splitlines()
    )
    assert "threshold" in format_result(result)
    assert not (tmp_path / "eval.png").exists()  # no confusion matrix for multi-label

    written = tmp_path / "predicted.csv"
    assert predict_file(run.path, topics[3], written) == 32
    import csv

    with open(written, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    jsonl = tmp_path / "predicted.jsonl"
    predict_file(run.path, topics[3], jsonl)
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["labels"].split("|") if r["labels"] else [] for r in rows] == [r["labels"] for r in records]

    card = (run.path / "adapter" / "README.md").read_text()
    assert "multi-label" in card and "tuned on the 'validation' split" in card
    assert 'problem_type="multi_label_classification"' in card


def test_the_shipped_multi_label_recipe_reads_its_data_as_multi_label():
    recipe = parse_recipe(load_recipe("feedback-topics").model_dump())
    train, evaluation = load_splits(recipe.data, recipe.seed)
    labels = infer_labels(recipe.data, train, evaluation)
    assert labels.multi_label and labels.names == tuple(TOPICS)
    assert metrics.default_metrics("multi_label")[0] == recipe.metrics[0] == "f1_micro"


def test_a_pushed_multi_label_run_predicts_as_the_run_and_its_card_says_multi_label(hub, multi_run, in_tmp):
    from peftune.predict import predict_texts
    from peftune.push import push

    run, _ = multi_run
    push(run.path, "tester/topics", base_model_id="tester/tiny-bert", echo=lambda _: None)
    assert predict_texts("tester/topics", PROBE, probabilities=True) == predict_texts(
        run.path, PROBE, probabilities=True
    )
    card = hub.files("tester/topics")["README.md"].decode()
    assert "multi-label" in card and "top_k" not in card.split("## Use it")[0]
    assert Labels.from_json(json.loads(hub.files("tester/topics")["labels.json"])) == Labels.read(run.labels_file)
