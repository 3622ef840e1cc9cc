"""Every method on every architecture it supports: train, save, reload, same logits; clear refusals."""

from __future__ import annotations

import json
import re
import sys

import pytest
import tiny
from trained import Recorder, reloaded_logits, train_tiny

from peftune.errors import PeftuneError
from peftune.inference import load_target
from peftune.modeling import check_model, load_config
from peftune.recipe import load_recipe

SUPPORTED = [(arch, method) for arch in tiny.ARCHITECTURES for method in ("full", "lora", "prefix", "prompt", "ia3")]


@pytest.mark.parametrize(("arch", "method"), SUPPORTED)
def test_reload_gives_the_same_logits(tmp_path, tiny_models, reviews, arch, method):
    run, recorder = train_tiny(tmp_path, tiny_models(arch), reviews, f"method={method}")
    assert recorder.moved, "training changed the trainable weights"
    if method != "full":
        assert recorder.moved >= {n for n in recorder.start if "modules_to_save" in n}, "the head is trained"
    difference = (reloaded_logits(run) - recorder.logits).abs().max().item()
    assert difference < 1e-5


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_lora_on_an_8bit_base(tmp_path, tiny_models, reviews, arch):
    import bitsandbytes as bnb

    run, recorder = train_tiny(tmp_path, tiny_models(arch), reviews, "model.quantization=8bit")
    metrics = run.read_metrics()
    assert metrics.quantization == "8bit"
    model = load_target(run.path).model
    int8 = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert int8, "the base's linear layers are int8"
    assert not [n for n in int8 if "classifier" in n], "the head stays in full precision"
    # Reloading re-quantizes the same fp32 checkpoint, so the int8 weights and the logits come back exactly;
    # the tolerance allows for int8 matmul kernels that are not bit-reproducible across calls.
    difference = (reloaded_logits(run) - recorder.logits).abs().max().item()
    assert difference < 1e-4
    (tmp_path / "fp32").mkdir()
    fp32, _ = train_tiny(tmp_path / "fp32", tiny_models(arch), reviews)
    assert metrics.model_memory_mb < fp32.read_metrics().model_memory_mb


def test_8bit_with_gradient_checkpointing(tmp_path, tiny_bert, reviews):
    run, recorder = train_tiny(
        tmp_path, tiny_bert, reviews, "model.quantization=8bit", "train.gradient_checkpointing=true"
    )
    assert recorder.moved and run.is_complete()


def test_new_modules_are_trained_and_saved(tmp_path, tiny_models, reviews):
    run, _ = train_tiny(tmp_path, tiny_models("deberta-v2"), reviews)
    assert run.read_metrics().fresh_modules == ["classifier", "pooler"]
    config = json.loads((run.adapter_dir / "adapter_config.json").read_text())
    assert {"classifier", "pooler"} <= set(config["modules_to_save"])
    (tmp_path / "d").mkdir()
    run, _ = train_tiny(tmp_path / "d", tiny_models("distilbert"), reviews)
    assert run.read_metrics().fresh_modules == ["classifier", "pre_classifier"]


def lora_modules(run) -> set[str]:
    """The modules a run's reloaded model carries LoRA adapters on."""
    return {n.split(".lora_A")[0] for n, _ in load_target(run.path).model.named_parameters() if ".lora_A." in n}


def test_all_linear_leaves_the_new_modules_to_full_training(tmp_path, tiny_models, reviews):
    from peft import PeftModel

    run, _ = train_tiny(tmp_path, tiny_models("roberta"), reviews, "lora.target_modules=all-linear")
    assert isinstance(load_target(run.path).model, PeftModel)
    lora = lora_modules(run)
    assert any(n.endswith("attention.self.query") for n in lora) and any(n.endswith("output.dense") for n in lora)
    assert not [n for n in lora if ".classifier." in n], "no LoRA inside RoBERTa's two-layer head"


@pytest.mark.parametrize(
    ("arch", "attention", "feed_forward"),
    [
        ("bert", ("attention.self.query", "attention.self.value"), "intermediate.dense"),
        ("distilbert", ("attention.q_lin", "attention.v_lin"), "ffn.lin1"),
        ("deberta-v2", ("attention.self.query_proj", "attention.self.value_proj"), "intermediate.dense"),
    ],
)
def test_lora_targets_default_per_architecture(tmp_path, tiny_models, reviews, arch, attention, feed_forward):
    """target_modules null: the architecture's query and value and each layer's feed-forward input (the
    layer widening the hidden size to the intermediate width), nothing else."""
    run, _ = train_tiny(tmp_path, tiny_models(arch), reviews)  # the default block: target_modules null
    adapted = lora_modules(run)
    layers = {re.search(r"\.(?:layer|layers)\.(\d+)\.", n).group(1) for n in adapted}  # type: ignore[union-attr]
    assert layers == {"0", "1"}, adapted
    for layer in layers:
        here = {n.split(f".{layer}.", 1)[1] for n in adapted if f".{layer}." in n}
        assert here == {*attention, feed_forward}, here


