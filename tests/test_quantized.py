"""Quantized bases (8-bit and 4-bit NF4): checkpoints that are already classifiers, every adapter method, the
modules kept in full precision, placement, merging into the float base, and the memory plan."""

from __future__ import annotations

import json

import pytest
import tiny
import torch
from trained import reloaded_logits, train_tiny

from peftune.data import Labels
from peftune.merge import merge_adapter
from peftune.modeling import kept_in_full_precision, load_base_model, memory_footprint
from peftune.recipe import ModelSpec

bnb = pytest.importorskip("bitsandbytes")
QUANTIZED = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)
ARCHS = ("bert", "roberta", "distilbert", "deberta-v2")
POSITIVE = {0: "negative", 1: "positive"}


@pytest.fixture(scope="session")
def classifiers(tmp_path_factory, tiny_models):
    """Tiny checkpoints that are already sentiment classifiers (labels negative/positive), per architecture."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    made = {}
    for arch in ARCHS:
        folder = tmp_path_factory.mktemp(f"classifier-{arch}")
        torch.manual_seed(1)
        model = AutoModelForSequenceClassification.from_pretrained(
            tiny_models(arch), num_labels=2, id2label=POSITIVE, label2id={v: k for k, v in POSITIVE.items()}
        )
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(tiny_models(arch)).save_pretrained(folder)
        made[arch] = folder
    return made


def saved_head(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = load_file(str(folder / "model.safetensors"))
    return {k: v for k, v in weights.items() if k.startswith(("classifier.", "pre_classifier.", "pooler."))}


# Every architecture and method on a 4-bit base, both label cases; 8-bit and float bases on a few.
CASES = [(a, m, "4bit", same) for a in ARCHS for m in ("lora", "prefix", "ia3") for same in (True, False)]
CASES += [(a, "lora", q, same) for a in ("bert", "roberta") for q in ("8bit", "none") for same in (True, False)]
CASES += [("roberta", "ia3", "none", True), ("deberta-v2", "ia3", "8bit", False)]  # heads of several layers
# The rest of the grid (every architecture, method, base and label case): `python -m pytest -m slow`.
GRID = [(a, m, q, same) for a in ARCHS for m in ("lora", "prefix", "ia3") for q in ("none", "8bit", "4bit")
        for same in (True, False)]  # fmt: skip
CASES += [pytest.param(*case, marks=pytest.mark.slow) for case in GRID if case not in CASES]


@pytest.mark.parametrize(("arch", "method", "quantization", "same_labels"), CASES)
def test_a_classifier_checkpoint_on_every_base(tmp_path, classifiers, reviews, arch, method, quantization, same_labels):
    """The head the checkpoint has is kept and trained when the labels fit, replaced when they do not; either way
    it is float and trained, the base is quantized, the reload gives the same logits and the merge the same labels."""
    overrides = [f"method={method}", f"model.quantization={quantization}"]
    if not same_labels:
        overrides.append("data.labels=[negative, positive, neutral]")
    run, recorder = train_tiny(tmp_path, classifiers[arch], reviews, *overrides)
    saved = [n for n in recorder.start if "modules_to_save" in n]
    assert saved and set(saved) <= recorder.moved, "the head is trained"
    assert all(recorder.start[n].dtype == torch.float32 for n in saved), "the head is in full precision"

    original = saved_head(classifiers[arch])
    start = {n.split("modules_to_save.default.")[0].split(".")[-2] + "." + n.split("default.")[1]: t
             for n, t in recorder.start.items() if "modules_to_save" in n}  # fmt: skip
    weight = next(k for k in original if k.startswith("classifier") and k.endswith("weight") and original[k].dim() == 2
                  and original[k].shape[0] == 2)  # fmt: skip
    started = start.get(weight)
    if same_labels:
        assert started is not None and torch.equal(started, original[weight]), "the checkpoint's head is kept"
    else:
        assert started is None or started.shape[0] == 3, "a new head for three labels"

    from peftune.inference import load_target

    model = load_target(run.path).model
    layers = [m for m in model.modules() if isinstance(m, QUANTIZED)]
    assert bool(layers) is (quantization != "none")
    assert (reloaded_logits(run) - recorder.logits).abs().max().item() < 1e-4
    if method != "prefix":
        merged = merge_adapter(run.path, output=tmp_path / "merged")
        record = json.loads((merged / "merge.json").read_text())
        assert record["check"]["passed"] and record["trained_on"] == quantization


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_modules_the_checkpoint_lacks_load_in_float(tmp_path, tiny_bert, quantization):
    """Decided before loading, from the checkpoint's files: a layer missing from them is new, kept in float."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "partial"
    shutil.copytree(tiny_bert, folder)
    weights = load_file(str(folder / "model.safetensors"))
    missing = "encoder.layer.1.output.dense"
    save_file({k: v for k, v in weights.items() if not k.startswith(missing)}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})  # fmt: skip
    spec = ModelSpec(name_or_path=str(folder), quantization=quantization)
    from peftune.modeling import load_config

    kept = kept_in_full_precision(spec, load_config(spec))
    assert kept == ["bert.encoder.layer.1.output.dense", "bert.pooler", "classifier"]
    model, fresh = load_base_model(spec, Labels(names=("a", "b")))
    assert "bert.encoder.layer.1.output.dense" in fresh
    assert type(model.get_submodule("bert.encoder.layer.1.output.dense")) is torch.nn.Linear
    assert isinstance(model.get_submodule("bert.encoder.layer.0.output.dense"), QUANTIZED)


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_placed_on_the_device_the_model_reports(tiny_bert, quantization):
    """Every weight, buffer and quantization scale on the process's device (the CPU here, its own GPU on CUDA)."""
    from peftune.modeling import process_device

    model, _ = load_base_model(
        ModelSpec(name_or_path=str(tiny_bert), quantization=quantization), Labels(names=("a", "b"))
    )
    expected = process_device()
    assert model.device == expected
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [p.quant_state.absmax for p in model.parameters() if getattr(p, "quant_state", None) is not None]
    assert {t.device for t in tensors} == {expected}


