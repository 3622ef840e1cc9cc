"""Data-parallel training on CPU: two processes under torchrun (gloo) share the work of one run."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys

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
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(Path(__file__).parent.parent / "examples" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.name == {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed-zero2": "DEEPSPEED"}[name]
    assert config.num_processes == 2 and config.use_cpu is False
    if name == "fsdp":
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT", "the run folder needs whole weights"
