"""Check peftune against the newest releases of its dependencies, without the lock, and print what breaks.

    python scripts/check_releases.py                  # newest releases: fresh venv, fast tests, a tiny run per method
    python scripts/check_releases.py --oldest         # the lowest version of each dependency pyproject.toml allows
    python scripts/check_releases.py --write-lock     # when nothing broke, write constraints.txt from that venv

A fresh virtual environment gets `pip install -e ".[test]"` with no constraints (or, with --oldest, every
dependency pinned to its declared minimum), then the fast test suite runs in it, then each method trains the
shipped quickstart (the real MiniLM) and is re-scored from its run folder (`peftune eval`), through the command
line as a user runs it. The summary lists the versions installed, the tests that failed and the methods that
broke (an error, or an accuracy more than 3 points below the locked versions'), each with its first error line.
Exit code 0 when nothing broke. About ten minutes on two cores, plus the install.

torch is whatever pip resolves on this machine unless --torch says otherwise: newer releases than the CPU build
the README installs are CUDA builds of several GB (they run on the CPU too).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "constraints.txt"
DIRECT = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "evaluate", "safetensors",
          "onnx", "onnxruntime", "huggingface_hub", "tokenizers")  # fmt: skip
# One run per method of the shipped quickstart (the real MiniLM, 800 reviews, 3 epochs, under a minute each):
# (name, overrides, the validation accuracy it reached with the locked versions, 2 CPU cores).
RUNS = [
    ("full", ["method=full"], 0.8875),
    ("lora", ["method=lora"], 0.9042),
    ("lora-8bit", ["method=lora", "model.quantization=8bit"], 0.9125),
    ("prefix", ["method=prefix"], 0.8875),
    ("prompt", ["method=prompt"], 0.8500),
    ("ia3", ["method=ia3"], 0.9000),
]
SHORTFALL = 0.03  # below the locked versions' accuracy by more than this, a method counts as broken
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run(command: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd)


def minimum_pins() -> list[str]:
    """`name==lowest` for every runtime dependency of pyproject.toml that declares a lower bound."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = []
    for requirement in project["dependencies"]:
        found = re.match(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][^,;\s]*)", requirement)
        if found and found.group(1) != "torch":
            pins.append(f"{found.group(1)}=={found.group(2)}")
    return pins


def install(venv: Path, torch: str, oldest: bool) -> str:
    """Build the venv; return pip's error output when the install failed, else an empty string."""
    python = venv / "bin" / "python"
    shutil.rmtree(venv, ignore_errors=True)  # fresh: what pip keeps from an earlier install would hide a conflict
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--upgrade"]
    first = run([*pip, torch])
    if first.returncode:
        return first.stderr
    pins = minimum_pins() if oldest else []
    second = run([*pip, "-e", ".[test]", *pins])
    return second.stderr if second.returncode else ""


def versions(venv: Path) -> dict[str, str]:
    code = (
        "import json, importlib.metadata as m\n"
        f"names = {list(DIRECT)!r}\n"
        "out = {}\n"
        "for n in names:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))"
    )
    return json.loads(run([str(venv / "bin" / "python"), "-c", code]).stdout)


