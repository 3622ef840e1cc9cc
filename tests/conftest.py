"""Shared fixtures: offline Hugging Face settings, tiny models, small data sets."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before any Hugging Face library is imported: nothing may reach the Hub, and the datasets cache of the
# test session is its own.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="peftune-datasets-"))
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest
import tiny
from hubserver import TOKEN, FakeHub

SHARED_DATA = Path(os.environ.get("PEFTUNE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
DATA_SKIP = "needs the real GLUE/IMDb files"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Why tests were skipped, one line per reason, without -rs: most often the real data is not beside the
    checkout."""
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        key = DATA_SKIP if DATA_SKIP in reason else reason
        reasons[key] = reasons.get(key, 0) + 1
    for reason, count in reasons.items():
        tests = f"{count} test{'s' if count > 1 else ''}"
        if reason == DATA_SKIP:
            terminalreporter.write_line(
                f"skipped {tests} that need the real GLUE/IMDb files, not found in {SHARED_DATA}: "
                "put ../shared/data beside the checkout or set PEFTUNE_DATA_DIR to the folder that holds them"
            )
        else:
            terminalreporter.write_line(f"skipped {tests}: {reason}")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory):
    """A function that returns the folder of a tiny random model of an architecture, built once a session."""
    built: dict[str, Path] = {}

    def get(architecture: str) -> Path:
        if architecture not in built:
            folder = tmp_path_factory.mktemp(f"tiny-{architecture}")
            built[architecture] = tiny.save_tiny_model(architecture, folder)
        return built[architecture]

    return get


@pytest.fixture(scope="session")
def tiny_bert(tiny_models) -> Path:
    return tiny_models("bert")


@pytest.fixture(scope="session")
def reviews(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """64 training and 32 validation reviews (string labels negative/positive) as CSV files."""
    folder = tmp_path_factory.mktemp("reviews")
    return tiny.write_reviews(folder / "train.csv", 64), tiny.write_reviews(folder / "validation.csv", 32, start=64)


@pytest.fixture(scope="session")
def runs(tmp_path_factory, tiny_models, reviews):
    """Trained tiny runs, one per kind, made once for the session."""
    folder = tmp_path_factory.mktemp("runs")
    recipe_file = tiny.write_recipe(folder / "recipe.yaml", tiny_models("bert"), *reviews)
    from peftune.recipe import load_recipe
    from peftune.train import train

    made = {}
    for name, overrides in {
        "lora": ["train.num_train_epochs=2"],
        "full": ["method=full"],
        "prefix": ["method=prefix"],
        # Every linear layer adapted, at a high rate: deltas large enough that merging into int8 re-quantizes visibly.
        "lora8": [
            "model.quantization=8bit",
            "train.num_train_epochs=3",
            "lora.learning_rate=3e-2",
            "lora.target_modules=all-linear",
        ],
    }.items():
        made[name] = train(load_recipe(str(recipe_file), overrides), output_dir=folder / name).path
    return made


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test inside its own temporary folder (runs/ and copies land there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def shared_data():
    """A function giving a task's folder of ../shared/data, skipping the test where it is absent."""

    def get(task: str) -> Path:
        folder = SHARED_DATA / task
        if not folder.is_dir():
            pytest.skip(f"{DATA_SKIP}: {folder} not present (real data lives beside the checkout, never in it)")
        return folder

    return get


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A stand-in Hub server on 127.0.0.1 that the real huggingface_hub client talks to, with a token set."""
    from huggingface_hub import constants

    with FakeHub(TOKEN) as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        template = server.url + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield server
