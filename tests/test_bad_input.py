"""Bad input, through the command line: one line that names the problem and the fix, exit code 2, no traceback
(`--debug` shows it), and never a run folder that looks complete."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import tiny
from click.testing import CliRunner

from peftune.cli import main
from peftune.errors import PeftuneError


@dataclass
class World:
    """Files the cases point at, made once."""

    root: Path
    recipe: str  # a tiny LoRA recipe over local review files
    runs: dict[str, Path]

    def file(self, name: str) -> str:
        return str(self.root / name)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_models, reviews, runs) -> World:
    root = tmp_path_factory.mktemp("bad-input")
    recipe = tiny.write_recipe(root / "tiny.yaml", tiny_models("bert"), *reviews)
    (root / "vit").mkdir()
    (root / "vit" / "config.json").write_text('{"model_type": "vit", "image_size": 32}')
    (root / "albert").mkdir()  # a text classifier whose attention prefix tuning does not reach
    (root / "albert" / "config.json").write_text('{"model_type": "albert", "hidden_size": 32}')
    (root / "incomplete").mkdir()
    shutil.copy(runs["lora"] / "recipe.yaml", root / "incomplete" / "recipe.yaml")
    (root / "empty-folder").mkdir()
    (root / "existing-export").mkdir()
    (root / "mine.yaml").write_text("name: mine\n")
    (root / "empty.csv").write_text("text,label\n")
    (root / "latin1.csv").write_bytes("text,label\ncaf\xe9 cr\xe8me,positive\n".encode("latin-1"))
    (root / "notes.txt").write_text("x")
    (root / "broken.yaml").write_text("model: [a, b\n")
    (root / "dup.yaml").write_text("seed: 1\nseed: 2\n")
    (root / "list.yaml").write_text("- a\n- b\n")
    rows = [("Charged twice.", ["billing"]), ("Late box, no refund.", ["delivery", "returns"])] * 4
    (root / "topics.jsonl").write_text("".join(json.dumps({"text": t, "topics": names}) + "\n" for t, names in rows))
    (root / "topics.csv").write_text("text,topics\n" + "".join(f'"{t}",{"|".join(names)}\n' for t, names in rows))
    return World(root, str(recipe), runs)


def topics(world: World, suffix: str, *args: str) -> list[str]:
    """A multi-label run over the topics file (both splits)."""
    file = world.file(f"topics.{suffix}")
    return train(world, f"data.files.train={file}", f"data.files.validation={file}", "data.label_column=topics",
                 "data.problem_type=multi_label", *args)  # fmt: skip


def train(world: World, *args: str) -> list[str]:
    return ["train", world.recipe, *args, "--output-dir", str(world.root / "out")]


# name -> (arguments, what the one line must say[, setup before the call]).
Case = tuple[Callable[[World], list[str]], str] | tuple[Callable[[World], list[str]], str, Callable]
CASES: dict[str, Case] = {
    # --- recipes and overrides
    "unknown recipe name": (lambda w: ["train", "quikstart"], "'quikstart' (did you mean 'quickstart'?)"),
    "missing recipe file": (lambda w: ["validate", str(w.root / "nope.yaml")], "nope.yaml not found"),
    "unknown top-level key": (lambda w: ["validate", w.recipe, "modle.revision=x"], "did you mean 'model'?"),
    "misspelt nested key": (lambda w: ["validate", w.recipe, "data.max_lenght=3"], "did you mean 'max_length'?"),
    "wrong value type": (lambda w: ["validate", w.recipe, "seed=abc"], "seed: input should be a valid integer"),
    "value out of range": (lambda w: ["validate", w.recipe, "data.validation_size=1.5"], "validation_size"),
    "length of zero, in our words": (
        lambda w: ["validate", w.recipe, "data.max_length=0"],
        "recipe key data.max_length must be greater than 0, got 0",
    ),
    "LoRA rank of zero": (lambda w: ["validate", w.recipe, "lora.r=0"], "lora.r must be a whole number of at least 1"),
    "fractional prefix length": (
        lambda w: ["validate", w.recipe, "method=prefix", "prefix.num_virtual_tokens=2.5"],
        "prefix.num_virtual_tokens must be a whole number",
    ),
    "override without =": (lambda w: ["validate", w.recipe, "lora.r"], "is not key=value"),
    "YAML syntax error": (lambda w: ["validate", w.file("broken.yaml")], "broken.yaml"),
    "duplicate YAML key": (lambda w: ["validate", w.file("dup.yaml")], "duplicate key 'seed'"),
    "recipe is not a mapping": (lambda w: ["validate", w.file("list.yaml")], "mapping"),
    "unknown method": (lambda w: ["validate", w.recipe, "method=lorra"], "unknown method 'lorra' (did you mean"),
    "misspelt metric": (lambda w: ["validate", w.recipe, "metrics=[acuracy]"], "did you mean 'accuracy'?"),
    "renamed Trainer key": (lambda w: ["validate", w.recipe, "train.evaluation_strategy=epoch"], "eval_strategy"),
    "key peftune sets": (lambda w: ["validate", w.recipe, "train.output_dir=x"], "top-level output_dir"),
    "bad Trainer value": (lambda w: ["validate", w.recipe, "train.lr_scheduler_type=wavy"], "SchedulerType"),
    "unknown LoRA argument": (lambda w: ["validate", w.recipe, "lora.rank=4"], "rank"),
    "LoRA+ ratio below one": (lambda w: ["validate", w.recipe, "lora.loraplus_lr_ratio=0.5"], "at least 1"),
    "LoRA+ ratio in another block": (lambda w: ["validate", w.recipe, "ia3.loraplus_lr_ratio=16"], "loraplus"),
    "unknown pooling": (lambda w: ["validate", w.recipe, "model.pooling=max"], "should be 'cls' or 'mean'"),
    "dropout of one": (lambda w: ["validate", w.recipe, "model.dropout=1"], "model.dropout must be less than 1.0"),
    "full fine-tuning in 8-bit": (lambda w: train(w, "method=full", "model.quantization=8bit"), "8bit weights"),
    "full fine-tuning in 4-bit": (lambda w: train(w, "method=full", "model.quantization=4bit"), "4bit weights"),
    "unknown quantization": (lambda w: ["validate", w.recipe, "model.quantization=3bit"], "'none', '8bit' or '4bit'"),
    "projected prefixes with the best checkpoint kept": (
        lambda w: train(
            w,
            "method=prefix",
            "prefix.prefix_projection=true",
            "train.eval_strategy=epoch",
            "train.save_strategy=epoch",
            "train.load_best_model_at_end=true",
        ),
        "cannot keep the best checkpoint: with prefix.prefix_projection=true",
    ),
    "multi-label column with an unknown label": (
        lambda w: topics(w, "jsonl", "data.labels=[billing, delivery]"),
        "label 'returns' in column 'topics' is not in data.labels ['billing', 'delivery']",
    ),
    "multi-label string column without a separator": (
        lambda w: topics(w, "csv"),
        "column 'topics' holds one string per row: set data.label_separator",
    ),
    "multi-label thresholds of the wrong length": (
        lambda w: topics(w, "jsonl", "data.thresholds=[0.5, 0.4]"),
        "data.thresholds has 2 values but the data has 3 labels (billing, delivery, returns)",
    ),
    "threshold out of range": (lambda w: ["validate", w.recipe, "data.thresholds=1.5"], "between 0 and 1"),
    "multi-label class weights of the wrong length": (
        lambda w: topics(w, "csv", "data.label_separator=|", "train.class_weights=[1, 2]"),
        "train.class_weights has 2 weights but the data has 3 labels",
    ),
    "a single-label metric for multi-label": (
        lambda w: topics(w, "jsonl", "metrics=[matthews_correlation]"),
        "metric 'matthews_correlation' does not apply to multi_label",
    ),
    "stride not smaller than the window": (
        lambda w: ["validate", w.recipe, "data.long_text=chunk", "data.stride=32"],
        "data.stride (32) is the tokens consecutive windows share and must be smaller than the window",
    ),
    "stride that leaves no room for text": (
        lambda w: train(w, "data.long_text=chunk", "data.stride=31"),
        "data.stride (31) leaves no new tokens in a window of 32 tokens",
    ),
    "thresholds on single-label data": (
        lambda w: train(w, "data.thresholds=0.3"),
        "data.thresholds applies to multi-label data, and this is classification",
    ),
    "stride without chunking": (lambda w: ["validate", w.recipe, "data.stride=8"], "set data.long_text=chunk, or drop"),
    "chunked sentence pairs": (
        lambda w: ["validate", w.recipe, "data.long_text=chunk", "data.text_columns=[a, b]"],
        "data.long_text=chunk splits single texts into windows",
    ),
    "a method's epochs that are not epochs": (
        lambda w: ["validate", w.recipe, "prefix.num_train_epochs=0"],
        "prefix.num_train_epochs replaces train.num_train_epochs when method=prefix: a number above 0, got 0",
    ),
    "a token budget smaller than a text": (
        lambda w: ["validate", w.recipe, "train.batch_tokens=16"],
        "train.batch_tokens is the most tokens a training batch holds, padding included: auto, or a whole number "
        "of at least data.max_length (32)",
    ),
    "a token budget with another sampler": (
        lambda w: ["validate", w.recipe, "train.batch_tokens=256", "train.train_sampling_strategy=group_by_length"],
        "cannot be combined with train.train_sampling_strategy=group_by_length",
    ),
    "a token budget fitted to memory": (
        lambda w: train(w, "train.batch_tokens=256", "--fit", "8GB"),
        "train.batch_tokens sets a budget of tokens instead; drop one of them",
    ),
    "class weights of the wrong length": (
        lambda w: train(w, "train.class_weights=[1.0, 2.0, 3.0]"),
        "train.class_weights has 3 weights but the data has 2 labels (negative, positive)",
    ),
    "class weights that are not weights": (
        lambda w: ["validate", w.recipe, "train.class_weights=often"],
        "train.class_weights is balanced or a list of weights",
    ),
    "negative class weight": (lambda w: ["validate", w.recipe, "train.class_weights=[1, -2]"], "got [1, -2]"),
    "NUL in a path": (lambda w: ["validate", w.recipe, 'data.files.train="a\\0b"'], "holds a NUL character"),
    "unset environment variable": (lambda w: train(w, "data.files.train=${NO_SUCH_DIR}/t.csv"), "NO_SUCH_DIR"),
    "run name with a path": (lambda w: ["validate", w.recipe, "name=../evil"], "'../evil' cannot name a run folder"),
    # --- data
    "missing data file": (lambda w: train(w, f"data.files.train={w.root}/no-such.csv"), "no-such.csv"),
    "unknown file format": (lambda w: train(w, f"data.files.train={w.file('notes.txt')}"), "cannot tell the format"),
    "missing text column": (lambda w: train(w, "data.text_columns=[review]"), "'review'"),
    "missing label column": (lambda w: train(w, "data.label_column=sentiment"), "'sentiment'"),
    "label not in labels": (lambda w: train(w, "data.labels=[good,bad]"), "is not in data.labels"),
    "empty split": (lambda w: train(w, f"data.files.validation={w.file('empty.csv')}"), "is empty"),
    "undecodable text": (lambda w: train(w, f"data.files.train={w.file('latin1.csv')}"), "not UTF-8 text"),
    "metric for the wrong problem": (lambda w: train(w, "metrics=[pearson]"), "does not apply to classification"),
    # --- models and methods
    "missing model folder": (lambda w: train(w, f"model.name_or_path={w.root}/no-such-model"), "no-such-model"),
    "not a classification architecture": (
        lambda w: train(w, f"model.name_or_path={w.root}/vit"),
        "no sequence classification head",
    ),
    "prefix on an architecture it does not support": (
        lambda w: train(w, "method=prefix", f"model.name_or_path={w.root}/albert"),
        "prefix tuning supports bert, roberta",
    ),
    "prefix with reentrant gradient checkpointing": (
        lambda w: train(
            w,
            "method=prefix",
            "train.gradient_checkpointing=true",
            "train.gradient_checkpointing_kwargs={use_reentrant: true}",
        ),
        "needs non-reentrant checkpointing",
    ),
    "prefix and text longer than the model's positions": (
        lambda w: train(w, "method=prefix", "data.max_length=500"),
        "set data.max_length to 492 or less",
    ),
    "8-bit without bitsandbytes": (
        lambda w: train(w, "model.quantization=8bit"),
        "needs a working bitsandbytes",
        lambda monkeypatch: monkeypatch.setitem(sys.modules, "bitsandbytes", None),
    ),
    "max_length above the model's limit": (lambda w: train(w, "data.max_length=4096"), "data.max_length"),
    # --- runs and what uses them
    "resume with nothing to resume": (lambda w: train(w, "--resume"), "nothing to resume"),
    "incomplete run": (lambda w: ["eval", str(w.root / "incomplete")], "--resume"),
    "not a run folder": (lambda w: ["predict", str(w.root / "empty-folder"), "--text", "hi"], "neither a peftune run"),
    "missing input file": (
        lambda w: ["predict", str(w.runs["lora"]), "--input", w.file("nope.csv"), "--output", w.file("p.csv")],
        "input file not found",
    ),
    "unknown eval split": (lambda w: ["eval", str(w.runs["lora"]), "--split", "nope"], "no split 'nope'"),
    "merge of a prefix run": (lambda w: ["merge", str(w.runs["prefix"])], "cannot be folded into the weights"),
    "merge of a full run": (lambda w: ["merge", str(w.runs["full"])], "nothing to merge"),
    "export to an existing folder": (
        lambda w: ["export", str(w.runs["full"]), "--format", "safetensors", "--output", w.file("existing-export")],
        "already exists",
    ),
    "compare with an incomplete run": (
        lambda w: ["compare", str(w.runs["lora"]), str(w.root / "incomplete")],
        "incomplete run (no metrics.json)",
    ),
    "sweep grid without values": (lambda w: ["sweep", w.recipe, "--grid", "method"], "KEY=V1,V2"),
    "missing command argument": (lambda w: ["predict"], "Missing argument 'TARGET'"),
    "unknown option": (lambda w: ["train", w.recipe, "--epochs", "3"], "--epochs"),  # click's wording varies
    "copy over an existing file": (lambda w: ["copy", "quickstart", str(w.root / "mine.yaml")], "--force"),
    "predict with an incomplete run": (
        lambda w: ["predict", w.file("incomplete"), "--text", "hi"],
        "training did not finish; continue it with",
    ),
    "push of an incomplete run": (
        lambda w: ["push", w.file("incomplete"), "--repo-id", "me/tiny", "--dry-run"],
        "training did not finish",
    ),
    "export of an incomplete run": (
        lambda w: ["export", w.file("incomplete"), "--format", "onnx"],
        "holds an incomplete run (no metrics.json)",
    ),
    "push without a token": (
        lambda w: ["push", str(w.runs["lora"]), "--repo-id", "me/tiny"],
        "token",
        lambda monkeypatch: _no_token(monkeypatch),
    ),
}


USAGE = {"missing command argument", "unknown option"}


def _no_token(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", "/nonexistent/token")
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", "/nonexistent/stored_tokens")


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gets_one_line_and_exit_2(world, case, monkeypatch):
    args, expected, *setup = CASES[case]
    for prepare in setup:
        prepare(monkeypatch)
    arguments = args(world)
    result = CliRunner().invoke(main, arguments)

    assert result.exit_code == 2, result.output
    # Progress bars of the work done before the problem showed may come first; the error is one line, the last.
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and result.stderr.rstrip("\n").endswith(errors[0]), result.stderr
    assert errors[0].startswith("error: ") and expected in errors[0]
    assert "Traceback" not in result.output
    assert not (world.root / "out" / "metrics.json").exists(), "no run folder that looks complete"

    debug = CliRunner().invoke(main, ["--debug", *arguments])
    if case in USAGE:  # click's own usage errors have no traceback to show: click prints its usage text
        assert debug.exit_code == 2 and "Usage:" in debug.output
    else:
        assert isinstance(debug.exception, PeftuneError), "--debug lets the error and its traceback through"
        assert debug.exc_info is not None and debug.exc_info[2] is not None


def test_each_case_checks_a_message_of_its_own():
    """A case copied without changing what it expects would pass on another case's message."""
    assert len({expected for _, expected, *_ in CASES.values()}) == len(CASES)
