"""Pushing runs to the Hub: the real huggingface_hub client against a stand-in server on 127.0.0.1."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner
from hubserver import TOKEN
from huggingface_hub import ModelCard

from peftune.cli import main
from peftune.evaluation import evaluate
from peftune.merge import merge_adapter
from peftune.predict import predict_texts
from peftune.push import push

TEXTS = ["The screen is gorgeous and the battery never quits.", "Cold food, rude staff, never again."]


def push_cli(*args: str):
    return CliRunner().invoke(main, ["push", *args])


def card_of(text: str) -> ModelCard:
    return ModelCard(text)


def test_adapter_push_uploads_the_staged_folder_byte_for_byte(hub, runs, tmp_path):
    staged = push(runs["lora"], "tester/tiny-lora", dry_run=True, output=tmp_path / "staged",
                  base_model_id="tester/tiny-bert", license="apache-2.0", echo=lambda _: None).folder  # fmt: skip
    assert hub.requests == [], "a dry run sends nothing"
    result = push(runs["lora"], "tester/tiny-lora", base_model_id="tester/tiny-bert", license="apache-2.0",
                  echo=lambda _: None)  # fmt: skip
    assert result.url.startswith(f"{hub.url}/tester/tiny-lora/commit/")

    received = hub.files("tester/tiny-lora")
    local = {str(f.relative_to(staged)): f.read_bytes() for f in staged.rglob("*") if f.is_file()}
    assert received == local
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "labels.json", "recipe.yaml",
            "metrics.json", "eval_samples.jsonl", "README.md"} <= set(received)  # fmt: skip
    for name in ("adapter_model.safetensors", "tokenizer.json"):
        assert received[name] == (runs["lora"] / "adapter" / name).read_bytes()
    for name in ("labels.json", "recipe.yaml", "metrics.json"):
        assert received[name] == (runs["lora"] / name).read_bytes()
    assert json.loads(received["adapter_config.json"])["base_model_name_or_path"] == "tester/tiny-bert"
    assert hub.repos["tester/tiny-lora"].private, "private by default"

    card = card_of(received["README.md"].decode())
    metrics = json.loads(received["metrics.json"])
    assert card.data.library_name == "peft" and card.data.base_model == "tester/tiny-bert"
    assert card.data.pipeline_tag == "text-classification" and card.data.license == "apache-2.0"
    assert {"peftune", "lora"} <= set(card.data.tags)
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results["accuracy"] == metrics["eval"]["accuracy"] and results["f1"] == metrics["eval"]["f1"]
    assert "AutoPeftModelForSequenceClassification" in card.text and "`negative`, `positive`" in card.text
    # The card's code maps label names to integer ids, as transformers' configs need.
    import ast

    line = next(line for line in card.text.splitlines() if line.startswith("id2label = "))
    id2label = ast.literal_eval(line.removeprefix("id2label = "))
    assert id2label == {0: "negative", 1: "positive"} and {v: k for k, v in id2label.items()}["positive"] == 1
    saved = json.loads(received["adapter_config.json"])["modules_to_save"]
    assert len(saved) == len(set(saved)), "each module named once"


def test_merged_push_public_on_a_branch(hub, runs, tmp_path):
    import shutil

    run = shutil.copytree(runs["lora"], tmp_path / "run", ignore=shutil.ignore_patterns("merged"))
    dry = push_cli(
        str(run), "--repo-id", "tester/tiny-merged", "--merged", "--dry-run", "--output", str(tmp_path / "d")
    )
    assert dry.exit_code == 0 and not (run / "merged").exists(), "a dry run writes nothing into the run folder"
    result = push_cli(str(run), "--repo-id", "tester/tiny-merged", "--merged", "--public",
                      "--revision", "v1", "--base-model-id", "tester/tiny-bert")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert not (run / "merged").exists(), "pushing a merge leaves the run folder as it was"
    repo = hub.repos["tester/tiny-merged"]
    assert not repo.private and repo.branches["main"] == {}
    received = repo.branches["v1"]
    merged = merge_adapter(run, output=tmp_path / "merged")
    assert received["model.safetensors"] == (merged / "model.safetensors").read_bytes()
    assert received["model.safetensors"] == (tmp_path / "d" / "model.safetensors").read_bytes()
    assert json.loads(received["config.json"])["id2label"] == {"0": "negative", "1": "positive"}
    card = card_of(received["README.md"].decode())
    assert card.data.library_name == "transformers" and card.data.base_model == "tester/tiny-bert"
    assert 'pipeline("text-classification", model="tester/tiny-merged")' in card.text
    assert "model.safetensors" in result.stdout


def test_a_pushed_adapter_is_a_target_for_predict_eval_and_merge(hub, runs, in_tmp):
    push(runs["lora"], "tester/shared", base_model_id="tester/tiny-bert", echo=lambda _: None)
    assert predict_texts("tester/shared", TEXTS) == predict_texts(runs["lora"], TEXTS)
    assert evaluate("tester/shared")["metrics"]["accuracy"] == evaluate(runs["lora"])["metrics"]["accuracy"]
    merged = merge_adapter("tester/shared")
    assert merged == Path("shared-merged") and (in_tmp / "shared-merged" / "model.safetensors").is_file()
    labels = [p["label"] for p in predict_texts(runs["lora"], TEXTS)]
    assert [p["label"] for p in predict_texts(merged, TEXTS)] == labels


def test_exporting_a_pushed_adapter_writes_a_standalone_model(hub, runs, in_tmp):
    from transformers import pipeline

    from peftune.export import export_model

    push(runs["lora"], "tester/to-export", base_model_id="tester/tiny-bert", echo=lambda _: None)
    folder, record = export_model("tester/to-export", "safetensors")
    assert folder == Path("to-export-export-safetensors") and (in_tmp / folder / "model.safetensors").is_file()
    assert not list((in_tmp / folder).glob("adapter_*")), "a standalone model, not the adapter again"
    assert record.merge_check is not None and record.merge_check.passed and (in_tmp / folder / "recipe.yaml").is_file()
    labels = [p["label"] for p in predict_texts(runs["lora"], TEXTS)]
    assert [p["label"] for p in pipeline("text-classification", model=str(in_tmp / folder))(TEXTS)] == labels


def test_the_token_never_appears_in_output_or_files(hub, runs, tmp_path, caplog):
    caplog.set_level("DEBUG")
    real = push_cli(str(runs["full"]), "--repo-id", "tester/full-model")
    dry = push_cli(str(runs["full"]), "--repo-id", "tester/full-model", "--dry-run", "--output", str(tmp_path / "d"))
    assert real.exit_code == 0 and dry.exit_code == 0, real.output + dry.output
    assert any(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in hub.requests), "the token was used"
    texts = [real.stdout, real.stderr, dry.stdout, dry.stderr, caplog.text]
    texts += [content.decode("utf-8", "replace") for content in hub.files("tester/full-model").values()]
    for folder in (tmp_path / "d", runs["full"]):
        texts += [f.read_bytes().decode("utf-8", "replace") for f in folder.rglob("*") if f.is_file()]
    assert not [text for text in texts if TOKEN in text]
    assert not [r for r in hub.requests if TOKEN.encode() in r["body"]]


def test_dry_run_lists_the_folder_and_warns_about_a_local_base(hub, runs, tmp_path):
    result = push_cli(str(runs["prefix"]), "--repo-id", "tester/p", "--dry-run", "--output", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert hub.requests == []
    listed = {line.split()[-1]: int(line.split()[0].replace(",", "")) for line in result.stdout.splitlines()[:-1]}
    on_disk = {f.name: f.stat().st_size for f in (tmp_path / "out").iterdir()}
    assert listed == on_disk
    assert "warning: the base model was loaded from" in result.stderr
    card = card_of((tmp_path / "out" / "README.md").read_text())
    assert card.data.base_model is None and card.data.library_name == "peft"
    assert "up to transformers 5.23 only" in card.text, "the card says where stock peft runs a prefix adapter"
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        ("no_token", [], "no Hugging Face token: set HF_TOKEN or run `hf auth login`"),
        ("bad_token", [], "the Hub rejected the token (HF_TOKEN or the stored login)"),
        ("", ["--repo-id", "no-namespace"], "'no-namespace' needs a namespace: write it as NAMESPACE/NAME"),
        ("", ["--repo-id", "bad id/x"], "--repo-id 'bad id/x' is not a valid repository id"),
        ("unreachable", [], "cannot reach the Hub at http://127.0.0.1:"),
        ("offline", [], "HF_HUB_OFFLINE is set, so nothing can be pushed"),
    ],
)
def test_push_errors_are_one_line(hub, runs, monkeypatch, setup, args, message):
    from huggingface_hub import constants

    if setup == "no_token":
        monkeypatch.delenv("HF_TOKEN")
    elif setup == "bad_token":
        monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    elif setup == "unreachable":
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
        monkeypatch.delenv("HF_ENDPOINT")
    elif setup == "offline":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = push_cli(str(runs["lora"]), *(args or ["--repo-id", "tester/x"]))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert "Traceback" not in result.output and TOKEN not in result.output
    assert all(not repo.commits for repo in hub.repos.values())
