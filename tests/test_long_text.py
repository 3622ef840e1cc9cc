"""Texts longer than the model reads: cut and counted (truncate), or split into overlapping windows whose logits
are pooled into one prediction per text (chunk), in training, eval and predict alike."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from trained import train_tiny

from peftune.data import pool_windows

LONG = (
    "The hotel room was spotless and the staff went out of their way to help, but the breakfast was cold, the "
    "lift was broken for three days and nobody at the desk seemed to care about any of it at all."
)


def test_pooling_takes_the_mean_or_the_max_of_each_texts_windows():
    logits = np.array([[1.0, 0.0], [3.0, -2.0], [0.5, 0.5], [-1.0, 4.0]])
    documents = [0, 0, 1, 0]
    assert pool_windows(logits, documents, 2).tolist() == [[1.0, 2 / 3], [0.5, 0.5]]
    assert pool_windows(logits, documents, 2, "max").tolist() == [[3.0, 4.0], [0.5, 0.5]]


@pytest.fixture(scope="module")
def chunked(tmp_path_factory, tiny_models, reviews):
    folder = tmp_path_factory.mktemp("chunked")
    return train_tiny(folder, tiny_models("bert"), reviews, "data.long_text=chunk", "data.max_length=16",
                      "data.stride=4", "train.eval_strategy=epoch")  # fmt: skip


def windows_by_hand(tokenizer, text: str, length: int, stride: int) -> list[list[int]]:
    """The windows written out: [CLS] + `length - 2` tokens + [SEP], each starting `stride` tokens before the
    previous one ends, until the text's last token is in one."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    room, out, start = length - 2, [], 0
    while True:
        out.append([tokenizer.cls_token_id, *ids[start : start + room], tokenizer.sep_token_id])
        if start + room >= len(ids):
            return out
        start += room - stride


def test_a_chunked_prediction_is_the_mean_of_its_windows_logits_computed_one_by_one(chunked):
    from peftune.inference import batched_logits, load_target
    from peftune.predict import predict_texts

    run, _ = chunked
    loaded = load_target(run.path)
    with torch.no_grad():  # a tiny random model's logits hardly depend on its input: make them
        for name, parameter in loaded.model.named_parameters():
            if "classifier" in name:
                parameter.mul_(1000.0)
    windows = windows_by_hand(loaded.tokenizer, LONG, 16, 4)
    assert len(windows) > 3
    with torch.no_grad():
        each = np.array([loaded.model(input_ids=torch.tensor([w])).logits[0].numpy() for w in windows])
    assert np.ptp(each, axis=0).max() > 1e-2  # windows disagree: the pooling is tested, not a constant
    short = "Setup took five minutes."
    got = batched_logits(loaded, [LONG, short])
    assert np.abs(got[0] - each.mean(axis=0)).max() < 1e-4
    with torch.no_grad():  # a text that fits one window is read as it is
        alone = loaded.model(**loaded.tokenizer(short, return_tensors="pt")).logits[0].numpy()
    assert np.abs(got[1] - alone).max() < 1e-4
    record = predict_texts(loaded, [LONG], probabilities=True)[0]
    assert record["label"] == ["negative", "positive"][int(each.mean(axis=0).argmax())]

    assert loaded.recipe is not None  # the same run read with max pooling
    loaded.recipe = loaded.recipe.model_copy(
        update={"data": loaded.recipe.data.model_copy(update={"window_pooling": "max"})}
    )
    assert np.abs(batched_logits(loaded, [LONG])[0] - each.max(axis=0)).max() < 1e-4


def test_a_chunked_run_trains_on_windows_and_counts_texts_in_eval(chunked, reviews, tmp_path):
    from peftune.evaluation import evaluate

    run, _ = chunked
    record = run.read_metrics()
    with open(reviews[1], encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert record.train_samples == 24 and record.train_windows is not None and record.train_windows > 24
    assert record.eval_samples == len(rows) and record.eval_windows is not None and record.eval_windows > len(rows)
    # The run's own metrics are computed on texts, as eval computes them again from the saved model.
    result = evaluate(run.path, output=tmp_path / "eval.json")
    assert result["examples"] == len(rows)
    assert result["metrics"]["accuracy"] == pytest.approx(record.eval["accuracy"], abs=1e-6)
    assert sum(sum(r) for r in result["confusion_matrix"]["rows_true_columns_predicted"]) == len(rows)
    assert "long_text: chunk" in (run.path / "recipe.yaml").read_text()


def test_cut_texts_are_counted_and_chunked_ones_are_not(tmp_path, tiny_bert, reviews, caplog):
    from peftune.inference import load_target
    from peftune.predict import predict_texts

    with caplog.at_level("WARNING"):
        run, _ = train_tiny(tmp_path, tiny_bert, reviews, "data.max_length=16")
    assert any("train texts are longer than 16 tokens and were cut" in m for m in caplog.messages)
    caplog.clear()
    with caplog.at_level("WARNING"):
        predict_texts(load_target(run.path), [LONG])
    assert any("1 of 1 texts are longer than 16 tokens" in m for m in caplog.messages)
    caplog.clear()
    (tmp_path / "chunk").mkdir()
    with caplog.at_level("WARNING"):
        train_tiny(tmp_path / "chunk", tiny_bert, reviews, "data.max_length=16", "data.long_text=chunk")
    assert not any("were cut" in m for m in caplog.messages)


def test_the_chunk_card_says_how_the_model_reads_long_texts(chunked):
    run, _ = chunked
    card = (run.path / "adapter" / "README.md").read_text()
    assert "windows of 16 tokens" in card and "transformers alone reads the first 16 tokens only" in card
    assert json.loads(run.labels_file.read_text())["problem_type"] == "classification"
