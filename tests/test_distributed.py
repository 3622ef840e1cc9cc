"""Data-parallel training on CPU: two processes under torchrun (gloo) share the work of one run."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import tiny

from peftune.recipe import load_recipe
from peftune.train import train

# Two processes with 8 examples each per step against one process with 16: the same effective batch and number
# of optimizer steps, but the samplers order the examples differently, so the results are close, not equal.
LOSS_TOLERANCE = 0.05
ACCURACY_TOLERANCE = 0.1  # 32 eval reviews: one review is 0.03


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_share_the_work_and_write_one_run(tiny_bert, reviews, tmp_path):
    recipe = tiny.write_recipe(tmp_path / "r.yaml", tiny_bert, *reviews)
    overrides = ["train.per_device_train_batch_size=8", "train.num_train_epochs=2"]
    single = train(load_recipe(str(recipe), overrides), output_dir=tmp_path / "single").read_metrics()
    batch16 = ["train.per_device_train_batch_size=16", "train.num_train_epochs=2"]
    same_batch = train(load_recipe(str(recipe), batch16), output_dir=tmp_path / "batch16").read_metrics()

    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    train_args = ["-m", "peftune", "train", str(recipe), *overrides, "--output-dir", str(tmp_path / "ddp")]
    command = [*launcher, "--master_port", str(free_port()), *train_args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())

    assert single.world_size == 1 and ddp["world_size"] == 2
    assert single.global_steps == 16 and ddp["global_steps"] == 8, "the optimizer steps per epoch halve"
    assert same_batch.global_steps == ddp["global_steps"]
    print("eval, two processes:", ddp["eval"], "one process, same effective batch:", same_batch.eval)
    assert abs(ddp["eval"]["loss"] - same_batch.eval["loss"]) < LOSS_TOLERANCE
    assert abs(ddp["eval"]["accuracy"] - same_batch.eval["accuracy"]) < ACCURACY_TOLERANCE
    assert ddp["eval_samples"] == single.eval_samples == 32
    # The other rank computed the same eval result (Trainer gathers predictions from every process).
    other = re.search(r"rank 1 of 2: eval (\{.*\})", done.stderr)
    assert other, done.stderr[-2000:]
    assert json.loads(other.group(1)) == pytest.approx(ddp["eval"])
    # One run folder, written once: the summary printed by the main process only.
    assert done.stdout.count("run folder:") == 1
    assert (tmp_path / "ddp" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed-zero2"])
def test_example_accelerate_configs_load(name):
    """Each example is a config accelerate reads as the kind it says. The FSDP one also trains (below); DeepSpeed is
    not installed here (its optimizers build CUDA or C++ extensions), so its example is only read."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(Path(__file__).parent.parent / "examples" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.name == {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed-zero2": "DEEPSPEED"}[name]
    assert config.num_processes == 2 and config.use_cpu is False
    if name == "fsdp":
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT", "the run folder needs whole weights"


def test_the_fsdp_example_trains_one_run_over_two_processes(tiny_bert, reviews, tmp_path):
    """examples/accelerate/fsdp.yaml as shipped, with only what a CPU needs changed: the processes shard the
    model (FSDP 2 over gloo), and the run folder gets the whole trained model, which scores what training said."""
    import torch
    import yaml

    from peftune.evaluation import evaluate

    example = Path(__file__).parent.parent / "examples" / "accelerate" / "fsdp.yaml"
    config = yaml.safe_load(example.read_text())
    # No GPU: the CPU backend, no bf16 autocast. Trainer moves a model to its device, which fails for the
    # meta-device copies that RAM-efficient loading leaves on the other ranks (on a GPU accelerate places them).
    config.update(use_cpu=True, mixed_precision="no")
    config["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] = False
    config_file = tmp_path / "fsdp-cpu.yaml"
    config_file.write_text(yaml.safe_dump(config))
    recipe = tiny.write_recipe(tmp_path / "r.yaml", tiny_bert, *reviews)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
               "--main_process_port", str(free_port()), "-m", "peftune", "train", str(recipe), "method=full",
               "train.num_train_epochs=2", "--output-dir", str(tmp_path / "fsdp")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads((tmp_path / "fsdp" / "metrics.json").read_text())
    assert run["world_size"] == 2 and run["global_steps"] == 8, "two processes, half the steps of one"
    other = re.search(r"rank 1 of 2: eval (\{.*\})", done.stderr)
    assert other and json.loads(other.group(1)) == pytest.approx(run["eval"])
    # Whole tensors, not one process's shards, and trained: the encoder moved away from the checkpoint.
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "fsdp" / "model" / "model.safetensors")
    base = load_file(tiny_bert / "model.safetensors")  # a bare encoder: `encoder.…` where the classifier has `bert.…`
    encoder = [name for name in base if name.startswith("encoder.")]
    assert encoder and all(saved[f"bert.{name}"].shape == base[name].shape for name in encoder)
    assert any(not torch.equal(saved[f"bert.{name}"], base[name]) for name in encoder)
    scored = evaluate(tmp_path / "fsdp")  # the saved model, loaded by transformers alone
    assert {k: scored["metrics"][k] for k in ("accuracy", "f1")} == pytest.approx(
        {k: run["eval"][k] for k in ("accuracy", "f1")}
    )
