"""Walk through the README as a new user: the quickstart, the method switches it suggests, predict on text and
on a file, eval, merge, export, predict on the export, compare.

Every step runs the `peftune` command (of the Python running the walk) in a fresh folder, offline. The walk
fails when a step exits non-zero, or when the output of all steps together holds a traceback, a warning or a
transformers load report. It prints each step's wall time (the README's times come from it). CI runs it after the tests:

    python scripts/readme_walk.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# What a user must never see in normal use.
NOISE = re.compile(r"traceback|warning|load report|futurewarning", re.IGNORECASE)

STEPS: list[tuple[str, list[str]]] = [
    ("quickstart (LoRA)", ["train", "quickstart"]),
    ("the same with full fine-tuning", ["train", "quickstart", "method=full"]),
    ("the same with prefix tuning", ["train", "quickstart", "method=prefix"]),
    ("predict on text", ["predict", "runs/quickstart", "--text", "Great battery.", "--text", "Broke in a week."]),
    ("predict on a file", ["predict", "runs/quickstart", "--input", "reviews.csv", "--output", "predictions.csv"]),
    ("eval", ["eval", "runs/quickstart"]),
    ("merge", ["merge", "runs/quickstart"]),
    ("export to ONNX", ["export", "runs/quickstart", "--format", "onnx"]),
    ("predict on the export", ["predict", "runs/quickstart/export-onnx", "--text", "Great battery, sharp screen."]),
    ("compare", ["compare", "runs/quickstart", "runs/quickstart-method-full", "runs/quickstart-method-prefix"]),
]  # fmt: skip


def walk(folder: Path) -> list[str]:
    """Run every step in `folder`; the problems found (empty when the walk passed)."""
    shutil.copyfile(str(importlib.resources.files("peftune") / "quickstart" / "validation.csv"), folder / "reviews.csv")
    peftune = [sys.executable, "-m", "peftune"]  # the `peftune` command of this interpreter's environment
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    problems = []
    for title, args in STEPS:
        started = time.perf_counter()
        done = subprocess.run([*peftune, *args], cwd=folder, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        output = done.stdout + done.stderr
        print(f"== {title}: peftune {' '.join(args)}  ({seconds:.0f} s, exit {done.returncode})", flush=True)
        print(output.rstrip(), flush=True)
        if done.returncode != 0:
            problems.append(f"{title}: exit {done.returncode}")
        problems += [f"{title}: {line.strip()}" for line in output.splitlines() if NOISE.search(line)]
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, help="walk in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        problems = walk(args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="peftune-walk-") as tmp:
            problems = walk(Path(tmp))
    if problems:
        print("\nthe README walk failed:\n  " + "\n  ".join(problems))
        return 1
    print("\nthe README walk passed: every step exited 0, with no traceback, warning or load report")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
