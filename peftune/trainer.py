"""The Trainer peftune runs, its callbacks, and the checkpoints it leaves: which one a run resumes from.

transformers is imported inside the functions, so that importing this module (for `last_checkpoint`) stays cheap.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peftune import rundir
from peftune.errors import PeftuneError
from peftune.methods import METHODS
from peftune.recipe import Recipe

log = logging.getLogger(__name__)


def build_trainer(
    model: Any,
    args: Any,
    *,
    sampler: Any,
    optimizer: Any,
    train_set: Any,
    eval_set: Any,
    tokenizer: Any,
    compute_metrics: Any,
    callbacks: Sequence[Any],
    seconds_before: float,
    compute_loss: Any = None,
) -> Any:
    """A transformers Trainer that draws its training batches from `sampler` (length buckets, or whole batches
    from a batch sampler such as peftune.batching's token budgets; None: Trainer's own order), logs one plain line
    per entry, and writes the training time so far into every checkpoint. `compute_loss` replaces the model's own
    loss (peftune.losses: class weights)."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding, Trainer

    from peftune.batching import TokenBudgetBatches

    class BucketTrainer(Trainer):
        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            return sampler if sampler is not None else super()._get_train_sampler(train_dataset)

        def get_train_dataloader(self) -> Any:
            if not isinstance(sampler, TokenBudgetBatches):
                return super().get_train_dataloader()
            # Trainer hands only its own rebalancing sampler to the loader as a batch sampler: build the loader here,
            # with Trainer's worker and pinning settings, and let accelerate place (or shard) it as Trainer would.
            dataset = self._remove_unused_columns(self.train_dataset, description="Training")
            loader = DataLoader(
                dataset, batch_sampler=sampler, collate_fn=self.data_collator,
                num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory,
            )  # fmt: skip
            return self.accelerator.prepare(loader)

    on_gpu = torch.cuda.is_available()
    trainer = BucketTrainer(
        model=model,
        args=args,
        optimizers=(optimizer, None),
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if on_gpu else None),
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
        compute_loss_func=compute_loss,
        callbacks=[*callbacks, _elapsed_time(seconds_before)],
    )
    _log_lines(trainer)
    return trainer


def resume_point(run: rundir.RunDir, recipe: Recipe, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint to continue from, or None to start afresh; refuses what would lose or mix work."""
    if resume and overwrite:
        raise PeftuneError("--resume continues a run and --overwrite starts it again; pass one of them")
    if run.is_complete() and not overwrite:
        hint = "it has nothing left to resume" if resume else "pass --overwrite to replace it"
        raise PeftuneError(f"{run.path} already holds a complete run; {hint}, or give another --output-dir")
    checkpoint = last_checkpoint(run)
    if not resume:
        if checkpoint is not None and not overwrite:
            raise PeftuneError(
                f"{run.path} holds an interrupted run (last checkpoint at step {step_of(checkpoint)}); "
                "pass --resume to continue it, or --overwrite to start again"
            )
        return None
    if not run.recipe_file.is_file():
        raise PeftuneError(f"nothing to resume in {run.path} (no run was started there); drop --resume")
    if not recipe.same_as_saved(run.recipe_file):
        raise PeftuneError(
            f"{run.path} was started with other settings than these (its {rundir.RECIPE_FILE} differs); resume "
            "with the same recipe and overrides, or pass --overwrite to start again"
        )
    problem = METHODS[recipe.method].checkpoint_problem(recipe.method_block)
    if checkpoint is not None and problem:
        raise PeftuneError(f"{run.path} cannot be resumed: {problem}; pass --overwrite to start again")
    if checkpoint is None:
        log.warning("%s has no complete checkpoint yet: training from the start", run.path)
    return checkpoint


def last_checkpoint(run: rundir.RunDir) -> Path | None:
    """The newest checkpoint that Trainer finished writing (its trainer_state.json is written last)."""
    if not run.checkpoints_dir.is_dir():
        return None
    complete = [
        folder
        for folder in run.checkpoints_dir.glob(f"{rundir.CHECKPOINT_PREFIX}*")
        if folder.name.removeprefix(rundir.CHECKPOINT_PREFIX).isdigit() and (folder / rundir.TRAINER_STATE).is_file()
    ]
    return max(complete, key=step_of, default=None)


def step_of(checkpoint: Path) -> int:
    """The training step a checkpoint folder was saved at."""
    return int(checkpoint.name.removeprefix(rundir.CHECKPOINT_PREFIX))


def seconds_before(checkpoint: Path | None) -> float:
    """Training seconds spent up to `checkpoint`: 0 from the start, or when the checkpoint does not say.

    Read before training: Trainer deletes old checkpoints (save_total_limit) before it ends.
    """
    try:
        return float(json.loads((checkpoint / rundir.ELAPSED_FILE).read_text())["train_seconds"]) if checkpoint else 0.0
    except (OSError, ValueError, KeyError):
        return 0.0


def _elapsed_time(before: float) -> Any:
    """A callback that writes the training time so far into every checkpoint it saves."""
    from transformers import TrainerCallback

    class ElapsedTime(TrainerCallback):
        started = time.perf_counter()

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.started = time.perf_counter()

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            folder = Path(args.output_dir) / f"{rundir.CHECKPOINT_PREFIX}{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                seconds = before + time.perf_counter() - self.started
                (folder / rundir.ELAPSED_FILE).write_text(json.dumps({"train_seconds": round(seconds, 3)}) + "\n")

    return ElapsedTime()


def _log_lines(trainer: Any) -> None:
    """Trainer's log entries as one plain line each, numbers as numbers (`step 50, epoch 2: loss 0.2449, ...`),
    instead of the dictionaries of formatted strings its progress and printer callbacks write."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class Bars(ProgressCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            pass  # the bars only; LogLines writes the entries

    class LogLines(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if not state.is_world_process_zero or not logs:
                return
            shown = ", ".join(
                f"{key} {_number(value)}" for key, value in logs.items() if key not in ("total_flos", "epoch")
            )
            from tqdm.auto import tqdm

            tqdm.write(f"step {state.global_step}, epoch {state.epoch or 0:.3g}: {shown}", file=sys.stderr)

    had_bars = trainer.pop_callback(ProgressCallback) is not None
    trainer.pop_callback(PrinterCallback)
    if had_bars:
        trainer.add_callback(Bars())
    trainer.add_callback(LogLines())


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
