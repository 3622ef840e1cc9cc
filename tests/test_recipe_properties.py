"""Property tests: whatever YAML or overrides the recipe loader is given, it returns a recipe or raises the one
user-error type (which the command line prints as one line, exit code 2). Never another exception."""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftune.errors import PeftuneError
from peftune.recipe import Recipe, check_passthrough, load_recipe

# Real key names mixed with noise, so that generated recipes get past the first checks often enough.
KEYS = ["name", "description", "seed", "model", "data", "method", "full", "lora", "prefix", "prompt", "ia3", "train",
        "metrics", "output_dir", "name_or_path", "revision", "load_in_8bit", "quantization", "trust_remote_code",
        "source", "files",
        "options", "text_columns", "label_column", "labels", "problem_type", "max_length", "validation_size",
        "r", "lora_alpha", "learning_rate", "num_train_epochs", "num_virtual_tokens", "eval_strategy"]  # fmt: skip
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["lora", "full", "prefix", "accuracy", "epoch", "csv", "train.csv", "${HOME}", "pkg://x/y"])
)
NAMES = st.sampled_from(KEYS) | st.text(max_size=8)
VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(NAMES, inner, max_size=5), max_leaves=25
)
DOCUMENTS = st.dictionaries(NAMES, VALUES, max_size=8)
# Valid recipes with random values in real places: these get past the schema often, into the deeper checks.
NEAR_VALID = st.fixed_dictionaries(
    {
        "model": st.fixed_dictionaries(
            {"name_or_path": st.just("some-org/some-model") | SCALARS},
            optional={"load_in_8bit": SCALARS, "quantization": SCALARS, "revision": SCALARS, "allow_pickle": SCALARS},
        ),
        "data": st.fixed_dictionaries(
            {"source": st.just("some-dataset") | SCALARS},
            optional={"text_columns": VALUES, "labels": VALUES, "max_length": SCALARS, "files": VALUES},
        ),
    },
    optional={
        "method": st.sampled_from(["full", "lora", "prefix", "prompt", "ia3"]) | SCALARS,
        "lora": st.dictionaries(st.sampled_from(["r", "lora_alpha", "target_modules", "learning_rate"]), VALUES),
        "prefix": st.dictionaries(st.sampled_from(["num_virtual_tokens", "prefix_projection"]), SCALARS),
        "train": st.dictionaries(st.sampled_from(["num_train_epochs", "warmup_steps", "eval_strategy"]), SCALARS),
        "metrics": VALUES,
        "seed": SCALARS,
        "name": SCALARS,
    },
)
OVERRIDE_KEYS = ["seed", "method", "name", "model.name_or_path", "model.load_in_8bit", "model.quantization",
                 "data.max_length",
                 "data.labels", "data.text_columns", "data.files.train", "lora.r", "lora.target_modules",
                 "prefix.num_virtual_tokens", "train.num_train_epochs", "train.learning_rate", "train.warmup_steps",
                 "train.eval_strategy", "metrics", "data.validation_size"]  # fmt: skip

FOLDER = Path(tempfile.mkdtemp(prefix="peftune-properties-"))
PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def load_and_check(text: str, overrides: list[str] | None = None) -> None:
    path = FOLDER / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        recipe = load_recipe(str(path), overrides or [])
        check_passthrough(recipe)
    except PeftuneError as err:
        assert "\n" not in str(err) and str(err), "one line that says something"
    else:
        assert isinstance(recipe, Recipe)


@PROPERTY_SETTINGS
@given(DOCUMENTS | NEAR_VALID)
def test_random_mappings(document):
    load_and_check(yaml.safe_dump(document, allow_unicode=True))


@PROPERTY_SETTINGS
@given(st.text(max_size=200))
def test_random_text(text):
    load_and_check(text)


@PROPERTY_SETTINGS
@given(st.lists(st.tuples(st.sampled_from(OVERRIDE_KEYS) | st.text(max_size=10), st.text(max_size=12) | SCALARS.map(
    lambda v: yaml.safe_dump(v, default_flow_style=True).removesuffix("\n...\n").strip())), max_size=4))  # fmt: skip
def test_random_overrides_on_a_valid_recipe(pairs):
    base = {"model": {"name_or_path": "some-org/some-model"}, "data": {"source": "some-dataset"}}
    load_and_check(yaml.safe_dump(base), [f"{key}={value}" for key, value in pairs])
