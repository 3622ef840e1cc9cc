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


def test_ci_runs_the_readme_test_command_and_the_quickstart():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert readme_commands()[1] in ci.splitlines()
    assert "peftune train quickstart" in ci and "ruff check" in ci and "ruff format --check" in ci


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