def test_quantized_weights_take_less_memory_and_count_every_weight(tiny_models):
    """The loaded model's weight memory falls from float32 to int8 to NF4; the parameter count stays the same."""
    labels = Labels(names=("a", "b"))
    sizes = {}
    for quantization in ("none", "8bit", "4bit"):
        spec = ModelSpec(name_or_path=str(tiny_models("bert")), quantization=quantization)
        sizes[quantization] = memory_footprint(load_base_model(spec, labels)[0])
    assert sizes["4bit"] < sizes["8bit"] < sizes["none"]
    from peftune.modeling import count_parameters

    counts = {
        q: count_parameters(
            load_base_model(ModelSpec(name_or_path=str(tiny_models("bert")), quantization=q), labels)[0]
        )
        for q in ("none", "4bit")
    }
    assert counts["4bit"][1] == counts["none"][1], "an NF4 byte holds two weights: counted as two"


def test_four_bit_computes_in_the_training_precision(tiny_bert):
    spec = ModelSpec(name_or_path=str(tiny_bert), quantization="4bit")
    model, _ = load_base_model(spec, Labels(names=("a", "b")), compute_dtype="bfloat16")
    layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert layer.compute_dtype == torch.bfloat16
    assert layer.weight.quant_state.nested, "double quantization"
    assert layer.weight.quant_state.quant_type == "nf4"


def test_a_quantized_base_on_a_cpu_says_it_is_slow_once(tmp_path, tiny_bert, reviews, caplog):
    with caplog.at_level("WARNING"):
        train_tiny(tmp_path, tiny_bert, reviews, "model.quantization=4bit")
    said = [r.getMessage() for r in caplog.records if "on a CPU trains slower" in r.getMessage()]
    assert len(said) == int(not torch.cuda.is_available())
    assert not said or "Set model.quantization=none" in said[0]


def test_load_in_8bit_still_works_and_says_what_replaced_it(tmp_path, tiny_bert, reviews, caplog):
    from peftune.recipe import load_recipe

    recipe_file = tiny.write_recipe(tmp_path / "r.yaml", tiny_bert, *reviews)
    with caplog.at_level("WARNING"):
        recipe = load_recipe(str(recipe_file), ["model.load_in_8bit=true"])
    assert recipe.model.quantization == "8bit"
    assert "model.load_in_8bit is deprecated: write model.quantization: 8bit instead" in caplog.text
    assert "load_in_8bit" not in recipe.to_yaml(), "the saved recipe has the new key only"


@pytest.mark.parametrize("method", ["lora", "prefix", "prompt"])
def test_four_bit_with_gradient_checkpointing(tmp_path, tiny_bert, reviews, method):
    run, recorder = train_tiny(
        tmp_path, tiny_bert, reviews, f"method={method}", "model.quantization=4bit", "train.gradient_checkpointing=true"
    )
    assert recorder.moved
    assert (reloaded_logits(run) - recorder.logits).abs().max().item() < 1e-4


def test_a_frozen_int8_layer_keeps_no_input_for_backward_and_gives_the_same_gradient(monkeypatch):
    """bitsandbytes keeps each int8 layer's input until backward even when its weight is frozen; peftune's wrap
    drops it (only the weight is needed then). The input's gradient is the same, and a trained weight still
    gets its own."""
    import gc
    import weakref

    from packaging.version import Version

    from peftune.modeling import int8_keeps_only_what_backward_needs

    if Version(bnb.__version__) < Version("0.48"):
        pytest.skip("bitsandbytes 0.47 multiplies int8 inputs in float16 on the CPU and keeps no input to drop")
    torch.manual_seed(0)
    layer = bnb.nn.Linear8bitLt(16, 8, has_fp16_weights=False, threshold=0.0)
    layer.load_state_dict({"weight": torch.randn(8, 16), "bias": torch.randn(8)})
    layer = layer.to("cpu")  # quantized on placement, as transformers loads it
    layer.train()
    weight = layer.weight.CB.float() * layer.weight.SCB.unsqueeze(1) / 127.0  # what the int8 layer multiplies by
    x = torch.randn(4, 16, requires_grad=True)

    def run() -> tuple[bool, torch.Tensor]:
        hidden = x * 2.0  # a layer's input made in the forward pass, held by nothing else
        alive = weakref.ref(hidden)
        out = layer(hidden)
        del hidden
        gc.collect()
        kept = alive() is not None
        out.pow(2).sum().backward()
        grad = x.grad.clone()
        x.grad = None
        return kept, grad

    from bitsandbytes.autograd._functions import MatMul8bitFp

    int8_keeps_only_what_backward_needs()
    int8_keeps_only_what_backward_needs()  # a second call wraps nothing twice
    wrapped = MatMul8bitFp.forward
    assert not hasattr(wrapped.peftune_original, "peftune_original")
    with monkeypatch.context() as patch:  # bitsandbytes as it comes
        patch.setattr(MatMul8bitFp, "forward", staticmethod(wrapped.peftune_original))
        kept_before, grad_before = run()
    kept_after, grad_after = run()
    assert kept_before and not kept_after
    expected_out = (x.detach() * 2.0) @ weight.t() + layer.bias.detach()
    assert torch.allclose(grad_after, 2.0 * (2.0 * expected_out) @ weight, atol=1e-3)
    assert torch.allclose(grad_after, grad_before)
