"""Comparing runs, and sweeps that train a grid of runs and write the comparison."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import shutil

import pytest
import tiny
from click.testing import CliRunner

from peftune.cli import main
from peftune.compare import collect, compare_runs, render, sort_rows
from peftune.errors import PeftuneError
from peftune.sweep import grid_runs, sweep

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def metrics_of(path) -> dict:
    return json.loads((path / "metrics.json").read_text())


def test_rows_carry_each_runs_recorded_values(runs):
    paths = [runs[name] for name in ("lora", "full", "prefix", "lora8")]
    rows = collect(paths)
    for row, path in zip(rows, paths, strict=True):
        metrics = metrics_of(path)
        assert row["method"] == metrics["method"]
        assert row["metric_name"] == "accuracy" and row["metric"] == metrics["eval"]["accuracy"]
        assert row["trainable_parameters"] == metrics["trainable_parameters"]
        assert row["trainable_share"] == pytest.approx(100 * metrics["trainable_share"], abs=1e-4)
        for key in ("train_runtime_s", "train_samples_per_second", "train_tokens_per_second", "peak_memory_mb",
                    "weights_mb", "standalone_model_mb", "quantization", "device"):  # fmt: skip
            assert row[key] == metrics[key] and metrics[key] is not None, key
        assert row["eval_f1"] == metrics["eval"]["f1"] and row["eval_loss"] == metrics["eval"]["loss"]
    by_method = {row["method"] + ("8" if row["quantization"] == "8bit" else ""): row for row in rows}
    # What the comparison is for: adapters train a small share, and their weights on disk are smaller.
    assert by_method["full"]["trainable_share"] == pytest.approx(100)
    for adapter in ("lora", "prefix", "lora8"):
        assert by_method[adapter]["trainable_parameters"] < by_method["full"]["trainable_parameters"]
        assert by_method[adapter]["weights_mb"] < by_method["full"]["weights_mb"]
    # A merged LoRA model is the base itself; the full run's standalone model is its own weights.
    assert by_method["lora"]["standalone_model_mb"] == by_method["lora8"]["standalone_model_mb"]
    assert by_method["full"]["standalone_model_mb"] == pytest.approx(by_method["full"]["weights_mb"], rel=0.01)
    assert by_method["prefix"]["standalone_model_mb"] > by_method["lora"]["standalone_model_mb"]


def test_every_format_renders_the_same_values(runs):
    paths = [runs["lora"], runs["full"]]
    rows = collect(paths)
    parsed = list(csv.DictReader(io.StringIO(render(rows, "csv"))))
    assert [float(r["metric"]) for r in parsed] == [row["metric"] for row in rows]
    assert [int(r["trainable_parameters"]) for r in parsed] == [row["trainable_parameters"] for row in rows]
    assert json.loads(render(rows, "json")) == rows

    markdown = render(rows, "markdown").splitlines()
    assert markdown[0].startswith("| run | method |") and set(markdown[1]) <= {"|", "-"}
    assert len(markdown) == 2 + len(rows)
    for line, row in zip(markdown[2:], rows, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == row["run"] and cells[1] == row["method"]
        assert cells[4] == f"{row['metric']:.4f}" and cells[5] == f"{row['trainable_parameters']:,}"
        assert cells[6] == f"{row['trainable_share']:.3g}" and cells[6] != "100.0000"

    table = render(rows, "table").splitlines()
    assert table[0].split()[:3] == ["run", "method", "base"] and len(table) == 1 + len(rows)
    assert f"{rows[1]['trainable_parameters']:,}" in table[2]
    with pytest.raises(PeftuneError, match="unknown format 'xml'"):
        render(rows, "xml")


def test_sorting(runs):
    rows = collect([runs["lora"], runs["full"], runs["prefix"]])
    ascending = sort_rows(rows, "trainable_parameters")
    assert [r["trainable_parameters"] for r in ascending] == sorted(r["trainable_parameters"] for r in rows)
    descending = sort_rows(rows, "-peak_memory_mb")
    assert [r["peak_memory_mb"] for r in descending] == sorted((r["peak_memory_mb"] for r in rows), reverse=True)
    assert [r["method"] for r in sort_rows(rows, "method")] == ["full", "lora", "prefix"]
    with pytest.raises(PeftuneError, match=r"cannot sort by 'acuracy'; use one of: .*metric"):
        sort_rows(rows, "acuracy")


def test_plot_writes_a_png(runs, tmp_path):
    chart = tmp_path / "charts" / "compare.png"
    compare_runs([runs["lora"], runs["full"], runs["prefix"]], plot_file=chart)
    data = chart.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 20_000  # four panels with points and lines
    with pytest.raises(PeftuneError, match="--plot writes a PNG"):
        compare_runs([runs["lora"]], plot_file=tmp_path / "compare.pdf")


def test_cli_compare(runs, tmp_path):
    result = CliRunner().invoke(main, ["compare", str(runs["full"]), str(runs["lora"]), "--sort", "-metric",
                                       "--format", "csv", "--plot", str(tmp_path / "c.png")])  # fmt: skip
    assert result.exit_code == 0, result.output
    parsed = list(csv.DictReader(io.StringIO(result.stdout)))
    metric = {r["method"]: float(r["metric"]) for r in parsed}
    assert metric == {"full": metrics_of(runs["full"])["eval"]["accuracy"],
                      "lora": metrics_of(runs["lora"])["eval"]["accuracy"]}  # fmt: skip
    assert float(parsed[0]["metric"]) >= float(parsed[1]["metric"])
    assert (tmp_path / "c.png").read_bytes().startswith(PNG_SIGNATURE)


def test_compare_refuses_an_incomplete_run(runs, tmp_path):
    broken = shutil.copytree(runs["lora"], tmp_path / "broken")
    (broken / "metrics.json").unlink()
    result = CliRunner().invoke(main, ["compare", str(runs["full"]), str(broken)])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {broken} holds an incomplete run (no metrics.json): training did not finish; continue it with "
        f"`peftune train RECIPE --resume --output-dir {broken}`"
    ]


def test_plan_drops_settings_that_do_not_apply(tiny_models, reviews, tmp_path):
    recipe = str(tiny.write_recipe(tmp_path / "r.yaml", tiny_models("bert"), *reviews))
    plans = grid_runs(recipe, ["method=full,lora,prefix", "lora.r=2,4"])
    assert [(p.name, p.skipped) for p in plans] == [
        ("method=full", None),
        ("method=lora,lora.r=2", None),
        ("method=lora,lora.r=4", None),
        ("method=prefix", None),
    ]
    plans = grid_runs(recipe, ["method=full,lora", "model.quantization=none,4bit"])
    assert [(p.name, p.skipped) for p in plans] == [
        ("method=full,model.quantization=none", None),
        ("method=full,model.quantization=4bit", "full fine-tuning cannot train 4bit weights"),
        ("method=lora,model.quantization=none", None),
        ("method=lora,model.quantization=4bit", None),
    ]
    # The spelling before 0.2 is understood too.
    plans = grid_runs(recipe, ["method=full", "model.load_in_8bit=true"])
    assert [(p.name, p.skipped) for p in plans] == [
        ("method=full,model.load_in_8bit=true", "full fine-tuning cannot train 8bit weights")
    ]
    albert = tmp_path / "albert"  # an architecture prefix tuning does not reach
    albert.mkdir()
    (albert / "config.json").write_text('{"model_type": "albert", "hidden_size": 32, "num_attention_heads": 2}')
    skipped = {p.name: p.skipped for p in grid_runs(recipe, ["method=lora,prefix"], [f"model.name_or_path={albert}"])}
    assert skipped["method=lora"] is None
    assert skipped["method=prefix"].startswith("prefix tuning supports bert, roberta")


@pytest.mark.parametrize(
    ("grids", "message"),
    [
        (["method"], "--grid 'method' is not KEY=V1,V2,...; write it like --grid method=full,lora"),
        (["lora.r=2", "lora.r=4"], "--grid names a key twice (lora.r, lora.r)"),
        (["method=ful,lora"], "unknown method 'ful' (did you mean 'full'?)"),
        (["lora.rr=2,4"], "unknown key lora.rr (did you mean 'r'?)"),
    ],
)
def test_a_mistake_in_a_grid_is_an_error_not_a_skip(tiny_bert, reviews, tmp_path, grids, message):
    recipe = str(tiny.write_recipe(tmp_path / "r.yaml", tiny_bert, *reviews))
    with pytest.raises(PeftuneError) as info:
        sweep(recipe, grids, output_dir=tmp_path / "sweep")
    assert message in str(info.value)
    assert not (tmp_path / "sweep").exists()


def test_sweep_trains_the_grid_reports_and_resumes(tiny_bert, reviews, tmp_path):
    recipe = str(tiny.write_recipe(tmp_path / "r.yaml", tiny_bert, *reviews))
    grids = ["method=full,lora,prefix", "lora.r=2,4"]
    folder = tmp_path / "sweep"
    first = sweep(recipe, grids, ["train.num_train_epochs=2"], folder, echo=lambda _: None)
    names = ["method=full", "method=lora,lora.r=2", "method=lora,lora.r=4", "method=prefix"]
    assert first.trained == names and first.reused == [] and first.failed == []

    runs = {name: metrics_of(folder / name) for name in names}
    assert runs["method=full"]["method"] == "full" and runs["method=prefix"]["method"] == "prefix"
    assert runs["method=lora,lora.r=2"]["trainable_parameters"] < runs["method=lora,lora.r=4"]["trainable_parameters"]
    assert all(len(m["eval_history"]) == 2 for m in runs.values())

    report = (folder / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| method=")]
    assert len(table) == 4
    metrics = [float(line.split("|")[5]) for line in table]
    assert metrics == sorted(metrics, reverse=True), "best first"
    assert sorted(metrics) == pytest.approx(sorted(m["eval"]["accuracy"] for m in runs.values()), abs=5e-5)
    assert "![eval curves" in report
    assert (folder / "comparison.png").read_bytes().startswith(PNG_SIGNATURE)
    rows = list(csv.DictReader((folder / "comparison.csv").open()))
    assert {r["run"]: int(r["trainable_parameters"]) for r in rows} == {
        name: m["trainable_parameters"] for name, m in runs.items()
    }

    # An interrupted sweep: one run never finished. Running the sweep again trains only that one.
    finished = {name: (folder / name / "metrics.json").stat().st_mtime_ns for name in names}
    (folder / "method=prefix" / "metrics.json").unlink()
    second = sweep(recipe, grids, ["train.num_train_epochs=2"], folder, echo=lambda _: None)
    assert second.trained == ["method=prefix"] and second.reused == names[:3]
    for name in names[:3]:
        assert (folder / name / "metrics.json").stat().st_mtime_ns == finished[name]
    assert (folder / "method=prefix" / "metrics.json").is_file()

    # The same folder with other settings is not silently reused.
    with pytest.raises(PeftuneError, match=r"method=full was trained with other settings than this sweep's"):
        sweep(recipe, grids, ["train.num_train_epochs=3"], folder, echo=lambda _: None)


def test_metrics_json_is_read_and_written_through_one_typed_record(runs):
    from peftune.record import Metrics

    for path in runs.values():
        on_disk = metrics_of(path)
        assert Metrics.from_json(on_disk).to_json() == on_disk, "the record reads back every key, in order"
        assert list(on_disk) == [f.name for f in dataclasses.fields(Metrics)]
    old = {**metrics_of(runs["lora8"]), "load_in_8bit": True}  # a run before 0.2
    del old["quantization"], old["base_model_path"]
    assert Metrics.from_json(old).quantization == "8bit" and Metrics.from_json(old).base_model_path is None


def test_every_comparison_column_is_a_field_of_the_metrics_record():
    from peftune.compare import COLUMNS
    from peftune.record import Metrics

    computed = {"run", "metric_name", "metric"}  # the folder, and the primary metric's name and value
    assert {key for key, _ in COLUMNS} - computed <= {f.name for f in dataclasses.fields(Metrics)}
