"""Promises about the project itself: the README's commands, CI, and what the wheel ships."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.S)


def test_readme_opens_with_the_quickstart_and_the_test_command():
    quickstart, tests = readme_commands()[:2]
    assert quickstart.endswith("peftune train quickstart") and "pip install" in quickstart
    assert tests.endswith("python -m pytest") and '".[test]"' in tests


def locked() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines()
    pins = [line.split("==") for line in lines if "==" in line and not line.startswith("#")]
    return {name.lower().replace("_", "-"): version for name, version in pins}


def test_both_readme_commands_install_the_locked_versions_in_the_declared_ranges():
    from packaging.requirements import Requirement

    for command in readme_commands()[:2]:
        assert "pip install -c constraints.txt -e" in command
    pins = locked()
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    for line in declared:
        requirement = Requirement(line)
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not in the lock"
        assert requirement.specifier.contains(pins[name]), f"the lock's {name} {pins[name]} is outside {line}"


def test_the_readme_states_the_locked_versions():
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## Supported versions", 1)[1].split("\n## ")[0]
    section = " ".join(section.split())
    pins = locked()
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets"):
        assert f"{name} {pins[name]}" in section, f"the README's supported versions do not give {name} {pins[name]}"


def test_ci_runs_the_readme_test_command_and_walks_the_readme():
    import importlib.util

    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert readme_commands()[1] in ci.splitlines()
    assert "python scripts/readme_walk.py" in ci.splitlines() and "ruff check" in ci and "ruff format --check" in ci
    spec = importlib.util.spec_from_file_location("readme_walk", ROOT / "scripts" / "readme_walk.py")
    assert spec is not None and spec.loader is not None
    walk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(walk)
    steps = [" ".join(["peftune", *args]) for _, args in walk.STEPS]
    # Every `peftune train quickstart ...` the README suggests is a step of the walk, the quickstart first.
    suggested = set(re.findall(r"`(peftune train quickstart[^`]*)`", (ROOT / "README.md").read_text(encoding="utf-8")))
    assert steps[0] == "peftune train quickstart" and suggested and suggested <= set(steps), suggested - set(steps)
    for command in ("predict", "eval", "merge", "export", "compare"):
        assert any(step.startswith(f"peftune {command} ") for step in steps), command


def test_wheel_ships_recipes_and_quickstart_data(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("peftune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"peftune/recipes/{p.name}" for p in (ROOT / "recipes").glob("*.yaml")}
    assert shipped and shipped <= names
    assert {"peftune/quickstart/train.csv", "peftune/quickstart/validation.csv"} <= names
    assert {"peftune/feedback/train.jsonl", "peftune/feedback/validation.jsonl"} <= names  # feedback-* recipes


def test_a_test_run_without_the_real_data_says_in_one_line_why_tests_were_skipped(tmp_path):
    import os

    missing = tmp_path / "no-data-here"
    env = {**os.environ, "PEFTUNE_DATA_DIR": str(missing)}
    command = [sys.executable, "-m", "pytest", "tests/test_catalogue.py", "-k", "twins_read", "-p", "no:cacheprovider"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:]
    said = [line for line in done.stdout.splitlines() if "PEFTUNE_DATA_DIR" in line]
    assert len(said) == 1 and str(missing) in said[0] and "../shared/data" in said[0], done.stdout[-2000:]
    assert said[0].startswith("skipped ") and " tests that need the real GLUE/IMDb files" in said[0]


def test_the_code_layout_section_names_every_module_and_only_those():
    import importlib

    section = (ROOT / "README.md").read_text(encoding="utf-8").split("### How the code is laid out", 1)[1]
    section = section.split("\n## ", 1)[0]
    named = set(re.findall(r"`(\w+)\.py`", section))
    modules = {path.stem for path in (ROOT / "peftune").glob("*.py")} - {"__init__", "__main__"}
    assert named == modules, f"README names {sorted(named - modules)} but not {sorted(modules - named)}"
    # The functions it names as module.function exist where it says.
    for module, name in re.findall(r"`(\w+)\.(\w+)`", section):
        if module in modules and name not in ("py", "json"):  # file names, not attributes
            assert hasattr(importlib.import_module(f"peftune.{module}"), name), f"{module}.{name}"
