"""Data: every file format, pairs, label mapping, held-out eval splits, and clear errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import tiny

from peftune.data import Labels, infer_labels, load_splits, tokenize
from peftune.errors import PeftuneError
from peftune.recipe import DataSpec


def spec(**kwargs) -> DataSpec:
    return DataSpec.model_validate(kwargs)


def error_of(fn, *args) -> str:
    with pytest.raises(PeftuneError) as info:
        fn(*args)
    assert "\n" not in str(info.value)
    return str(info.value)


TRICKY = ['He said "no" twice', "NA", "null", "a, b, and c", "tab-free 'quotes'"]


def test_tsv_keeps_bare_quotes_and_na_like_text(tmp_path):
    lines = ["sentence\tlabel"] + [f"{text}\t{i % 2}" for i, text in enumerate(TRICKY)]
    (tmp_path / "train.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    path = str(tmp_path / "train.tsv")
    train, _ = load_splits(spec(files={"train": path, "validation": path}, text_columns="sentence"), seed=0)
    assert train["sentence"] == TRICKY
    assert train["label"] == [0, 1, 0, 1, 0]


def test_csv_quoting_and_bom(tmp_path):
    import csv

    path = tmp_path / "train.csv"
    with open(path, "w", newline="", encoding="utf-8-sig") as f:  # starts with a byte order mark
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows([(text, "pos" if i % 2 else "neg") for i, text in enumerate(TRICKY * 4)])
    data = spec(files={"train": str(path)}, eval_split="validation", validation_size=0.25)
    train, evaluation = load_splits(data, seed=0)
    assert set(train.column_names) == {"text", "label"}, "the BOM is not part of the first column's name"
    assert set(train["text"]) | set(evaluation["text"]) == set(TRICKY)


@pytest.mark.parametrize("extension", [".jsonl", ".jsonl.gz", ".json", ".parquet"])
def test_json_and_parquet(tmp_path, extension):
    records = [{"review": f"text {i}", "stars": i % 3} for i in range(12)]
    path = tmp_path / f"train{extension}"
    if extension == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        lines = "".join(json.dumps(r) + "\n" for r in records)
        if extension.endswith(".gz"):
            path.write_bytes(gzip.compress(lines.encode()))
        else:
            path.write_text(lines)
    train, evaluation = load_splits(
        spec(files={"train": str(path)}, text_columns="review", label_column="stars", validation_size=0.25), seed=0
    )
    assert len(train) == 9 and len(evaluation) == 3
    assert infer_labels(spec(source="x", label_column="stars"), train, evaluation).names == ("0", "1", "2")


def test_csv_without_header_takes_column_names(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("src1\t1\t\tGood sentence .\nsrc2\t0\t*\tSentence bad .\n", encoding="utf-8")
    data = spec(
        files={"train": str(path), "validation": str(path)},
        text_columns="sentence",
        options={"column_names": ["source", "label", "mark", "sentence"]},
    )
    train, _ = load_splits(data, seed=0)
    assert train["sentence"] == ["Good sentence .", "Sentence bad ."]
    assert train["label"] == [1, 0]


def test_missing_eval_split_is_carved_out_of_train_with_the_seed(tmp_path, reviews):
    data = spec(files={"train": str(reviews[0])}, validation_size=0.25)
    train_a, eval_a = load_splits(data, seed=1)
    train_b, eval_b = load_splits(data, seed=1)
    _, eval_c = load_splits(data, seed=2)
    assert (len(train_a), len(eval_a)) == (48, 16)
    assert eval_a["text"] == eval_b["text"] and train_a["text"] == train_b["text"]
    assert eval_a["text"] != eval_c["text"]
    assert not set(eval_a["text"]) & set(train_a["text"])


def test_sample_limits_are_seeded(reviews):
    data = spec(files={"train": str(reviews[0]), "validation": str(reviews[1])}, max_train_samples=10)
    train, evaluation = load_splits(data, seed=0)
    assert len(train) == 10 and len(evaluation) == 32
    assert load_splits(data, seed=0)[0]["text"] == train["text"]


def test_string_labels_sorted_or_in_the_given_order(reviews):
    files = {"train": str(reviews[0]), "validation": str(reviews[1])}
    train, evaluation = load_splits(spec(files=files), seed=0)
    assert infer_labels(spec(files=files), train, evaluation).names == ("negative", "positive")
    given = infer_labels(spec(files=files, labels=["positive", "negative"]), train, evaluation)
    assert given.names == ("positive", "negative")
    assert given.encode("positive") == 0 and given.encode("negative") == 1
    message = error_of(infer_labels, spec(files=files, labels=["positive", "neutral"]), train, evaluation)
    assert "label 'negative' in column 'label' is not in data.labels ['positive', 'neutral']" in message


def test_integer_labels(tmp_path):
    from datasets import Dataset

    train = Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 2, 1]})
    labels = infer_labels(spec(source="x"), train, train)
    assert labels.names == ("0", "1", "2") and labels.encode(2) == 2
    named = infer_labels(spec(source="x", labels=["neg", "neu", "pos"]), train, train)
    assert named.names == ("neg", "neu", "pos") and named.encode(2) == 2
    assert "is not an index into data.labels" in error_of(
        infer_labels, spec(source="x", labels=["a", "b"]), train, train
    )

    stars = Dataset.from_dict({"text": ["a", "b", "c"], "label": [5, 1, 3]})
    mapped = infer_labels(spec(source="x"), stars, stars)
    assert mapped.names == ("1", "3", "5") and [mapped.encode(v) for v in (1, 3, 5)] == [0, 1, 2]
    assert Labels.from_json(json.loads(json.dumps(mapped.to_json()))) == mapped


def test_float_labels_mean_regression(tmp_path):
    from datasets import Dataset

    scores = Dataset.from_dict({"text": ["a", "b"], "label": [0.5, 4.2]})
    labels = infer_labels(spec(source="x"), scores, scores)
    assert labels.problem_type == "regression" and labels.num_labels == 1 and labels.encode(4.2) == 4.2
    assert "set data.problem_type: regression" in error_of(
        infer_labels, spec(source="x", problem_type="classification"), scores, scores
    )
    ints = Dataset.from_dict({"text": ["a", "b"], "label": [1, 5]})
    assert infer_labels(spec(source="x", problem_type="regression"), ints, ints).problem_type == "regression"


def test_tokenize_single_sentences_and_pairs(tiny_models):
    from datasets import Dataset
    from transformers import AutoTokenizer

    raw = Dataset.from_dict({"a": ["first sentence", "x"], "b": ["second one", "y"], "label": [0, 1]})
    labels = Labels(names=("0", "1"))
    bert = AutoTokenizer.from_pretrained(tiny_models("bert"))
    pair = tokenize(raw, bert, spec(source="x", text_columns=["a", "b"]), labels, "train")
    assert set(pair.column_names) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert pair[0]["input_ids"].count(bert.sep_token_id) == 2 and 1 in pair[0]["token_type_ids"]
    assert pair["labels"] == [0, 1]
    single = tokenize(raw, bert, spec(source="x", text_columns="a"), labels, "train")
    assert single[0]["input_ids"].count(bert.sep_token_id) == 1
    roberta = AutoTokenizer.from_pretrained(tiny_models("roberta"))
    assert (
        "token_type_ids" not in tokenize(raw, roberta, spec(source="x", text_columns="a"), labels, "train").column_names
    )
    long = Dataset.from_dict({"a": ["word " * 500], "label": [0]})
    assert (
        len(tokenize(long, bert, spec(source="x", text_columns="a", max_length=16), labels, "train")[0]["input_ids"])
        == 16
    )


def test_rows_without_text_are_refused(tiny_bert):
    from datasets import Dataset
    from transformers import AutoTokenizer

    raw = Dataset.from_dict({"text": ["fine", None], "label": [0, 1]})
    message = error_of(
        tokenize, raw, AutoTokenizer.from_pretrained(tiny_bert), spec(source="x"), Labels(names=("0", "1")), "train"
    )
    assert "split 'train' has a row whose 'text' is None" in message


def test_clear_errors_for_bad_data(tmp_path, reviews):
    train = str(reviews[0])
    assert "data file not found" in error_of(load_splits, spec(files={"train": str(tmp_path / "no.csv")}), 0)
    assert "has no column 'sentence'" in error_of(load_splits, spec(files={"train": train}, text_columns="sentence"), 0)
    assert "set data.label_column" in error_of(load_splits, spec(files={"train": train}, label_column="y"), 0)
    assert "has no split 'training'" in error_of(load_splits, spec(files={"train": train}, train_split="training"), 0)
    (tmp_path / "a.txt").write_text("x")
    assert "cannot tell the format" in error_of(load_splits, spec(files={"train": str(tmp_path / "a.txt")}), 0)
    jsonl = tiny.write_reviews(tmp_path / "v.jsonl", 4)
    assert "mixes formats" in error_of(load_splits, spec(files={"train": train, "validation": str(jsonl)}), 0)
    (tmp_path / "empty.csv").write_text("text,label\n")
    assert "split 'validation' is empty" in error_of(
        load_splits, spec(files={"train": train, "validation": str(tmp_path / "empty.csv")}), 0
    )
    assert "could not load dataset 'no-such/dataset'" in error_of(load_splits, spec(source="no-such/dataset"), 0)


# --- the real files in ../shared/data, as distributed ------------------------------------------------


def glue(folder: Path, **kwargs) -> DataSpec:
    files = {"train": str(folder / "train.tsv"), "validation": str(folder / "dev.tsv")}
    return spec(files=files, **kwargs)


def test_real_sst2(shared_data):
    train, evaluation = load_splits(glue(shared_data("sst2"), text_columns="sentence"), seed=0)
    assert (len(train), len(evaluation)) == (67349, 872)
    assert infer_labels(glue(shared_data("sst2")), train, evaluation).names == ("0", "1")


def test_real_cola_has_no_header(shared_data):
    data = glue(
        shared_data("cola"), text_columns="sentence", options={"column_names": ["source", "label", "mark", "sentence"]}
    )
    train, evaluation = load_splits(data, seed=0)
    assert (len(train), len(evaluation)) == (8551, 1043)
    assert train[0]["sentence"].startswith("Our friends won't buy this analysis")


def test_real_mrpc_pairs_with_bom(shared_data):
    data = glue(shared_data("mrpc"), text_columns=["#1 String", "#2 String"], label_column="Quality")
    train, evaluation = load_splits(data, seed=0)
    assert (len(train), len(evaluation)) == (3668, 408)
    assert train[0]["#1 String"].startswith('Amrozi accused his brother , whom he called " the witness "')
    assert infer_labels(data, train, evaluation).names == ("0", "1")


def test_real_stsb_is_regression(shared_data):
    data = glue(shared_data("stsb"), text_columns=["sentence1", "sentence2"], label_column="score")
    train, evaluation = load_splits(data, seed=0)
    assert (len(train), len(evaluation)) == (5749, 1500)
    assert infer_labels(data, train, evaluation).problem_type == "regression"


def test_real_imdb_jsonl_gz(shared_data):
    folder = shared_data("imdb")
    data = spec(
        files={"train": str(folder / "train.jsonl.gz"), "test": str(folder / "test.jsonl.gz")}, eval_split="test"
    )
    train, evaluation = load_splits(data, seed=0)
    assert (len(train), len(evaluation)) == (25000, 25000)
    assert infer_labels(data, train, evaluation).names == ("0", "1")


def test_tokenize_says_how_many_texts_it_cut(tiny_models, caplog):
    """A text longer than data.max_length is cut to it; the count is one warning line, none when nothing is cut."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from peftune.data import were_cut

    tokenizer = AutoTokenizer.from_pretrained(tiny_models("bert"))
    texts = ["word " * n for n in (3, 13, 14, 15, 40, 200)]
    # Sentences of 14 words fill 16 tokens with [CLS] and [SEP] exactly: not cut. 15 and more are.
    lengths = [len(tokenizer(t)["input_ids"]) for t in texts]
    assert lengths[2] == 16 and lengths[3] == 17
    raw = Dataset.from_dict({"a": texts, "label": [0] * len(texts)})
    labels = Labels(names=("0", "1"))
    with caplog.at_level("WARNING", logger="peftune.data"):
        tokenized = tokenize(raw, tokenizer, spec(source="x", text_columns="a", max_length=16), labels, "train")
    assert "peftune_cut" not in tokenized.column_names
    assert sum(n > 16 for n in lengths) == 3 and caplog.messages == [
        "3 of 6 train texts are longer than 16 tokens and were cut to their first 16; raise data.max_length, or read "
        "them whole with data.long_text=chunk"
    ]
    caplog.clear()
    with caplog.at_level("WARNING", logger="peftune.data"):
        tokenize(raw, tokenizer, spec(source="x", text_columns="a", max_length=512), labels, "validation")
    assert caplog.messages == []
    # A tokenizer without overflow information (no `encodings`): a row that fills max_length counts as cut.
    assert were_cut({"input_ids": [[1] * 16, [1] * 5]}, 16) == [True, False]
