"""Nothing lost: a training process killed mid-run resumes from its last checkpoint to the same result."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import tiny
from safetensors.torch import load_file

from peftune.recipe import load_recipe
from peftune.train import train

# 64 reviews, batch 8, two epochs: 16 steps. Each case: the settings, the step at which the process dies, the
# checkpoint it resumes from (the steps after it are lost and done again), and the steps of the whole run.
CASES = {
    "epoch-checkpoints": (["train.num_train_epochs=2"], 10, 8, 16),
    "step-checkpoints": (["train.num_train_epochs=2", "train.save_strategy=steps", "train.save_steps=5"], 13, 10, 16),
    # Batches of up to 128 tokens: 12 of them per epoch, of 3 to 12 reviews.
    "token-budget": (["train.num_train_epochs=2", "train.batch_tokens=128"], 15, 12, 24),
}
# The resumed process restores the optimizer, scheduler, RNG states and data order, so on CPU it repeats the
# uninterrupted run's arithmetic; the tolerance only allows for float summation order.
TOLERANCE = 1e-5

KILLED_CHILD = """
import os, signal, sys
from transformers import TrainerCallback
from peftune.recipe import load_recipe
from peftune.train import train

class Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no exception handler: as the OOM killer does

train(load_recipe(sys.argv[1], sys.argv[3:]), output_dir=sys.argv[2], callbacks=[Crash()])
"""


def peftune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peftune", *args], capture_output=True, text=True, check=False)


@pytest.fixture
def recipe(tiny_bert, reviews, tmp_path):
    return str(tiny.write_recipe(tmp_path / "r.yaml", tiny_bert, *reviews))


@pytest.mark.parametrize("case", CASES)
def test_a_killed_run_resumes_to_the_uninterrupted_result(recipe, tmp_path, case):
    settings, kill_at, resume_at, steps = CASES[case]
    whole = train(load_recipe(recipe, settings), output_dir=tmp_path / "whole").read_metrics()

    crashed = tmp_path / "crashed"
    child = [sys.executable, "-c", KILLED_CHILD.format(kill_at=kill_at), recipe, str(crashed), *settings]
    died = subprocess.run(child, capture_output=True, text=True, check=False)
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    assert not (crashed / "metrics.json").exists()
    assert sorted(p.name for p in (crashed / "checkpoints").iterdir()) == [f"checkpoint-{resume_at}"]
    # A checkpoint whose writing was cut short (no trainer_state.json yet) is never resumed from.
    (crashed / "checkpoints" / f"checkpoint-{kill_at - 1}").mkdir()
    (crashed / "checkpoints" / f"checkpoint-{kill_at - 1}" / "adapter_model.safetensors").write_bytes(b"cut short")
    # The checkpoint keeps the training time so far; a large value makes its carrying over unmistakable.
    elapsed = crashed / "checkpoints" / f"checkpoint-{resume_at}" / "peftune_elapsed.json"
    assert json.loads(elapsed.read_text())["train_seconds"] > 0
    elapsed.write_text(json.dumps({"train_seconds": 1000.0}))

    used = peftune("eval", str(crashed))
    assert used.returncode == 2 and "incomplete run" in used.stderr and "Traceback" not in used.stderr

    again = peftune("train", recipe, *settings, "--output-dir", str(crashed))
    assert again.returncode == 2, again.stderr[-2000:]
    last_line = again.stderr.strip().splitlines()[-1]
    assert f"interrupted run (last checkpoint at step {resume_at}); pass --resume" in last_line

    other = peftune("train", recipe, *settings, "seed=7", "--output-dir", str(crashed), "--resume")
    assert other.returncode == 2 and "started with other settings" in other.stderr

    resumed = peftune("train", recipe, *settings, "--output-dir", str(crashed), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((crashed / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == resume_at and whole.resumed_from_step is None
    assert metrics["global_steps"] == whole.global_steps == steps
    print("eval, uninterrupted:", whole.eval, "resumed:", metrics["eval"])
    assert metrics["eval"]["loss"] == pytest.approx(whole.eval["loss"], abs=TOLERANCE)
    assert metrics["eval"]["accuracy"] == whole.eval["accuracy"]
    ours = load_file(crashed / "adapter" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < TOLERANCE
    # The resumed process trained only the steps after the checkpoint: Trainer's train_loss is the mean over
    # the steps of this process (a restart from scratch would give the same final weights, but not this).
    state = json.loads((tmp_path / "whole" / "checkpoints" / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == steps
    assert metrics["train_loss"] == pytest.approx(sum(losses[resume_at:]) / (steps - resume_at), abs=1e-4)
    assert whole.train_loss == pytest.approx(sum(losses) / steps, abs=1e-4)
    # The time of the whole run: the part before the checkpoint plus the resumed part.
    assert 1000 < metrics["train_runtime_s"] < 1000 + 10 * whole.train_runtime_s


def test_resume_refuses_what_it_cannot_continue(recipe, tmp_path):
    fresh = peftune("train", recipe, "--output-dir", str(tmp_path / "nothing"), "--resume")
    assert fresh.returncode == 2 and "nothing to resume" in fresh.stderr

    train(load_recipe(recipe), output_dir=tmp_path / "done")
    done = peftune("train", recipe, "--output-dir", str(tmp_path / "done"), "--resume")
    assert done.returncode == 2 and "already holds a complete run; it has nothing left to resume" in done.stderr
    both = peftune("train", recipe, "--output-dir", str(tmp_path / "done"), "--resume", "--overwrite")
    assert both.returncode == 2 and "pass one of them" in both.stderr


def test_a_run_with_projected_prefixes_is_not_resumed(recipe, tmp_path):
    # peft checkpoints a projected prefix as its output, so the projection cannot be trained on from it:
    # Trainer would fail loading it. The run is refused before any work, and kept as it was.
    settings = ["method=prefix", "prefix.prefix_projection=true", "train.num_train_epochs=2"]
    crashed = tmp_path / "crashed"
    child = [sys.executable, "-c", KILLED_CHILD.format(kill_at=10), recipe, str(crashed), *settings]
    assert subprocess.run(child, capture_output=True, text=True, check=False).returncode == -signal.SIGKILL
    before = sorted(p.relative_to(crashed) for p in crashed.rglob("*"))

    resumed = peftune("train", recipe, *settings, "--output-dir", str(crashed), "--resume")
    assert resumed.returncode == 2, resumed.stderr[-2000:]
    assert "cannot be resumed: with prefix.prefix_projection=true" in resumed.stderr
    assert "--overwrite" in resumed.stderr and "Traceback" not in resumed.stderr
    assert sorted(p.relative_to(crashed) for p in crashed.rglob("*")) == before