def run_tests(venv: Path, env: dict[str, str]) -> tuple[str, list[str]]:
    """The fast suite: its summary line, and its failures grouped by error (the count and the first tests)."""
    wide = {**env, "COLUMNS": "400"}  # pytest cuts the error of each summary line to the terminal's width
    result = run([str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE"], wide)
    lines = result.stdout.splitlines()
    summary = next((line.strip("= ") for line in reversed(lines) if re.search(r"\d+ (passed|failed)", line)), "")
    causes: dict[str, list[str]] = {}
    for line in lines:
        if line.startswith(("FAILED ", "ERROR ")):
            test, _, error = line.split(" ", 1)[1].partition(" - ")
            causes.setdefault(error.strip() or "(no message)", []).append(test)
    broken = [
        f"{len(tests)} x {error[:200]}  (e.g. {', '.join(tests[:2])})"
        for error, tests in sorted(causes.items(), key=lambda item: -len(item[1]))
    ]
    if not summary:
        summary = f"pytest did not run: {(result.stderr or result.stdout).strip().splitlines()[-1:]}"
    return summary, broken


def run_methods(venv: Path, env: dict[str, str], folder: Path) -> list[tuple[str, str]]:
    """Train and re-score the quickstart per method through the CLI: (method, 'ok ...' or what broke).

    A run that trains but learns less than with the locked versions is broken too: a changed default can do that
    without any error.
    """
    peftune = str(venv / "bin" / "peftune")
    results = []
    for name, overrides, locked in RUNS:
        output, scores = folder / name, folder / f"{name}-eval.json"
        started = time.perf_counter()
        trained = run([peftune, "--quiet", "train", "quickstart", *overrides, "--output-dir", str(output)], env)
        if trained.returncode == 0:
            trained = run([peftune, "--quiet", "eval", str(output), "--output", str(scores)], env)
        if trained.returncode:
            results.append((name, "BROKEN: " + _first_error(trained)))
            continue
        accuracy = json.loads(scores.read_text())["metrics"]["accuracy"]
        seconds = time.perf_counter() - started
        if accuracy < locked - SHORTFALL:
            results.append((name, f"BROKEN: accuracy {accuracy:.4f}, the locked versions reach {locked:.4f}"))
        else:
            results.append((name, f"ok (accuracy {accuracy:.4f}; locked versions {locked:.4f}; {seconds:.0f} s)"))
    return results


def _first_error(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"(error: |\w+(Error|Exception)\b)", line.strip())]
    return (errors or lines or ["no output"])[-1].strip()[:300]


def write_lock(venv: Path) -> None:
    frozen = run([str(venv / "bin" / "python"), "-m", "pip", "freeze", "--exclude-editable"]).stdout.splitlines()
    keep = [
        re.sub(r"^(torch==[^+]+)\+.*$", r"\1", line)
        for line in frozen
        if line and not line.startswith(("#", "-e", "nvidia-", "triton", "cuda-"))
    ]
    header = [line for line in LOCK.read_text().splitlines() if line.startswith("#")] if LOCK.is_file() else []
    LOCK.write_text("\n".join([*header, *sorted(keep, key=str.lower)]) + "\n")
    print(f"wrote {LOCK} ({len(keep)} pins); make the README's `pip install torch==...` match its torch line")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--oldest", action="store_true", help="each dependency at the lowest version allowed")
    parser.add_argument("--torch", default="torch", help="the torch requirement to install first (default: newest)")
    parser.add_argument("--venv", type=Path, help="environment folder, built afresh (default: a temporary one)")
    parser.add_argument("--write-lock", action="store_true", help="write constraints.txt when nothing broke")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="peftune-releases-"))
    venv = args.venv or scratch / "venv"
    mode = "oldest allowed" if args.oldest else "newest"
    print(f"building {venv} with the {mode} releases (no lock) ...", flush=True)
    failure = install(venv, args.torch, args.oldest)
    if failure:
        errors = [line for line in failure.splitlines() if not line.startswith(("WARNING", "Location"))]
        print("BROKEN: the install failed:\n" + "\n".join(errors[-20:]))
        return 1
    installed = versions(venv)
    print("installed: " + ", ".join(f"{k} {v}" for k, v in installed.items()), flush=True)

    env = {**os.environ, **OFFLINE, "HF_DATASETS_CACHE": str(scratch / "datasets")}
    env.pop("PEFTUNE_DATA_DIR", None)  # the fast suite only: what a user's fresh clone has
    print("running the fast tests ...", flush=True)
    summary, broken_tests = run_tests(venv, env)
    print("training a tiny run per method ...", flush=True)
    methods = run_methods(venv, env, scratch / "runs")

    print(f"\n== {mode} releases: " + ", ".join(f"{k} {v}" for k, v in installed.items()))
    print(f"tests: {summary}")
    for line in broken_tests:
        print(f"  BROKEN: {line}")
    for name, outcome in methods:
        print(f"method {name}: {outcome}")
    broke = bool(broken_tests) or "failed" in summary or "did not run" in summary
    broke = broke or any(outcome.startswith("BROKEN") for _, outcome in methods)
    print("\nnothing broke" if not broke else "\nsomething broke: see the BROKEN lines")
    if args.write_lock and not broke:
        write_lock(venv)
    return 1 if broke else 0


if __name__ == "__main__":
    sys.exit(main())
