"""Recipes: loading, overrides, defaults, validation errors, copy."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftune.errors import PeftuneError
from peftune.methods import METHODS
from peftune.recipe import (
    check_passthrough,
    copy_recipe,
    list_recipes,
    load_recipe,
    local_path,
    parse_yaml,
    shipped_recipes,
)

MINIMAL = """
model: {name_or_path: some-org/some-model}
data: {source: some-dataset, text_columns: [sentence]}
"""


def write(tmp_path: Path, text: str, name: str = "my-run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(PeftuneError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, "a user error is one line"
    return message


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_every_shipped_recipe_validates(name):
    recipe = load_recipe(name)
    check_passthrough(recipe)
    assert recipe.name == name
    assert recipe.description, "shipped recipes say what they do"


def test_listing_names_every_shipped_file():
    assert [s.name for s in list_recipes()] == sorted(shipped_recipes())
    quickstart = next(s for s in list_recipes() if s.name == "quickstart")
    assert (quickstart.task, quickstart.method) == ("quickstart", "lora")


def test_name_defaults_to_file_stem_and_defaults_fill_in(tmp_path):
    recipe = load_recipe(str(write(tmp_path, MINIMAL)))
    assert recipe.name == "my-run"
    assert recipe.method == "lora"
    assert recipe.lora["r"] == 16 and recipe.lora["target_modules"] is None and recipe.lora["lora_dropout"] == 0.0
    assert recipe.train["num_train_epochs"] == 3
    assert recipe.data.text_columns == ["sentence"]


def test_learning_rate_follows_the_method_unless_train_sets_it(tmp_path):
    path = str(write(tmp_path, MINIMAL))
    assert load_recipe(path).learning_rate == pytest.approx(1e-3)
    assert load_recipe(path, ["method=full"]).learning_rate == pytest.approx(5e-5)
    assert load_recipe(path, ["method=prefix"]).learning_rate == pytest.approx(1e-2)
    assert load_recipe(path, ["full.learning_rate=2e-5", "method=full"]).learning_rate == pytest.approx(2e-5)
    assert load_recipe(path, ["train.learning_rate=3e-4", "method=full"]).learning_rate == pytest.approx(3e-4)
    kwargs = load_recipe(path, ["seed=7"]).training_arguments("out")
    assert kwargs["learning_rate"] == pytest.approx(1e-3) and kwargs["seed"] == 7 and kwargs["output_dir"] == "out"


def test_a_method_block_can_set_its_own_epochs(tmp_path):
    """`prefix.num_train_epochs` replaces train.num_train_epochs when prefix tuning runs, and only then."""
    path = str(write(tmp_path, MINIMAL + "prefix: {num_train_epochs: 10}\n"))
    assert load_recipe(path, ["method=prefix"]).training_arguments("out")["num_train_epochs"] == 10
    assert load_recipe(path).training_arguments("out")["num_train_epochs"] == 3, "LoRA keeps the train block's"
    assert load_recipe(path, ["method=full", "train.num_train_epochs=2"]).num_train_epochs == 2
    assert load_recipe(path, ["method=prefix", "prefix.num_train_epochs=null"]).num_train_epochs == 3
    # Not a peft argument: validate builds the peft config without it.
    assert METHODS["prefix"].peft_config(load_recipe(path, ["method=prefix"]).prefix).num_virtual_tokens == 20


def test_a_run_is_the_same_unless_what_it_trained_with_changed(tmp_path):
    """Resume and reuse compare what reached the run: not its name or folder, not the blocks of other methods."""
    path = str(write(tmp_path, MINIMAL))
    saved = tmp_path / "recipe.yaml"
    saved.write_text(load_recipe(path).to_yaml(), encoding="utf-8")
    assert load_recipe(path, ["name=elsewhere", "output_dir=runs/x"]).same_as_saved(saved)
    assert load_recipe(path, ["prefix.num_train_epochs=10", "full.learning_rate=1e-4"]).same_as_saved(saved)
    # The rate and epochs as the run used them, from the train block or the method's.
    assert load_recipe(path, ["lora.num_train_epochs=3", "train.learning_rate=1e-3"]).same_as_saved(saved)
    assert not load_recipe(path, ["lora.num_train_epochs=4"]).same_as_saved(saved)
    for changed in ("lora.r=4", "method=full", "train.num_train_epochs=2", "seed=7", "data.max_length=64"):
        assert not load_recipe(path, [changed]).same_as_saved(saved), changed
    saved.write_text("model: [not, a, recipe]\n", encoding="utf-8")
    assert not load_recipe(path).same_as_saved(saved)


def test_a_lora_run_saved_before_lora_chose_its_dropout_is_not_the_default(tmp_path):
    """A recipe.yaml with `model.dropout` null or absent trained with the checkpoint's dropout, not LoRA's 0."""
    path = str(write(tmp_path, MINIMAL))
    saved = tmp_path / "recipe.yaml"
    written = load_recipe(path).to_yaml()
    assert "  dropout: 0.0\n" in written
    saved.write_text(written, encoding="utf-8")
    assert load_recipe(path).same_as_saved(saved)
    for before in ("  dropout: null\n", ""):
        saved.write_text(written.replace("  dropout: 0.0\n", before), encoding="utf-8")
        assert not load_recipe(path).same_as_saved(saved), "reused with the dropout on as if it were off"
        assert not load_recipe(path, ["model.dropout=0"]).same_as_saved(saved)
    saved.write_text(written.replace("  dropout: 0.0\n", "  dropout: 0.1\n"), encoding="utf-8")
    assert load_recipe(path, ["model.dropout=0.1"]).same_as_saved(saved)


def test_a_method_block_merges_over_its_defaults(tmp_path):
    recipe = load_recipe(str(write(tmp_path, MINIMAL + "lora: {r: 4}\n")), ["lora.lora_dropout=0.05"])
    assert recipe.lora == {
        "learning_rate": 1e-3,
        "r": 4,
        "lora_alpha": 8,  # follows the rank the block sets (twice it, as the defaults' 32 for 16)
        "lora_dropout": 0.05,
        "target_modules": None,
    }


def test_lora_alpha_follows_a_rank_set_without_it(tmp_path):
    path = str(write(tmp_path, MINIMAL))
    assert load_recipe(path).lora["lora_alpha"] == 32
    assert load_recipe(path, ["lora.r=64"]).lora["lora_alpha"] == 128
    assert load_recipe(path, ["lora.r=64", "lora.lora_alpha=16"]).lora["lora_alpha"] == 16  # set: kept
    alpha_only = load_recipe(path, ["lora.lora_alpha=8"]).lora
    assert (alpha_only["r"], alpha_only["lora_alpha"]) == (16, 8)
    with pytest.raises(PeftuneError, match=r"lora\.r must be a whole number"):
        load_recipe(path, ["lora.r=0.5"])


def test_override_values_are_yaml(tmp_path):
    path = str(write(tmp_path, MINIMAL))
    recipe = load_recipe(
        path,
        [
            "train.learning_rate=5e-4",
            "data.labels=[neg, pos]",
            "data.max_train_samples=null",
            "data.files.train=train.csv",
            "model.quantization=4bit",
            "description=a run with spaces",
        ],
    )
    assert isinstance(recipe.train["learning_rate"], float) and recipe.train["learning_rate"] == 5e-4
    assert recipe.data.labels == ["neg", "pos"]
    assert recipe.data.max_train_samples is None
    assert recipe.data.files == {"train": str(Path.cwd() / "train.csv")}, "override paths are relative to cwd"
    assert recipe.model.quantization == "4bit"
    assert recipe.description == "a run with spaces"


def test_yaml_reads_the_way_people_expect():
    assert parse_yaml("lr: 5e-4\nx: 1.0E+3\nn: 3", "t") == {"lr": 5e-4, "x": 1000.0, "n": 3}
    assert parse_yaml("labels: [no, yes, on, off]\nflag: true", "t") == {
        "labels": ["no", "yes", "on", "off"],
        "flag": True,
    }
    assert "duplicate key 'a'" in error_of(parse_yaml, "a: 1\nb: 2\na: 3", "recipe x")
    assert "line 1" in error_of(parse_yaml, "a: [1, 2", "recipe x")


def test_yaml_is_loaded_safely(tmp_path):
    text = MINIMAL + "description: !!python/object/apply:os.system ['echo pwned']\n"
    assert "not valid YAML" in error_of(load_recipe, str(write(tmp_path, text)))


def test_relative_data_files_are_relative_to_the_recipe(tmp_path):
    (tmp_path / "sub").mkdir()
    text = "model: {name_or_path: ./my-model}\ndata: {files: {train: data/train.csv, test: [a.csv, /abs/b.csv]}}\n"
    recipe = load_recipe(str(write(tmp_path / "sub", text)))
    assert recipe.data.files == {
        "train": str(tmp_path / "sub" / "data" / "train.csv"),
        "test": [str(tmp_path / "sub" / "a.csv"), "/abs/b.csv"],
    }
    assert recipe.model.name_or_path == str(tmp_path / "sub" / "my-model")


@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        (MINIMAL + "data2: 1\n", [], "unknown recipe key data2 (did you mean 'data'?)"),
        (MINIMAL, ["data.max_lenght=64"], "unknown recipe key data.max_lenght (did you mean 'max_length'?)"),
        (MINIMAL, ["model.quantisation=8bit"], "did you mean 'quantization'?"),
        (MINIMAL, ["data.max_length=long"], "recipe key data.max_length: input should be a valid integer"),
        (
            MINIMAL,
            ["model.quantization=3bit"],
            "recipe key model.quantization: input should be 'none', '8bit' or '4bit'",
        ),
        (MINIMAL, ["model.load_in_8bit=yes"], "model.load_in_8bit must be true or false"),
        (MINIMAL, ["model.load_in_8bit=true", "model.quantization=4bit"], "contradicts model.quantization=4bit"),
        (MINIMAL, ["method=adapter"], "recipe key method: unknown method 'adapter'; use one of: full, lora, prefix"),
        (MINIMAL, ["data.text_columns=[a, b, c]"], "recipe key data.text_columns"),
        (MINIMAL, ["data.files.train=3"], "recipe key data.files.train"),
        (MINIMAL, ["data.labels=[a, a]"], "data.labels has duplicates"),
        (MINIMAL, ["name=no spaces"], "recipe key name"),
        (MINIMAL, ["metrics=[acuracy]"], "unknown metric 'acuracy' (did you mean 'accuracy'?)"),
        ("model: {name_or_path: m}\n", [], "recipe key data is required"),
        ("data: {source: d}\n", [], "recipe key model is required"),
        ("model: {}\ndata: {source: d}\n", [], "recipe key model.name_or_path is required"),
        ("model: {name_or_path: m}\ndata: {text_columns: [a]}\n", [], "data needs a source"),
        ("- a\n- b\n", [], "must be a YAML mapping"),
        (MINIMAL, ["max_length"], "is not key=value"),
        (MINIMAL, ["data.source.x=1"], "data.source is 'some-dataset', not a mapping"),
        (MINIMAL, ["train=[1"], "the value of override train is not valid YAML"),
    ],
)
def test_bad_recipes_get_one_line_that_names_the_key(tmp_path, text, overrides, expected):
    assert expected in error_of(load_recipe, str(write(tmp_path, text)), overrides)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.learning_rte=1e-3"], "unknown key train.learning_rte (did you mean 'learning_rate'?)"),
        (["train.warmup_ratio=0.1"], "train.warmup_ratio is not accepted here; use warmup_steps (a float below 1"),
        (["train.evaluation_strategy=epoch"], "use eval_strategy"),
        (["train.output_dir=x"], "use the top-level output_dir key"),
        (["train.eval_strategy=sometimes"], "train: "),
        (["lora.rank=8"], "unknown key lora.rank"),
        (["lora.task_type=CAUSAL_LM"], "lora.task_type is not accepted here"),
        (["prefix.num_virtual_token=10"], "did you mean 'num_virtual_tokens'?"),
        (["full.r=8"], "unknown key full.r"),
        (["lora.lora_dropout=[1]"], "lora.lora_dropout: input should be a valid number, got [1]"),
        (["lora.lora_bias=true", "lora.use_dora=true"], "lora: The argument lora_bias=True is not supported for DoRA"),
        (["train.num_train_epochs=three"], "train.num_train_epochs: input should be a valid number"),
        (["train.bf16=maybe"], "train.bf16: input should be a valid boolean"),
    ],
)
def test_passthrough_keys_are_checked_by_building_the_objects(tmp_path, overrides, expected):
    recipe = load_recipe(str(write(tmp_path, MINIMAL)), overrides)
    assert expected in error_of(check_passthrough, recipe)


def test_unknown_recipe_name_suggests_a_shipped_one():
    assert "did you mean 'quickstart'?" in error_of(load_recipe, "quikstart")
    assert "not found" in error_of(load_recipe, "missing/recipe.yaml")


def test_copy_refuses_to_overwrite_without_force(tmp_path):
    target = copy_recipe("quickstart", tmp_path)
    assert target == tmp_path / "quickstart.yaml"
    assert target.read_text() == shipped_recipes()["quickstart"].read_text(), "comments survive the copy"
    target.write_text("edited")
    assert "--force" in error_of(copy_recipe, "quickstart", target)
    assert target.read_text() == "edited", "nothing lost"
    copy_recipe("quickstart", target, force=True)
    assert load_recipe(str(target)).name == "quickstart"


def test_local_path_resolves_packages_and_variables(monkeypatch):
    assert Path(local_path("pkg://peftune/quickstart/train.csv", "k")).is_file()
    assert "pip install not-a-package" in error_of(local_path, "pkg://not_a_package/x", "model.name_or_path")
    monkeypatch.setenv("MY_DATA", "/data")
    assert local_path("$MY_DATA/sst2/train.tsv", "k") == "/data/sst2/train.tsv"
    monkeypatch.delenv("MY_DATA")
    message = error_of(local_path, "${MY_DATA}/train.tsv", "data.files.train")
    assert "uses $MY_DATA, which is not set" in message and "data.files.train=PATH" in message
