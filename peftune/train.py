"""Training: build the Trainer from a recipe, run it, and write the run folder."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import resource
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from peftune import card, data, metrics, modeling, plan, rundir
from peftune.batching import LengthBucketSampler
from peftune.errors import PeftuneError
from peftune.methods import METHODS
from peftune.recipe import Recipe, check_passthrough, local_path
from peftune.record import Metrics, Primary

log = logging.getLogger(__name__)

SAMPLES = 128  # eval rows kept in the run folder for the checks of merge and export
LIBRARIES = ("peftune", "torch", "transformers", "peft", "datasets", "accelerate", "bitsandbytes")


# Overrides that choose where a run goes rather than how it trains.
PLACEMENT_KEYS = ("name", "output_dir")


def run_name(recipe: Recipe, overrides: Sequence[str] = ()) -> str:
    """The run's name: the recipe's, followed by the settings the overrides changed, e.g. `quickstart-method-full`,
    so that runs of one recipe with other settings land in folders of their own."""
    settings = [o for o in overrides if o.partition("=")[0].strip() not in PLACEMENT_KEYS]
    if not settings:
        return recipe.name
    text = "-".join(part for o in settings for part in o.split("=", 1))
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    if len(slug) > 60:  # long values (paths, lists): shortened, and kept apart by a hash of the whole
        slug = slug[:50].rstrip("-.") + "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{recipe.name}-{slug}"


def placed(recipe: Recipe, overrides: Sequence[str] = (), output_dir: str | Path | None = None) -> tuple[Recipe, Path]:
    """The recipe as the run records it, with the name and folder it uses (so that training the saved recipe
    again targets the same folder), and that folder: `--output-dir`, else the recipe's `output_dir`, else
    `runs/<run name>`."""
    if output_dir or recipe.output_dir:  # a folder the user chose
        kept = str(output_dir) if output_dir else recipe.output_dir
        return recipe.model_copy(update={"output_dir": kept}), Path(str(kept))
    name = run_name(recipe, overrides)
    return recipe.model_copy(update={"name": name}), rundir.RUNS_DIR / name


def train(
    recipe: Recipe,
    output_dir: str | Path | None = None,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
    callbacks: Sequence[Any] = (),
    resume: bool = False,
    fit: str | None = None,
    announce: Callable[[Recipe, rundir.RunDir], Any] | None = None,
) -> rundir.RunDir:
    """Fine-tune the recipe's model on its data and write a complete run folder; return it.

    `resume` continues an interrupted run in the same folder from its last complete checkpoint (the recipe
    must be the one it started with). `callbacks` are `transformers.TrainerCallback`s handed to the Trainer.
    `announce` is called with the recipe as the run records it once every check that needs no data or weights
    has passed.
    """
    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

    recipe, folder = placed(recipe, overrides, output_dir)
    run = rundir.RunDir(folder)
    fitted = None
    if fit is not None:  # choose batch size, accumulation and checkpointing for the memory budget first
        recipe, fitted = plan.fit(recipe, plan.parse_memory(fit), fit)
        log.info("fit %s: per-device batch %d, gradient accumulation %d, gradient checkpointing %s "
                 "(estimate %d MB)", fit, fitted["per_device_train_batch_size"], fitted["gradient_accumulation_steps"],
                 "on" if fitted["gradient_checkpointing"] else "off", fitted["estimate_mb"])  # fmt: skip
    check_passthrough(recipe)  # a mistake in the recipe first: before a clash of folders, before any output
    modeling.check_model(recipe, modeling.load_config(recipe.model))
    checkpoint = _resume_point(run, recipe, resume, overwrite)
    if announce is not None:
        announce(recipe, run)
    set_seed(recipe.seed)

    tokenizer = modeling.load_tokenizer(recipe.model)
    train_raw, eval_raw = data.load_splits(recipe.data, recipe.seed)
    labels = data.infer_labels(recipe.data, train_raw, eval_raw)
    metric_names = recipe.metrics or metrics.default_metrics(labels.problem_type)
    metrics.check_metrics(metric_names, labels.problem_type)
    tokenizing = time.perf_counter()
    train_set = data.tokenize(train_raw, tokenizer, recipe.data, labels, recipe.data.train_split)
    eval_set = data.tokenize(eval_raw, tokenizer, recipe.data, labels, recipe.data.eval_split)
    tokenize_seconds = time.perf_counter() - tokenizing
    train_lengths = [len(ids) for ids in train_set["input_ids"]]  # read once: batching and tokens/s
    log.info(
        "%s: %d train / %d eval examples, %s", recipe.name, len(train_set), len(eval_set),
        f"{labels.num_labels} labels" if labels.names else "regression",
    )  # fmt: skip

    base, fresh = modeling.load_base_model(recipe.model, labels, modeling.compute_dtype(recipe.train))
    _, base_parameters = modeling.count_parameters(base)
    model = modeling.attach_method(base, recipe, fresh)
    trainable, total = modeling.count_parameters(model)
    log.info("method %s: %s of %s parameters trainable (%.2f%%)", recipe.method, f"{trainable:,}",
             f"{total:,}", 100 * trainable / total)  # fmt: skip
    if fresh:
        log.info("new in this model, trained in full: %s", ", ".join(fresh))

    # Under torchrun or accelerate launch, every process trains its share; only the main one writes.
    main_process = int(os.environ.get("RANK", "0")) == 0
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if main_process:
        if run.path.exists() and overwrite:
            shutil.rmtree(run.path)
        if checkpoint is None:  # leftovers of a start that saved no checkpoint
            shutil.rmtree(run.checkpoints_dir, ignore_errors=True)
        run.path.mkdir(parents=True, exist_ok=True)
        run.write_text(rundir.RECIPE_FILE, recipe.to_yaml())

    primary = metric_names[0]
    on_gpu = torch.cuda.is_available()
    if recipe.model.quantized and not on_gpu and main_process:
        log.warning(
            "model.quantization=%s on a CPU trains slower than float32 (up to 1.5 times in our runs: bitsandbytes "
            "dequantizes the weights at every step) and saves little memory there; it pays on a GPU that cannot "
            "hold the float model. Set model.quantization=none to train in float32.",
            recipe.model.quantization,
        )
    arguments = _with_best_model_metric(recipe.training_arguments(str(run.checkpoints_dir)), primary)
    arguments.setdefault("dataloader_pin_memory", on_gpu)
    # Classification losses are means over the batch; transformers' token averaging across devices (meant for
    # language models) would multiply a peft model's loss by the number of processes, doubling the gradients
    # and the reported eval loss under two processes.
    arguments.setdefault("average_tokens_across_devices", False)
    if world_size > 1 and not on_gpu:
        # Without CUDA, transformers 5 runs each launched process on its own unless told to use the CPU
        # backend (gloo): then the processes share the data and average their gradients.
        arguments.setdefault("use_cpu", True)
    # Progress bars only where someone watches them: redrawn into a log file they leave escape codes behind.
    arguments.setdefault("disable_tqdm", not sys.stderr.isatty())
    args = TrainingArguments(**arguments)
    sampler = None
    if recipe.data.bucket_by_length and args.train_sampling_strategy == "random":
        sampler = LengthBucketSampler(train_lengths, args.per_device_train_batch_size, args.seed)
    # Evaluation order does not change the metrics: by length, its batches carry little padding too.
    eval_lengths = [len(ids) for ids in eval_set["input_ids"]]
    eval_set = eval_set.select(sorted(range(len(eval_set)), key=eval_lengths.__getitem__))

    # Read now: Trainer deletes old checkpoints (save_total_limit) before training ends.
    seconds_before = _seconds_before(checkpoint)

    class BucketTrainer(Trainer):
        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            return sampler if sampler is not None else super()._get_train_sampler(train_dataset)

    optimizer = METHODS[recipe.method].optimizer(model, recipe.method_block, args.learning_rate, args.weight_decay)
    trainer = BucketTrainer(
        model=model,
        args=args,
        optimizers=(optimizer, None),
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if on_gpu else None),
        processing_class=tokenizer,
        compute_metrics=metrics.trainer_metrics(metric_names, labels.problem_type),
        callbacks=[*callbacks, _elapsed_time(seconds_before)],
    )
    _log_lines(trainer)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    if checkpoint is not None:
        log.info("resuming %s from %s", run.path, checkpoint.name)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_seconds = seconds_before + time.perf_counter() - started
    # Evaluations during training take the same time whatever the method: throughput leaves them out.
    eval_seconds = sum(entry.get("eval_runtime", 0.0) for entry in trainer.state.log_history)
    step_seconds = max(train_seconds - eval_seconds, 1e-9)
    samples_seen = len(train_set) * (trainer.state.epoch or 0)
    history = _eval_history(trainer.state.log_history)
    tokens = sum(train_lengths) * (trainer.state.epoch or 0)
    if history and history[-1]["step"] == trainer.state.global_step and not args.load_best_model_at_end:
        eval_metrics = {k: v for k, v in history[-1].items() if k not in ("step", "epoch")}
    else:  # no evaluation at the last step, or the best checkpoint was reloaded: evaluate what is saved
        eval_metrics = _eval_metrics(trainer.evaluate())
    reported_epoch = trainer.state.epoch  # the epoch whose weights the run keeps: the last, or the best one's
    best = trainer.state.best_model_checkpoint if args.load_best_model_at_end else None
    if best:
        best_step = _step_of(Path(best))
        reported_epoch = next((h["epoch"] for h in history if h["step"] == best_step), reported_epoch)

    # Every process takes part: under FSDP or DeepSpeed the weights are gathered from all of them first.
    weights = run.weights_dir(METHODS[recipe.method].is_adapter)
    trainer.save_model(str(weights))  # the model and tokenizer Trainer trained, best checkpoint loaded into it
    if not main_process:
        log.info("rank %s of %d: eval %s", os.environ.get("RANK"), world_size, json.dumps(eval_metrics))
        return run
    (weights / "training_args.bin").unlink(missing_ok=True)  # a pickle; the run folder keeps recipe.yaml instead
    _tidy_adapter_config(weights / rundir.ADAPTER_CONFIG, recipe.model.name_or_path)
    run.write_json(rundir.LABELS_FILE, labels.to_json())
    columns = [*recipe.data.text_columns, recipe.data.label_column]
    samples = eval_raw.select(range(min(SAMPLES, len(eval_raw)))).select_columns(columns)
    run.write_text(rundir.SAMPLES_FILE, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in samples))

    base_id = modeling.hub_id(recipe.model)
    record = Metrics(
        name=recipe.name,
        method=recipe.method,
        base_model=recipe.model.name_or_path,
        # The folder the base was read from on this machine (a Hub id is its own name: none).
        base_model_path=None if base_id else local_path(recipe.model.name_or_path, "model.name_or_path"),
        problem_type=labels.problem_type,
        num_labels=labels.num_labels,
        primary_metric=Primary(
            name=primary,
            value=eval_metrics.get(primary),
            epoch=round(reported_epoch, 2) if reported_epoch is not None else None,
        ),
        eval=eval_metrics,
        eval_history=history,
        trainable_parameters=trainable,
        total_parameters=total,
        trainable_share=trainable / total,
        fresh_modules=fresh,
        learning_rate=recipe.learning_rate,
        train_samples=len(train_set),
        eval_samples=len(eval_set),
        global_steps=trainer.state.global_step,
        world_size=args.world_size,
        resumed_from_step=_step_of(checkpoint) if checkpoint else None,
        fit=fitted,
        tokenize_s=round(tokenize_seconds, 3),
        train_runtime_s=round(train_seconds, 3),
        eval_during_training_s=round(eval_seconds, 3),
        train_samples_per_second=round(samples_seen / step_seconds, 3),
        train_tokens_per_second=round(tokens / step_seconds, 1),
        train_loss=result.metrics.get("train_loss"),
        peak_memory_mb=_peak_memory_mb(on_gpu),
        peak_memory_kind="cuda_max_allocated" if on_gpu else "process_max_rss",
        model_memory_mb=round(modeling.memory_footprint(model) / 2**20, 2),
        weights_mb=round(_size_on_disk(weights) / 2**20, 3),
        standalone_model_mb=round(_standalone_bytes(model, base_parameters, METHODS[recipe.method]) / 2**20, 3),
        quantization=recipe.model.quantization,
        device=str(args.device),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        versions=library_versions(),
        overrides=list(overrides),
        recipe_sha256=recipe.sha256(),
        finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    if METHODS[recipe.method].is_adapter:  # peft's README.md is an empty template: a card that says what this is
        place = card.folder_place(recipe.name, weights, run.path)
        text = card.model_card(recipe, record, labels, place, "peft", base_id)
        (weights / rundir.CARD_FILE).write_text(text, encoding="utf-8")
    run.write_json(rundir.METRICS_FILE, record.to_json())  # last: its presence marks the run complete
    return run


def _resume_point(run: rundir.RunDir, recipe: Recipe, resume: bool, overwrite: bool) -> Path | None:
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
                f"{run.path} holds an interrupted run (last checkpoint at step {_step_of(checkpoint)}); "
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
    if checkpoint is not None and not METHODS[recipe.method].checkpoints_reload(recipe.method_block):
        raise PeftuneError(
            f"{run.path} cannot be resumed: with prefix.prefix_projection=true peft checkpoints the projected "
            "prefixes, not the projection being trained; pass --overwrite to start again"
        )
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
        if folder.name.removeprefix(rundir.CHECKPOINT_PREFIX).isdigit() and (folder / "trainer_state.json").is_file()
    ]
    return max(complete, key=_step_of, default=None)


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix(rundir.CHECKPOINT_PREFIX))


def _seconds_before(checkpoint: Path | None) -> float:
    """Training seconds spent up to `checkpoint`: 0 from the start, or when the checkpoint does not say."""
    try:
        return float(json.loads((checkpoint / rundir.ELAPSED_FILE).read_text())["train_seconds"]) if checkpoint else 0.0
    except (OSError, ValueError, KeyError):
        return 0.0


def _tidy_adapter_config(config_file: Path, base_name: str) -> None:
    """The saved adapter names its base as the recipe does (a Hub id, a pkg:// path), not by the folder it was
    read from on this machine (metrics.json keeps that); peft adds the head's usual names to `modules_to_save`
    for classification: the saved list names each once."""
    if not config_file.is_file():
        return
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base_name
    if isinstance(config.get("modules_to_save"), list):
        config["modules_to_save"] = list(dict.fromkeys(config["modules_to_save"]))
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


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


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries a run depends on."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _with_best_model_metric(kwargs: dict[str, Any], primary: str) -> dict[str, Any]:
    """Keeping the best checkpoint ranks by the primary metric unless the recipe names another."""
    if kwargs.get("load_best_model_at_end") and not kwargs.get("metric_for_best_model"):
        kwargs = {**kwargs, "metric_for_best_model": f"eval_{primary}"}
        kwargs.setdefault("greater_is_better", primary not in metrics.LOWER_IS_BETTER)
    return kwargs


def _eval_metrics(logged: dict[str, Any]) -> dict[str, Any]:
    """Metric values from a Trainer evaluation log entry, without the `eval_` prefix and timings."""
    return {
        key.removeprefix("eval_"): value
        for key, value in logged.items()
        if key.startswith("eval_") and not key.endswith(("_runtime", "_per_second"))
    }


def _size_on_disk(folder: Path) -> int:
    """Bytes of the saved weights (adapter or model), without the tokenizer and configs."""
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _standalone_bytes(model: Any, base_parameters: int, method: Any) -> int:
    """Size of the standalone model the run yields, in float32 (merge and export reload the base in it).

    Full runs and merged adapters have the base's parameters; prefix and prompt adapters cannot be merged,
    so their standalone model (an export) carries the trained virtual tokens beside the base.
    """
    virtual = (p.numel() for name, p in model.named_parameters() if "prompt_encoder" in name)
    extra = sum(virtual) if method.virtual_tokens else 0
    return (base_parameters + extra) * 4


def _eval_history(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per evaluation during training: step, epoch and the metrics."""
    return [
        {"step": entry["step"], "epoch": entry.get("epoch"), **_eval_metrics(entry)}
        for entry in log_history
        if "eval_loss" in entry
    ]


def _peak_memory_mb(on_gpu: bool) -> float:
    if on_gpu:
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    # ru_maxrss is in kilobytes on Linux and bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, 1)
