"""`train` end to end on tiny models: the run folder contract that every later command relies on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny
import torch
import yaml

from peftune import pooling
from peftune.errors import PeftuneError
from peftune.methods import METHODS
from peftune.predict import predict_texts
from peftune.recipe import load_recipe
from peftune.rundir import complete_run
from peftune.train import train


def eval_loss_and_accuracy(model, tokenizer, texts: list[str], targets: list) -> tuple[float, float]:
    """Mean cross-entropy (or MSE) and accuracy of a reloaded model on the eval texts, in one batch."""
    model.eval()
    batch = tokenizer(texts, truncation=True, max_length=32, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    if logits.shape[-1] == 1:
        target = torch.tensor(targets, dtype=torch.float32)
        return torch.nn.functional.mse_loss(logits.squeeze(-1), target).item(), float("nan")
    target = torch.tensor(targets)
    loss = torch.nn.functional.cross_entropy(logits, target).item()
    return loss, (logits.argmax(-1) == target).float().mean().item()


def eval_rows(path: Path) -> tuple[list[str], list[str]]:
    import csv

    with open(path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [r["label"] for r in rows]


def run_recipe(tmp_path: Path, model_dir: Path, reviews, *overrides: str, **extra) -> Path:
    recipe_file = tiny.write_recipe(tmp_path / "recipe.yaml", model_dir, *reviews, **extra)
    run = train(load_recipe(str(recipe_file), overrides), output_dir=tmp_path / "run", overrides=overrides)
    return run.path


def test_lora_run_folder_reloads_to_the_same_model(tmp_path, tiny_bert, reviews):
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    run = run_recipe(tmp_path, tiny_bert, reviews, "train.num_train_epochs=2", "seed=3")

    assert {p.name for p in run.iterdir()} >= {"recipe.yaml", "labels.json", "metrics.json", "adapter", "checkpoints"}
    adapter = run / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "tokenizer_config.json").is_file()
    assert not list(adapter.glob("*.bin")), "weights are safetensors"
    assert list((run / "checkpoints").glob("checkpoint-*"))

    resolved = load_recipe(str(run / "recipe.yaml"))
    given = load_recipe(str(tmp_path / "recipe.yaml"), ["train.num_train_epochs=2", "seed=3"])
    assert resolved.output_dir == str(run), "the folder the run used"
    assert resolved.model_copy(update={"output_dir": None}) == pooling.resolved(given)
    assert given.model.pooling is None and resolved.model.pooling == "cls", "the checkpoint's pooling, written out"
    assert resolved.lora["r"] == METHODS["lora"].defaults["r"], "the defaults are written out"

    labels = json.loads((run / "labels.json").read_text())
    assert labels["id2label"] == {"0": "negative", "1": "positive"}

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["method"] == "lora" and metrics["primary_metric"]["name"] == "accuracy"
    assert 0 < metrics["trainable_parameters"] < metrics["total_parameters"]
    assert metrics["trainable_share"] == pytest.approx(metrics["trainable_parameters"] / metrics["total_parameters"])
    assert [e["epoch"] for e in metrics["eval_history"]] == [1.0, 2.0]
    assert metrics["learning_rate"] == pytest.approx(METHODS["lora"].defaults["learning_rate"])
    assert metrics["global_steps"] == 16 and metrics["train_samples"] == 64 and metrics["eval_samples"] == 32
    assert metrics["overrides"] == ["train.num_train_epochs=2", "seed=3"]
    assert {"torch", "transformers", "peft", "python"} <= set(metrics["versions"])
    assert metrics["peak_memory_mb"] > 0 and metrics["train_runtime_s"] > 0
    # Throughput counts the training steps: the two evaluations during training are left out of it.
    stepping = metrics["train_runtime_s"] - metrics["eval_during_training_s"]
    assert 0 < metrics["eval_during_training_s"] < metrics["train_runtime_s"]
    assert metrics["train_samples_per_second"] == pytest.approx(64 * 2 / stepping, rel=0.01)
    assert metrics["fresh_modules"] == ["classifier"]

    # The adapter folder loads with stock peft, no arguments, and is the model that was evaluated.
    model = AutoPeftModelForSequenceClassification.from_pretrained(adapter)
    texts, names = eval_rows(reviews[1])
    loss, accuracy = eval_loss_and_accuracy(
        model, AutoTokenizer.from_pretrained(adapter), texts, [labels["label2id"][n] for n in names]
    )
    assert loss == pytest.approx(metrics["eval"]["loss"], abs=1e-5)
    assert accuracy == pytest.approx(metrics["eval"]["accuracy"])


def test_full_run_is_a_standalone_model_with_its_labels(tmp_path, tiny_bert, reviews):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    run = run_recipe(tmp_path, tiny_bert, reviews, "method=full")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["trainable_parameters"] == metrics["total_parameters"]
    assert metrics["learning_rate"] == pytest.approx(5e-5), "full fine-tuning gets its own default rate"
    assert not (run / "adapter").exists()

    model = AutoModelForSequenceClassification.from_pretrained(run / "model")
    assert model.config.id2label == {0: "negative", 1: "positive"}
    texts, names = eval_rows(reviews[1])
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    loss, accuracy = eval_loss_and_accuracy(model, tokenizer, texts, [model.config.label2id[n] for n in names])
    assert loss == pytest.approx(metrics["eval"]["loss"], abs=1e-5)
    assert accuracy == pytest.approx(metrics["eval"]["accuracy"])
    predictions = pipeline("text-classification", model=str(run / "model"))(texts[:4])
    assert {p["label"] for p in predictions} <= {"negative", "positive"}


def test_multiclass_pairs_on_roberta(tmp_path, tiny_models):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = tiny.corpus()[:60]
    rows = [
        {"premise": t, "hypothesis": texts[(i + 1) % 60], "label": ["a", "b", "c"][i % 3]} for i, t in enumerate(texts)
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:45]))
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[45:]))
    base = tiny_models("roberta")
    recipe_file = tiny.write_recipe(
        tmp_path / "r.yaml", base, tmp_path / "train.jsonl", tmp_path / "dev.jsonl",
        data__text_columns=["premise", "hypothesis"], data__labels=["c", "b", "a"],
    )  # fmt: skip
    run = train(load_recipe(str(recipe_file)), output_dir=tmp_path / "run").path
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_labels"] == 3
    assert metrics["fresh_modules"] == ["classifier"], "RoBERTa's head is two layers, trained as one module"

    labels = json.loads((run / "labels.json").read_text())
    assert labels["id2label"] == {"0": "c", "1": "b", "2": "a"}
    head = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=3, id2label={0: "c", 1: "b", 2: "a"}, label2id={"c": 0, "b": 1, "a": 2}
    )
    model = PeftModel.from_pretrained(head, run / "adapter")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
    batch = tokenizer(
        [r["premise"] for r in rows[45:]], [r["hypothesis"] for r in rows[45:]],
        truncation=True, max_length=32, padding=True, return_tensors="pt",
    )  # fmt: skip
    with torch.no_grad():
        logits = model(**batch).logits
    target = torch.tensor([labels["label2id"][r["label"]] for r in rows[45:]])
    assert torch.nn.functional.cross_entropy(logits, target).item() == pytest.approx(metrics["eval"]["loss"], abs=1e-5)
    # Three classes: f1 is the macro average over them, computed on the reloaded model's predictions.
    from sklearn.metrics import f1_score

    f1 = f1_score(target.numpy(), logits.argmax(-1).numpy(), average="macro")
    assert f1 == pytest.approx(metrics["eval"]["f1"], abs=1e-6)


def test_regression_run(tmp_path, tiny_bert):
    rows = [{"text": t, "score": (i % 11) / 2} for i, t in enumerate(tiny.corpus()[:48])]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:32]))
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[32:]))
    recipe_file = tiny.write_recipe(
        tmp_path / "r.yaml", tiny_bert, tmp_path / "train.jsonl", tmp_path / "dev.jsonl", data__label_column="score"
    )
    run = train(load_recipe(str(recipe_file)), output_dir=tmp_path / "run").path
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["problem_type"] == "regression" and metrics["num_labels"] == 1
    assert metrics["primary_metric"]["name"] == "pearson"
    # The recorded correlations are those of the reloaded model's scores on the dev rows.
    from scipy.stats import pearsonr, spearmanr

    scores = [p["score"] for p in predict_texts(run, [r["text"] for r in rows[32:]])]
    truth = [r["score"] for r in rows[32:]]
    assert pearsonr(scores, truth)[0] == pytest.approx(metrics["eval"]["pearson"], abs=1e-4)
    assert spearmanr(scores, truth)[0] == pytest.approx(metrics["eval"]["spearmanr"], abs=1e-4)


def test_a_failed_run_never_looks_complete(tmp_path, tiny_bert, reviews, monkeypatch):
    from transformers import Trainer

    def crash(self, *args, **kwargs):
        raise RuntimeError("simulated crash mid-training")

    monkeypatch.setattr(Trainer, "train", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_recipe(tmp_path, tiny_bert, reviews)
    run = tmp_path / "run"
    assert (run / "recipe.yaml").is_file() and not (run / "metrics.json").exists()
    with pytest.raises(PeftuneError, match="incomplete run"):
        complete_run(run)


def test_a_complete_run_is_not_overwritten(tmp_path, tiny_bert, reviews):
    run = run_recipe(tmp_path, tiny_bert, reviews)
    before = (run / "metrics.json").read_text()
    with pytest.raises(PeftuneError, match="already holds a complete run; pass --overwrite"):
        run_recipe(tmp_path, tiny_bert, reviews)
    assert (run / "metrics.json").read_text() == before
    recipe = load_recipe(str(tmp_path / "recipe.yaml"), ["seed=5"])
    train(recipe, output_dir=run, overwrite=True)
    assert yaml.safe_load((run / "recipe.yaml").read_text())["seed"] == 5


def test_bad_input_stops_before_anything_is_written(tmp_path, tiny_bert, reviews):
    recipe_file = tiny.write_recipe(tmp_path / "r.yaml", tiny_bert, *reviews, data__text_columns=["sentence"])
    with pytest.raises(PeftuneError, match="has no column 'sentence'"):
        train(load_recipe(str(recipe_file)), output_dir=tmp_path / "run")
    with pytest.raises(PeftuneError, match=r"model folder .*nothing-here not found; check model\.name_or_path"):
        train(load_recipe(str(recipe_file), ["model.name_or_path=" + str(tmp_path / "nothing-here")]), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_token_budget_batches_train_every_text_within_the_budget(tmp_path, tiny_bert, reviews):
    """`train.batch_tokens`: each training step holds at most that many tokens, padding included, however many
    texts that is; every text once per epoch; the run reloads to the model that was evaluated."""
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer, TrainerCallback

    seen: list[tuple[int, int]] = []

    class Shapes(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            def record(module, passed, named):
                if module.training:
                    seen.append(tuple(named["input_ids"].shape))

            model.register_forward_pre_hook(record, with_kwargs=True)

    recipe_file = tiny.write_recipe(tmp_path / "recipe.yaml", tiny_bert, *reviews)
    overrides = ["train.batch_tokens=96", "train.num_train_epochs=2"]
    run = train(load_recipe(str(recipe_file), overrides), output_dir=tmp_path / "run", callbacks=[Shapes()]).path
    metrics = json.loads((run / "metrics.json").read_text())
    assert seen and max(rows * length for rows, length in seen) <= 96
    assert len({rows for rows, _ in seen}) > 1, "the count of texts follows their length"
    assert sum(rows for rows, _ in seen) == 64 * 2 and len(seen) == metrics["global_steps"] != 16
    assert metrics["train_samples"] == 64 and metrics["batch_tokens"] == 96

    model = AutoPeftModelForSequenceClassification.from_pretrained(run / "adapter")
    labels = json.loads((run / "labels.json").read_text())
    texts, names = eval_rows(reviews[1])
    loss, accuracy = eval_loss_and_accuracy(
        model, AutoTokenizer.from_pretrained(run / "adapter"), texts, [labels["label2id"][n] for n in names]
    )
    assert loss == pytest.approx(metrics["eval"]["loss"], abs=1e-5)
    assert accuracy == pytest.approx(metrics["eval"]["accuracy"])


def test_an_auto_token_budget_is_resolved_from_the_data_and_recorded(tmp_path, tiny_bert, reviews):
    from peftune.train import prepare_data

    recipe = load_recipe(str(tiny.write_recipe(tmp_path / "recipe.yaml", tiny_bert, *reviews)),
                         ["train.batch_tokens=auto"])  # fmt: skip
    lengths = prepare_data(recipe).train_lengths
    expected = max(32, -(-8 * sum(lengths) // len(lengths)))  # batch 8 x the mean length, rounded up
    metrics = train(recipe, output_dir=tmp_path / "run").read_metrics()
    assert metrics.batch_tokens == expected
    card = (tmp_path / "run" / "adapter" / "README.md").read_text()
    assert f"optimizer steps (batches of up to {expected:,} tokens)" in card
    assert 8 <= metrics.global_steps <= 10, "about the steps of batches of 8 (64 reviews)"
    plain = train(load_recipe(str(tmp_path / "recipe.yaml")), output_dir=tmp_path / "plain").read_metrics()
    assert plain.batch_tokens is None


def test_a_method_trains_its_own_epochs(tmp_path, tiny_bert, reviews):
    """`prefix.num_train_epochs=2` over a one-epoch recipe: prefix tuning trains two epochs; LoRA keeps one."""
    recipe_file = str(tiny.write_recipe(tmp_path / "recipe.yaml", tiny_bert, *reviews))
    prefix = train(load_recipe(recipe_file, ["method=prefix", "prefix.num_train_epochs=2"]),
                   output_dir=tmp_path / "prefix").read_metrics()  # fmt: skip
    assert prefix.global_steps == 16 and [e["epoch"] for e in prefix.eval_history] == [1.0, 2.0]
    lora = train(load_recipe(recipe_file, ["prefix.num_train_epochs=2"]), output_dir=tmp_path / "lora").read_metrics()
    assert lora.global_steps == 8