def test_layers_to_transform_applies_to_the_default_feed_forward_inputs(tmp_path, tiny_bert, reviews):
    """The default's feed-forward inputs are named in full, which peft adapts in every layer whatever
    `layers_to_transform` says: peftune keeps them to the layers asked for."""
    run, _ = train_tiny(tmp_path, tiny_bert, reviews, "lora.layers_to_transform=[1]")
    adapted = lora_modules(run)
    assert adapted and all(".layer.1." in n for n in adapted), adapted
    assert any(n.endswith("layer.1.intermediate.dense") for n in adapted), adapted


def test_prefix_with_projection(tmp_path, tiny_bert, reviews):
    run, recorder = train_tiny(tmp_path, tiny_bert, reviews, "method=prefix", "prefix.prefix_projection=true")
    assert any("prompt_encoder" in n and "transform" in n for n in recorder.moved)
    assert (reloaded_logits(run) - recorder.logits).abs().max().item() < 1e-5


def test_8bit_full_fine_tuning_is_refused(tmp_path, tiny_bert, reviews):
    recipe_file = tiny.write_recipe(tmp_path / "r.yaml", tiny_bert, *reviews)
    with pytest.raises(PeftuneError, match="8bit weights cannot be trained in full; use method=lora"):
        load_recipe(str(recipe_file), ["model.quantization=8bit", "method=full"])


