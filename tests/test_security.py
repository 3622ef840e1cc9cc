"""Security: weights load from safetensors only unless the recipe allows pickle, no remote code unless the recipe
trusts it, and commands write only where they are told to."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import tiny
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from peftune.cli import main
from peftune.errors import PeftuneError
from peftune.recipe import load_recipe
from peftune.train import train


def pickled_copy(model_dir: Path, dest: Path) -> Path:
    """The same checkpoint with its weights in a pickle file (pytorch_model.bin) instead of safetensors."""
    dest.mkdir()
    for item in model_dir.iterdir():
        if item.name != "model.safetensors":
            (dest / item.name).write_bytes(item.read_bytes())
    torch.save(load_file(model_dir / "model.safetensors"), dest / "pytorch_model.bin")
    return dest


def files_under(*folders: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for folder in folders for p in folder.rglob("*") if p.is_file()}


def test_pickle_weights_are_refused_unless_the_recipe_allows_them(tiny_bert, reviews, tmp_path):
    pickled = pickled_copy(tiny_bert, tmp_path / "pickled")
    recipe = str(tiny.write_recipe(tmp_path / "r.yaml", pickled, *reviews))
    with pytest.raises(PeftuneError, match=r"no safetensors weights; pickle weight files \(\.bin\) can run code"):
        train(load_recipe(recipe), output_dir=tmp_path / "refused")
    assert not (tmp_path / "refused" / "metrics.json").exists()

    run = train(load_recipe(recipe, ["model.allow_pickle=true"]), output_dir=tmp_path / "allowed")
    assert run.read_metrics().eval_samples == 32

    # A model folder given to predict is read from safetensors only, too.
    merged = pickled_copy(tiny_bert, tmp_path / "folder")
    result = CliRunner().invoke(main, ["predict", str(merged), "--text", "fine"])
    assert result.exit_code == 2 and "safetensors weights only" in result.stderr


def test_remote_code_never_runs_unless_the_recipe_trusts_it(reviews, tmp_path):
    model = tmp_path / "custom"
    model.mkdir()
    marker = tmp_path / "code-ran"
    (model / "configuration_custom.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PretrainedConfig\n"
        "class CustomConfig(PretrainedConfig):\n    model_type = 'custom-x'\n"
    )
    auto_map = {"AutoConfig": "configuration_custom.CustomConfig"}
    (model / "config.json").write_text(json.dumps({"model_type": "custom-x", "auto_map": auto_map}))
    recipe = str(tiny.write_recipe(tmp_path / "r.yaml", model, *reviews))
    for command in (["validate", recipe], ["train", recipe, "--output-dir", str(tmp_path / "run")]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 2 and "cannot load the config" in result.stderr, result.output
        assert "trust_remote_code" in result.stderr
    assert not marker.exists(), "the repository's code was not imported"
    assert load_recipe(recipe).model.trust_remote_code is False


def test_export_merge_and_copy_write_only_where_they_are_told(runs, tmp_path):
    before = files_under(runs["full"], runs["lora"], tmp_path)
    commands = [
        (["export", str(runs["full"]), "--format", "safetensors", "--output", str(tmp_path / "exported")], "exported"),
        (["merge", str(runs["lora"]), "--output", str(tmp_path / "merged")], "merged"),
        (["copy", "quickstart", str(tmp_path / "recipes" / "mine.yaml")], "recipes"),
    ]
    for command, dest in commands:
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 0, result.output
        after = files_under(runs["full"], runs["lora"], tmp_path)
        changed = {path for path, stamp in after.items() if before.get(path) != stamp}
        assert changed and all(Path(p).is_relative_to(tmp_path / dest) for p in changed), sorted(changed)
        before = after
    assert os.listdir(tmp_path / "recipes") == ["mine.yaml"]
