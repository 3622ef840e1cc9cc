"""Prefix tuning on every encoder family, on any transformers version: what it computes, and that a trained
prefix reloads (in a fresh process), exports to ONNX and is the same adapter stock peft reads."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from trained import PROBE, batch, train_tiny
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from peftune import prefix
from peftune.export import export_model
from peftune.methods import METHODS

# Every family prefix tuning supports; "deberta-v3" is DeBERTa-v2 with relative positions only.
FAMILIES = ["bert", "roberta", "xlm-roberta", "electra", "distilbert", "deberta-v2", "deberta-v3"]
ABSOLUTE = [arch for arch in FAMILIES if arch != "deberta-v3"]  # positions the prefix can stand in front of
KEY_VALUE = {"key": "value", "k_lin": "v_lin", "key_proj": "value_proj"}  # each family's projection names


def prefixed(folder, virtual_tokens: int):
    """A base classifier with an untrained prefix of `virtual_tokens`, built as `peftune train` builds it."""
    from peft import get_peft_model

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    method = METHODS["prefix"]
    config = method.peft_config({**method.defaults, "num_virtual_tokens": virtual_tokens}, model=base)
    return prefix.install(get_peft_model(base, config)).eval()


def prefix_weight(model):
    return model.prompt_encoder["default"].embedding.weight


@pytest.mark.parametrize("arch", ABSOLUTE)
def test_a_prefix_is_keys_and_values_of_text_before_the_input(tiny_models, arch):
    """What prefix tuning means: in every layer the text attends to the prefix as to keys and values of tokens
    placed before it. A prefix made of the keys and values the model computes for the first tokens of a text
    must give the rest of that text exactly the hidden states it has inside the whole text."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_models(arch))
    ids = tokenizer("The waiter was rude and impatient, and the soup was bland.", return_tensors="pt")["input_ids"]
    virtual = 4
    model = prefixed(tiny_models(arch), virtual)
    base = model.get_base_model()
    captured: list[torch.Tensor] = []
    hooks = []
    for attention in prefix.self_attention_modules(base):
        key = next(name for name in KEY_VALUE if hasattr(attention, name))
        for projection in (getattr(attention, key), getattr(attention, KEY_VALUE[key])):
            hooks.append(projection.register_forward_hook(lambda _m, _i, out: captured.append(out[0, :virtual])))
    with torch.no_grad():
        whole = base(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    for hook in hooks:
        hook.remove()
    layers = base.config.num_hidden_layers
    assert len(captured) == 2 * layers, "keys and values of every layer, in peft's order"
    with torch.no_grad():  # peft's layout: [virtual tokens, (layer, key or value), hidden]
        prefix_weight(model).copy_(torch.stack(captured, dim=1).reshape(virtual, -1))
        rest = model(input_ids=ids[:, virtual:], output_hidden_states=True).hidden_states[-1]
        without = base(input_ids=ids[:, virtual:], output_hidden_states=True).hidden_states[-1]
    assert (rest - whole[:, virtual:]).abs().max().item() < 1e-5
    assert (without - whole[:, virtual:]).abs().max().item() > 1e-3, "the prefix is what makes the difference"


@pytest.mark.parametrize("arch", FAMILIES)
def test_padding_leaves_each_text_its_own_logits(tiny_models, arch):
    model = prefixed(tiny_models(arch), 5)
    with torch.no_grad():
        prefix_weight(model).normal_()
        tokenizer = AutoTokenizer.from_pretrained(tiny_models(arch))
        together = model(**batch(tokenizer)).logits
        alone = torch.cat([model(**tokenizer(text, return_tensors="pt")).logits for text in PROBE])
        plain = model.get_base_model()(**batch(tokenizer)).logits
    assert (together - alone).abs().max().item() < 1e-5
    assert (together - plain).abs().max().item() > 1e-4, "the prefix changes the logits"


def test_deberta_attention_without_prefix_is_the_library_s(tiny_models):
    """DeBERTa's disentangled attention is rewritten to take a prefix: with an empty one it must compute what
    transformers' own does, relative positions included."""
    model = prefixed(tiny_models("deberta-v3"), 5)
    base = model.get_base_model()
    inputs = batch(AutoTokenizer.from_pretrained(tiny_models("deberta-v3")))
    with torch.no_grad():
        library = base(**inputs).logits  # no prefix states set: the library's forward
        for attention in prefix.self_attention_modules(base):
            heads, size = attention.num_attention_heads, attention.attention_head_size
            setattr(attention, prefix.STATES, (torch.zeros(1, heads, 0, size), torch.zeros(1, heads, 0, size)))
        rewritten = base(**inputs).logits
    assert (rewritten - library).abs().max().item() < 1e-6


@pytest.mark.parametrize("arch", ["bert", "deberta-v3"])
def test_gradient_checkpointing_gives_the_prefix_the_same_gradients(tiny_models, arch):
    inputs = batch(AutoTokenizer.from_pretrained(tiny_models(arch)))
    gradients = []
    for checkpointing in (False, True):
        model = prefixed(tiny_models(arch), 5)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        for module in model.modules():  # dropout would draw other masks in the recomputation
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        model(**inputs, labels=torch.tensor([0, 1, 0])).loss.backward()
        gradients.append(prefix_weight(model).grad)
    assert gradients[0].abs().max().item() > 0
    assert torch.allclose(gradients[0], gradients[1], atol=1e-7)


@pytest.fixture(scope="module")
def prefix_runs(tmp_path_factory, tiny_models, reviews):
    """One trained prefix run per family, with the logits the model in memory gave at the end of training."""
    made = {}
    for arch in FAMILIES:
        folder = tmp_path_factory.mktemp(f"prefix-{arch}")
        run, recorder = train_tiny(folder, tiny_models(arch), reviews, "method=prefix")
        assert recorder.moved >= {n for n in recorder.start if "prompt_encoder" in n}, "the prefix is trained"
        made[arch] = (run.path, recorder.logits)
    return made


RELOAD = """
import json, sys, torch
from trained import batch
from peftune.inference import load_target
out = {}
for path in sys.argv[1:]:
    loaded = load_target(path)
    model, tokenizer = loaded.model, loaded.tokenizer
    with torch.no_grad():
        out[path] = model(**batch(tokenizer)).logits.tolist()
print(json.dumps(out))
"""


def test_a_trained_prefix_reloads_in_a_fresh_process(prefix_runs):
    paths = [str(path) for path, _ in prefix_runs.values()]
    result = subprocess.run(
        [sys.executable, "-c", RELOAD, *paths], capture_output=True, text=True, cwd=Path(__file__).parent, check=True
    )
    reloaded = json.loads(result.stdout.strip().splitlines()[-1])
    for arch, (path, logits) in prefix_runs.items():
        difference = (torch.tensor(reloaded[str(path)]) - logits).abs().max().item()
        assert difference < 1e-5, arch


@pytest.mark.parametrize("arch", FAMILIES)
def test_a_trained_prefix_exports_to_onnx(prefix_runs, tmp_path, arch):
    import onnxruntime

    path, logits = prefix_runs[arch]
    folder, record = export_model(path, "onnx", output=tmp_path / "onnx")
    assert record.check is not None and record.check.max_abs_logit_difference <= 1e-4
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = batch(AutoTokenizer.from_pretrained(folder))  # another batch size and length than the check's
    names = [i.name for i in session.get_inputs()]
    got = session.run(["logits"], {name: inputs[name].numpy().astype(np.int64) for name in names})[0]
    assert np.abs(got - logits.numpy()).max() < 1e-4


@pytest.mark.parametrize("arch", ["bert", "deberta-v3"])
def test_a_transformers_release_whose_attention_cannot_be_reached_is_named(tiny_models, monkeypatch, arch):
    """A future transformers that drops what the prefix relies on gets one line naming the version."""
    from peft import get_peft_model
    from transformers import PreTrainedModel

    from peftune.errors import PeftuneError

    monkeypatch.setattr(PreTrainedModel, "set_attn_implementation", lambda self, name: None)
    monkeypatch.setattr(prefix, "DEBERTA_PARTS", (*prefix.DEBERTA_PARTS, "a_part_of_tomorrow_s_release"))
    base = AutoModelForSequenceClassification.from_pretrained(tiny_models(arch), num_labels=2)
    method = METHODS["prefix"]
    model = get_peft_model(base, method.peft_config(method.defaults, model=base))
    with pytest.raises(PeftuneError, match=r"cannot reach the attention of \S+ models in transformers 5\.\d+"):
        prefix.install(model)


def _stock_peft_runs_prefix_tuning() -> bool:
    from transformers import BertModel

    return "past_key_values" in inspect.signature(BertModel.forward).parameters


@pytest.mark.skipif(
    not _stock_peft_runs_prefix_tuning(),
    reason="stock peft runs prefix tuning through past_key_values, which encoders no longer take (transformers 5.24)",
)
@pytest.mark.parametrize("arch", ["bert", "roberta", "electra"])
def test_stock_peft_reads_our_prefix_adapter_and_gives_the_same_logits(prefix_runs, arch):
    from peft import AutoPeftModelForSequenceClassification

    path, logits = prefix_runs[arch]
    labels = json.loads((path / "labels.json").read_text())
    id2label = {int(i): name for i, name in labels["id2label"].items()}
    model = AutoPeftModelForSequenceClassification.from_pretrained(
        path / "adapter", num_labels=len(id2label), id2label=id2label, label2id=labels["label2id"]
    ).eval()
    assert type(model).__name__ == "PeftModelForSequenceClassification", "stock peft, not peftune's"
    with torch.no_grad():
        stock = model(**batch(AutoTokenizer.from_pretrained(path / "adapter"))).logits
    assert (stock - logits).abs().max().item() < 1e-5
