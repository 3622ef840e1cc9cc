"""Sweep: train the cartesian product of override grids, one run folder each, then write the comparison.

Each run trains in its own process (`python -m peftune train`), so a crash stays in its run and every run's
peak memory is its own. A run folder that is already complete is reused and an interrupted one continues from
its last checkpoint (`train --resume`), so an interrupted sweep resumes.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from peftune import compare, modeling, rundir
from peftune.errors import PeftuneError
from peftune.methods import METHODS
from peftune.recipe import Recipe, check_passthrough, load_recipe

log = logging.getLogger(__name__)


@dataclass
class GridRun:
    """One combination of the grids: its overrides, or why it does not apply."""

    assignments: dict[str, str]
    name: str
    skipped: str | None = None


@dataclass
class SweepResult:
    path: Path
    runs: list[Path] = field(default_factory=list)
    trained: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def parse_grid(item: str) -> tuple[str, list[str]]:
    """`KEY=V1,V2,...` as the key and its values (each read as YAML when the run's recipe is loaded)."""
    key, sep, values = item.partition("=")
    choices = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not key.strip() or not choices:
        raise PeftuneError(f"--grid {item!r} is not KEY=V1,V2,...; write it like --grid method=full,lora")
    return key.strip(), choices


def grid_runs(spec: str, grids: Sequence[str], overrides: Sequence[str] = ()) -> list[GridRun]:
    """The runs a sweep makes: the product of the grids, less the settings that do not apply to a run.

    A key of another method's block (`lora.r` in a `prefix` run) is dropped from that run, so the product
    does not train the same run twice; a combination the model cannot do (prefix tuning on an architecture
    it does not reach, full fine-tuning of 8-bit weights) is listed as skipped, with the reason.
    """
    axes = [parse_grid(item) for item in grids]
    if not axes:
        raise PeftuneError("a sweep needs at least one --grid KEY=V1,V2,...")
    keys = [key for key, _ in axes]
    if len(set(keys)) != len(keys):
        raise PeftuneError(f"--grid names a key twice ({', '.join(keys)}); give each key one --grid with all values")
    base = load_recipe(spec, overrides)
    config = modeling.config_if_reachable(base.model)
    plans: dict[tuple[tuple[str, str], ...], GridRun] = {}
    for values in itertools.product(*(choices for _, choices in axes)):
        assignments = dict(zip(keys, values, strict=True))
        method = str(yaml.safe_load(assignments["method"])) if "method" in assignments else base.method
        if method not in METHODS:  # let the recipe check name it, with its hint
            load_recipe(spec, [*overrides, f"method={method}"])
        assignments = _applicable(assignments, method)
        identity = tuple(assignments.items())
        if identity in plans:
            continue
        reason = _not_applicable(assignments, method, base, spec, overrides, config)
        plans[identity] = GridRun(assignments, run_name(assignments), reason)
    return list(plans.values())


def sweep(
    spec: str,
    grids: Sequence[str],
    overrides: Sequence[str] = (),
    output_dir: str | Path | None = None,
    echo: Any = print,
) -> SweepResult:
    """Train every planned run that is not complete yet, then write the report; return what happened."""
    plans = grid_runs(spec, grids, overrides)
    base = load_recipe(spec, overrides)
    result = SweepResult(Path(output_dir) if output_dir else rundir.RUNS_DIR / f"{base.name}-sweep")
    result.path.mkdir(parents=True, exist_ok=True)
    todo = [p for p in plans if p.skipped is None]
    for number, item in enumerate(todo, 1):
        run = rundir.RunDir(result.path / item.name)
        where = f"[{number}/{len(todo)}] {item.name}"
        status = train_run(
            spec, [*overrides, *_overrides(item.assignments)], run, result.path / rundir.SWEEP_LOGS_DIR,
            echo=lambda text, where=where: echo(f"{where}: {text}"),
        )  # fmt: skip
        if status == "failed":
            result.failed.append(item.name)
            continue
        (result.reused if status == "reused" else result.trained).append(item.name)
        result.runs.append(run.path)
    result.skipped = [{"run": p.name, "reason": p.skipped} for p in plans if p.skipped]
    for skipped in result.skipped:
        echo(f"skipped {skipped['run']}: {skipped['reason']}")
    write_report(result, spec, grids, overrides)
    if result.failed:
        raise PeftuneError(
            f"{len(result.failed)} run(s) failed ({', '.join(result.failed)}); read their logs in "
            f"{result.path / rundir.SWEEP_LOGS_DIR}, fix the cause and run the sweep again to resume"
        )
    return result


def write_report(result: SweepResult, spec: str, grids: Sequence[str], overrides: Sequence[str]) -> None:
    """report.md (table and chart), comparison.csv/.json, comparison.png and sweep.json in the sweep folder."""
    rows = compare.best_first(compare.collect(result.runs)) if result.runs else []
    for row in rows:  # run folders by their name inside the sweep, so the report reads the same anywhere
        row["run"] = Path(row["run"]).name
    histories = [rundir.RunDir(result.path / row["run"]).read_metrics().eval_history for row in rows]
    if rows:
        compare.plot(rows, histories, result.path / rundir.SWEEP_PLOT_FILE)
    for name in rundir.SWEEP_TABLE_FILES:  # comparison.csv, comparison.json
        (result.path / name).write_text(compare.render(rows, name.rpartition(".")[2]), encoding="utf-8")
    record = {"recipe": spec, "grids": list(grids), "overrides": list(overrides), "runs": [r["run"] for r in rows],
              "skipped": result.skipped, "failed": result.failed}  # fmt: skip
    (result.path / rundir.SWEEP_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    lines = [
        f"# Sweep: {spec}",
        "",
        f"Grids: {', '.join(f'`{g}`' for g in grids)}" + (f"; overrides: `{' '.join(overrides)}`" if overrides else ""),
        "",
        "Best first by each run's primary metric. Values are from each run's `metrics.json` "
        "(peak memory: process RSS on CPU, max allocated on GPU; standalone: the float32 model the run yields).",
        "",
        compare.render(rows, "markdown") if rows else "No run completed.",
    ]
    if rows:
        lines += ["", f"![eval curves, and the metric against parameters, time and memory]({rundir.SWEEP_PLOT_FILE})"]
    if result.skipped:
        lines += ["", "Skipped (do not apply):", ""]
        lines += [f"- `{s['run']}`: {s['reason']}" for s in result.skipped]
    if result.failed:
        lines += ["", "Failed (see `logs/`): " + ", ".join(f"`{name}`" for name in result.failed)]
    (result.path / rundir.SWEEP_REPORT_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")


def run_name(assignments: dict[str, str]) -> str:
    """A folder name for a run: its grid settings, e.g. `method=lora,lora.r=4`."""
    text = ",".join(f"{key}={value}" for key, value in assignments.items())
    return re.sub(r"[^A-Za-z0-9._=,+-]", "-", text)


def _applicable(assignments: dict[str, str], method: str) -> dict[str, str]:
    """Without the keys of other methods' blocks."""
    return {
        key: value
        for key, value in assignments.items()
        if key.split(".")[0] not in METHODS or key.split(".")[0] == method or "." not in key
    }


def _not_applicable(
    assignments: dict[str, str], method: str, base: Recipe, spec: str, overrides: Sequence[str], config: Any
) -> str | None:
    """Why a combination cannot run (None when it can); a mistake in the grid is an error, not a skip."""
    quantization: str = base.model.quantization
    if "model.quantization" in assignments:
        quantization = str(yaml.safe_load(assignments["model.quantization"]))
    elif "model.load_in_8bit" in assignments:  # before 0.2
        quantization = "8bit" if yaml.safe_load(assignments["model.load_in_8bit"]) is True else "none"
    if quantization != "none" and not METHODS[method].is_adapter:
        return f"full fine-tuning cannot train {quantization} weights"
    recipe = load_recipe(spec, [*overrides, *_overrides(assignments)])
    check_passthrough(recipe)
    if config is not None:
        try:
            METHODS[recipe.method].check_architecture(config)
        except PeftuneError as err:
            return str(err).split(";")[0]
    return None


def _check_same_settings(run: rundir.RunDir, recipe: Recipe) -> None:
    """A complete run is reused only when it was trained with the recipe this sweep would train it with."""
    if not recipe.same_as_saved(run.recipe_file):
        raise PeftuneError(
            f"{run.path} was trained with other settings than this sweep's; give the sweep another "
            "--output-dir, or remove that run folder to train it again"
        )


def _overrides(assignments: dict[str, str]) -> list[str]:
    return [f"{key}={value}" for key, value in assignments.items()]


def train_run(spec: str, overrides: Sequence[str], run: rundir.RunDir, logs: Path, echo: Any = print) -> str:
    """Make sure `run` holds a complete run of the recipe: "reused", "trained" (or resumed) or "failed".

    A complete run is reused only when it was trained with the same resolved recipe; an interrupted one
    continues from its last checkpoint. Training happens in a child process whose output goes to a log file.
    """
    if run.is_complete():
        _check_same_settings(run, load_recipe(spec, overrides))
        echo("complete, reused")
        return "reused"
    resume = run.recipe_file.is_file()  # started before: continue from its last checkpoint
    log_file = logs / f"{run.path.name}.log"
    echo(f"{'resuming' if resume else 'training'} (log: {log_file})")
    logs.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "peftune", "train", spec, *overrides, "--output-dir", str(run.path)]
    command += ["--resume"] if resume else []
    with log_file.open("a" if resume else "w", encoding="utf-8") as stream:
        stream.write("$ " + " ".join(command) + "\n")
        stream.flush()
        finished = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, check=False)
    if finished.returncode == 0 and run.is_complete():
        return "trained"
    echo("FAILED, see its log")
    return "failed"