def test_8bit_without_bitsandbytes_is_a_clear_error(tmp_path, tiny_bert, reviews, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now raises ImportError
    recipe = load_recipe(str(tiny.write_recipe(tmp_path / "r.yaml", tiny_bert, *reviews)), ["model.quantization=8bit"])
    with pytest.raises(PeftuneError, match=r"model\.quantization=8bit needs a working bitsandbytes"):
        check_model(recipe, load_config(recipe.model))


def test_a_model_without_a_classification_head_is_refused(tmp_path, reviews):
    from transformers import CLIPVisionConfig

    folder = tmp_path / "vision"
    CLIPVisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(
        folder
    )
    recipe = load_recipe(str(tiny.write_recipe(tmp_path / "r.yaml", folder, *reviews)))
    with pytest.raises(PeftuneError, match="has no sequence classification head"):
        check_model(recipe, load_config(recipe.model))


def test_loraplus_trains_the_b_matrices_faster_and_reloads(tmp_path, tiny_bert, reviews):
    from transformers import AutoTokenizer, TrainerCallback

    from peftune.train import train

    class Groups(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, model=None, **kwargs):
            names = {id(p): n for n, p in model.named_parameters()}
            self.lrs = {
                names[id(p)]: g["initial_lr"] for g in optimizer.param_groups for p in g["params"]
            }  # before warmup

    groups, recorder = Groups(), Recorder(AutoTokenizer.from_pretrained(tiny_bert))
    recipe_file = tiny.write_recipe(tmp_path / "recipe.yaml", tiny_bert, *reviews)
    overrides = ("data.max_train_samples=24", "train.eval_strategy=no", "train.save_strategy=no",
                 "lora.loraplus_lr_ratio=16", "lora.learning_rate=1e-3")  # fmt: skip
    run = train(load_recipe(str(recipe_file), overrides), output_dir=tmp_path / "run", callbacks=[groups, recorder])
    b = sorted({lr for name, lr in groups.lrs.items() if ".lora_B." in name})
    a = sorted({lr for name, lr in groups.lrs.items() if ".lora_A." in name})
    assert a == [pytest.approx(1e-3)] and b == [pytest.approx(16e-3)]
    assert "loraplus_lr_ratio" not in json.loads((run.adapter_dir / "adapter_config.json").read_text())
    assert (reloaded_logits(run) - recorder.logits).abs().max().item() < 1e-5


@pytest.mark.parametrize(("method", "pooler"), [("lora", True), ("prefix", False), ("ia3", False)])
def test_lora_trains_berts_pooler_with_the_head(tmp_path, tiny_bert, reviews, method, pooler):
    """LoRA trains the pooler in full (as other families' heads hold that layer); prefix tuning's rates would not."""
    run, recorder = train_tiny(tmp_path, tiny_bert, reviews, f"method={method}")
    saved = json.loads((run.adapter_dir / "adapter_config.json").read_text())["modules_to_save"]
    assert ("bert.pooler" in saved) is pooler
    assert any("pooler" in n and "modules_to_save" in n for n in recorder.moved) is pooler


# LoRA variants that pass through to peft's LoraConfig: (override, what adapter_config.json records).
VARIANTS = {
    "rslora": ("lora.use_rslora=true", {"use_rslora": True}),
    "dora": ("lora.use_dora=true", {"use_dora": True}),
    "pissa": ("lora.init_lora_weights=pissa", {"init_lora_weights": "pissa"}),
    "olora": ("lora.init_lora_weights=olora", {"init_lora_weights": "olora"}),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_lora_variants_train_reload_and_merge(tmp_path, tiny_bert, reviews, variant):
    """rsLoRA, DoRA and PiSSA/OLoRA initialisation: saved as such, reloaded and merged to the trained logits.

    PiSSA and OLoRA move the base's principal part into the adapter; peft recomputes that residual base from the
    original checkpoint on load (the decomposition is deterministic), so the adapter folder alone reproduces it.
    """
    import torch
    from trained import batch

    from peftune.merge import merge_adapter

    override, recorded = VARIANTS[variant]
    run, recorder = train_tiny(tmp_path, tiny_bert, reviews, override)
    config = json.loads((run.adapter_dir / "adapter_config.json").read_text())
    assert {key: config[key] for key in recorded} == recorded
    assert any(".lora_B." in n for n in recorder.moved)
    if variant == "dora":
        assert any("lora_magnitude_vector" in n for n in recorder.moved)
    assert (reloaded_logits(run) - recorder.logits).abs().max().item() < 1e-5
    merged = merge_adapter(run.path, output=tmp_path / "merged")
    assert json.loads((merged / "merge.json").read_text())["check"]["passed"]
    loaded = load_target(merged)
    with torch.no_grad():
        assert (loaded.model(**batch(loaded.tokenizer)).logits - recorder.logits).abs().max().item() < 1e-4


# A method added the way the README says: one entry in methods.METHODS. Run in a fresh interpreter, since the
# recipe schema takes its method blocks from the registry when peftune.recipe is first imported.
LOHA = """
import json, sys
from pathlib import Path

from peftune import methods

methods.METHODS["loha"] = methods.Method(
    name="loha",
    defaults={"learning_rate": 5e-3, "r": 4, "alpha": 8, "target_modules": ["query", "value"]},
    peft_config_class="LoHaConfig",
    mergeable=True,
    trains_pooler=True,
    counts=("r",),
    planned=("none",),
)
sys.path.insert(0, sys.argv[1])
from click.testing import CliRunner
from trained import reloaded_logits, train_tiny

from peftune.cli import main
from peftune.merge import merge_adapter
from peftune.plan import PLANNED

tmp, model, train_file, eval_file = (Path(a) for a in sys.argv[2:])
run, recorder = train_tiny(tmp, model, (train_file, eval_file), "method=loha")
merged = merge_adapter(run.path, output=tmp / "merged")
zero = CliRunner().invoke(main, ["validate", str(run.recipe_file), "loha.r=0"])
print(json.dumps({
    "moved": sorted(recorder.moved),
    "reloaded": (reloaded_logits(run) - recorder.logits).abs().max().item(),
    "merge_check": json.loads((merged / "merge.json").read_text())["check"]["passed"],
    "saved_block": run.recipe_file.read_text().split("loha:")[1].split("train:")[0],
    "planned": list(PLANNED),
    "zero": [zero.exit_code, zero.stderr],
}))
"""


def test_a_method_is_one_registry_entry(tmp_path, tiny_bert, reviews):
    import subprocess
    from pathlib import Path

    tests = Path(__file__).parent
    done = subprocess.run(
        [sys.executable, "-c", LOHA, str(tests), str(tmp_path), str(tiny_bert), *map(str, reviews)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert any("hada_w1_a" in name for name in found["moved"]), "the LoHa factors trained"
    assert any("pooler" in name and "modules_to_save" in name for name in found["moved"])
    assert found["reloaded"] < 1e-5
    assert found["merge_check"] is True
    assert "r: 4" in found["saved_block"] and "learning_rate: 0.005" in found["saved_block"]
    assert found["planned"] == ["full", "lora", "lora-8bit", "lora-4bit", "prefix", "loha"]
    assert found["zero"][0] == 2 and "loha.r must be a whole number of at least 1, got 0" in found["zero"][1]
