"""Training, in named steps: place the run, prepare the data, build the model, fit it, write the run folder."""

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
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from peftune import card, data, losses, metrics, modeling, plan, pooling, rundir, trainer
from peftune.batching import LengthBucketSampler, TokenBudgetBatches, auto_budget
from peftune.data import Labels
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
    from transformers import set_seed

    recipe, folder = placed(recipe, overrides, output_dir)
    run = rundir.RunDir(folder)
    recipe, fitted = _fit_to_memory(recipe, fit)
    check_passthrough(recipe)  # a mistake in the recipe first: before a clash of folders, before any output
    modeling.check_model(recipe, modeling.load_config(recipe.model))
    recipe = pooling.resolved(recipe)  # null: the checkpoint's own, which recipe.yaml records
    checkpoint = trainer.resume_point(run, recipe, resume, overwrite)
    if announce is not None:
        announce(recipe, run)
    set_seed(recipe.seed)
    prepared = prepare_data(recipe)
    built = build_model(recipe, prepared.labels)
    # Under torchrun or accelerate launch, every process trains its share; only the main one writes.
    main_process = _is_main_process()
    if main_process:
        _start_folder(run, recipe, checkpoint, overwrite)
    done = fit_model(run, recipe, prepared, built, checkpoint, callbacks)
    if recipe.data.thresholds == "tune" and prepared.labels.multi_label:
        _tune_thresholds(recipe, prepared, done)
    # Every process takes part: under FSDP or DeepSpeed the weights are gathered from all of them first.
    weights = run.weights_dir(METHODS[recipe.method].is_adapter)
    done.trainer.save_model(str(weights))  # the model and tokenizer Trainer trained, best checkpoint loaded into it
    if not main_process:
        log.info("rank %s of %s: eval %s", os.environ.get("RANK"), os.environ.get("WORLD_SIZE"), json.dumps(done.eval))
        return run
    record = _record(recipe, overrides, fitted, prepared, built, done, weights)
    _write_run(run, recipe, prepared, record, weights)
    return run


@dataclass
class Prepared:
    """The run's data, tokenized, with what was learnt reading it."""

    tokenizer: Any
    labels: Labels
    metric_names: list[str]
    eval_raw: Any  # the eval split before tokenizing: the rows kept for merge's and export's checks
    train_set: Any
    eval_set: Any  # sorted by length: fewer padded tokens, same metrics
    train_lengths: list[int]  # tokens per training example: length buckets and tokens/s
    tokenize_seconds: float
    class_weights: list[float] | None  # train.class_weights resolved, one per label; None: unweighted loss
    eval_documents: list[int] | None = None  # chunked long texts: the eval text each eval row (a window) is of
    texts: tuple[int, int] | None = None  # chunked long texts: train and eval texts (the sets hold windows)


@dataclass
class Built:
    """The model to train, and its parameter counts."""

    model: Any
    fresh: list[str]  # modules new in this model (the head), trained in full
    base_parameters: int
    trainable: int
    total: int


@dataclass
class Done:
    """What training left: the Trainer (its state and arguments) and the measurements the record needs."""

    trainer: Any
    train_loss: float | None
    train_seconds: float
    eval_seconds: float  # evaluations during training, left out of the throughput
    eval: dict[str, Any]  # the final evaluation of the weights the run keeps
    history: list[dict[str, Any]]
    epoch: float | None  # the epoch those weights come from: the last, or the best one's
    resumed_from: Path | None
    batch_tokens: int | None  # the training batches' token budget; None: batches of a count of texts


def _is_main_process() -> bool:
    """Rank 0 under torchrun or accelerate launch, or a single process."""
    return int(os.environ.get("RANK", "0")) == 0


def _fit_to_memory(recipe: Recipe, fit: str | None) -> tuple[Recipe, dict[str, Any] | None]:
    """With `--fit`, the batch size, accumulation and checkpointing that fit the memory budget, chosen first."""
    if fit is None:
        return recipe, None
    recipe, fitted = plan.fit(recipe, plan.parse_memory(fit), fit)
    log.info("fit %s: per-device batch %d, gradient accumulation %d, gradient checkpointing %s "
             "(estimate %d MB)", fit, fitted["per_device_train_batch_size"], fitted["gradient_accumulation_steps"],
             "on" if fitted["gradient_checkpointing"] else "off", fitted["estimate_mb"])  # fmt: skip
    return recipe, fitted


def prepare_data(recipe: Recipe) -> Prepared:
    """Load the recipe's splits, learn their labels, check the metrics fit them, and tokenize."""
    tokenizer = modeling.load_tokenizer(recipe.model)
    train_raw, eval_raw = data.load_splits(recipe.data, recipe.seed)
    labels = data.infer_labels(recipe.data, train_raw, eval_raw)
    metric_names = recipe.metrics or metrics.default_metrics(labels.problem_type)
    metrics.check_metrics(metric_names, labels.problem_type)
    tokenizing = time.perf_counter()
    train_set = data.tokenize(train_raw, tokenizer, recipe.data, labels, recipe.data.train_split)
    eval_set = data.tokenize(eval_raw, tokenizer, recipe.data, labels, recipe.data.eval_split)
    tokenize_seconds = time.perf_counter() - tokenizing
    log.info(
        "%s: %d train / %d eval examples, %s", recipe.name, len(train_raw), len(eval_raw),
        f"{labels.num_labels} labels" + (" (multi-label)" if labels.multi_label else "") if labels.names
        else "regression",
    )  # fmt: skip
    eval_lengths = [len(ids) for ids in eval_set["input_ids"]]
    eval_set = eval_set.select(sorted(range(len(eval_set)), key=eval_lengths.__getitem__))
    documents, texts = None, None
    if data.DOCUMENT in eval_set.column_names:  # chunked: metrics pool each text's windows
        documents, texts = list(eval_set[data.DOCUMENT]), (len(train_raw), len(eval_raw))
        train_set, eval_set = train_set.remove_columns(data.DOCUMENT), eval_set.remove_columns(data.DOCUMENT)
    train_lengths = [len(ids) for ids in train_set["input_ids"]]
    train_labels = list(train_set["labels"])
    weights = losses.class_weights(recipe.train.get("class_weights"), labels, train_labels)
    losses.warn_if_skewed(labels, train_labels, weighted=weights is not None)
    return Prepared(tokenizer, labels, metric_names, eval_raw, train_set, eval_set, train_lengths, tokenize_seconds,
                    weights, documents, texts)  # fmt: skip


def build_model(recipe: Recipe, labels: Labels) -> Built:
    """The base with a head for `labels`, wrapped for the recipe's method."""
    base, fresh = modeling.load_base_model(recipe.model, labels, modeling.compute_dtype(recipe.train))
    _, base_parameters = modeling.count_parameters(base)
    model = modeling.attach_method(base, recipe, fresh)
    trainable, total = modeling.count_parameters(model)
    log.info("method %s: %s of %s parameters trainable (%.2f%%)", recipe.method, f"{trainable:,}",
             f"{total:,}", 100 * trainable / total)  # fmt: skip
    if fresh:
        log.info("new in this model, trained in full: %s", ", ".join(fresh))
    return Built(model, fresh, base_parameters, trainable, total)


def _start_folder(run: rundir.RunDir, recipe: Recipe, checkpoint: Path | None, overwrite: bool) -> None:
    """The run folder as training starts: emptied by --overwrite, the recipe written first."""
    if run.path.exists() and overwrite:
        shutil.rmtree(run.path)
    if checkpoint is None:  # leftovers of a start that saved no checkpoint
        shutil.rmtree(run.checkpoints_dir, ignore_errors=True)
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_text(rundir.RECIPE_FILE, recipe.to_yaml())


def training_arguments(recipe: Recipe, run: rundir.RunDir, primary: str) -> Any:
    """TrainingArguments from the recipe's `train` block, with peftune's defaults for this machine."""
    import torch
    from transformers import TrainingArguments

    on_gpu = torch.cuda.is_available()
    arguments = _with_best_model_metric(recipe.training_arguments(str(run.checkpoints_dir)), primary)
    arguments.setdefault("dataloader_pin_memory", on_gpu)
    # Classification losses are means over the batch; transformers' token averaging across devices (meant for
    # language models) would multiply a peft model's loss by the number of processes, doubling the gradients
    # and the reported eval loss under two processes.
    arguments.setdefault("average_tokens_across_devices", False)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not on_gpu:
        # Without CUDA, transformers 5 runs each launched process on its own unless told to use the CPU
        # backend (gloo): then the processes share the data and average their gradients.
        arguments.setdefault("use_cpu", True)
    # Progress bars only where someone watches them: redrawn into a log file they leave escape codes behind.
    arguments.setdefault("disable_tqdm", not sys.stderr.isatty())
    return TrainingArguments(**arguments)


def _batch_tokens(recipe: Recipe, train_lengths: Sequence[int]) -> int | None:
    """The token budget of the training batches (`train.batch_tokens`, auto resolved), None for a count of texts."""
    budget = recipe.train.get("batch_tokens")
    if budget == "auto":
        return auto_budget(train_lengths, int(recipe.train["per_device_train_batch_size"]), recipe.data.max_length)
    return budget


def fit_model(
    run: rundir.RunDir, recipe: Recipe, prepared: Prepared, built: Built, checkpoint: Path | None,
    callbacks: Sequence[Any],
) -> Done:  # fmt: skip
    """Train with transformers' Trainer (from `checkpoint` when resuming) and evaluate the weights it keeps."""
    import torch

    primary = prepared.metric_names[0]
    if recipe.model.quantized and not torch.cuda.is_available() and _is_main_process():
        log.warning(
            "model.quantization=%s on a CPU trains slower than float32 (up to 1.5 times in our runs: bitsandbytes "
            "dequantizes the weights at every step) and saves little memory there; it pays on a GPU that cannot "
            "hold the float model. Set model.quantization=none to train in float32.",
            recipe.model.quantization,
        )
    args = training_arguments(recipe, run, primary)
    own_epochs = recipe.method_block.get("num_train_epochs")
    if own_epochs is not None and own_epochs != recipe.train["num_train_epochs"] and _is_main_process():
        log.info("%s trains %g epochs (%s.num_train_epochs), not train.num_train_epochs=%g", recipe.method,
                 own_epochs, recipe.method, recipe.train["num_train_epochs"])  # fmt: skip
    sampler: LengthBucketSampler | TokenBudgetBatches | None = None
    budget = _batch_tokens(recipe, prepared.train_lengths)
    if budget is not None:
        sampler = TokenBudgetBatches(prepared.train_lengths, budget, args.seed)
    elif recipe.data.bucket_by_length and args.train_sampling_strategy == "random":
        sampler = LengthBucketSampler(prepared.train_lengths, args.per_device_train_batch_size, args.seed)
    before = trainer.seconds_before(checkpoint)
    hf_trainer = trainer.build_trainer(
        built.model, args, sampler=sampler,
        optimizer=METHODS[recipe.method].optimizer(built.model, recipe.method_block, args.learning_rate,
                                                   args.weight_decay),
        train_set=prepared.train_set, eval_set=prepared.eval_set, tokenizer=prepared.tokenizer,
        compute_metrics=metrics.trainer_metrics(
            prepared.metric_names, prepared.labels.problem_type, prepared.labels.thresholds,
            prepared.eval_documents, recipe.data.window_pooling),
        callbacks=callbacks, seconds_before=before,
        compute_loss=losses.weighted_loss(prepared.class_weights, prepared.labels.multi_label)
        if prepared.class_weights else None,
    )  # fmt: skip
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if checkpoint is not None:
        log.info("resuming %s from %s", run.path, checkpoint.name)
    started = time.perf_counter()
    result = hf_trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_seconds = before + time.perf_counter() - started
    state = hf_trainer.state
    history = _eval_history(state.log_history)
    if history and history[-1]["step"] == state.global_step and not args.load_best_model_at_end:
        final = {k: v for k, v in history[-1].items() if k not in ("step", "epoch")}
    else:  # no evaluation at the last step, or the best checkpoint was reloaded: evaluate what is saved
        final = _eval_metrics(hf_trainer.evaluate())
    epoch = state.epoch
    best = state.best_model_checkpoint if args.load_best_model_at_end else None
    if best:
        best_step = trainer.step_of(Path(best))
        epoch = next((h["epoch"] for h in history if h["step"] == best_step), epoch)
    return Done(
        trainer=hf_trainer,
        train_loss=result.metrics.get("train_loss"),
        train_seconds=train_seconds,
        eval_seconds=sum(entry.get("eval_runtime", 0.0) for entry in state.log_history),
        eval=final,
        history=history,
        epoch=epoch,
        resumed_from=checkpoint,
        batch_tokens=budget,
    )


def _tune_thresholds(recipe: Recipe, prepared: Prepared, done: Done) -> None:
    """`data.thresholds=tune`: each label's threshold chosen for its best F1 on the eval split, kept in the run's
    labels, and the final metrics computed again at them (on the split they were chosen on: optimistic)."""
    import dataclasses

    output = done.trainer.predict(prepared.eval_set)
    logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
    logits, targets = metrics.per_text(logits, output.label_ids, prepared.eval_documents, recipe.data.window_pooling)
    chosen = metrics.tune_thresholds(logits, targets)
    prepared.labels = dataclasses.replace(prepared.labels, thresholds=tuple(chosen))
    done.eval.update(metrics.compute_metrics(prepared.metric_names, logits, targets, "multi_label", chosen))
    assert prepared.labels.names is not None
    log.info("thresholds tuned on %r: %s", recipe.data.eval_split,
             ", ".join(f"{n} {t:g}" for n, t in zip(prepared.labels.names, chosen, strict=True)))  # fmt: skip


def _record(
    recipe: Recipe, overrides: Sequence[str], fitted: dict[str, Any] | None, prepared: Prepared, built: Built,
    done: Done, weights: Path,
) -> Metrics:  # fmt: skip
    """metrics.json: what the run is, how well it did, what it cost."""
    import torch

    state, args, model, labels = done.trainer.state, done.trainer.args, built.model, prepared.labels
    primary = prepared.metric_names[0]
    step_seconds = max(done.train_seconds - done.eval_seconds, 1e-9)
    epochs = state.epoch or 0
    on_gpu = torch.cuda.is_available()
    # The folder the base was read from on this machine (a Hub id is its own name: none).
    base_path = None if modeling.hub_id(recipe.model) else local_path(recipe.model.name_or_path, "model.name_or_path")
    return Metrics(
        name=recipe.name,
        method=recipe.method,
        base_model=recipe.model.name_or_path,
        base_model_path=base_path,
        problem_type=prepared.labels.problem_type,
        num_labels=prepared.labels.num_labels,
        primary_metric=Primary(
            name=primary,
            value=done.eval.get(primary),
            epoch=round(done.epoch, 2) if done.epoch is not None else None,
        ),
        eval=done.eval,
        eval_history=done.history,
        trainable_parameters=built.trainable,
        total_parameters=built.total,
        trainable_share=built.trainable / built.total,
        fresh_modules=built.fresh,
        learning_rate=recipe.learning_rate,
        class_weights=prepared.class_weights,
        batch_tokens=done.batch_tokens,
        thresholds=dict(zip(labels.names or (), labels.thresholds or (), strict=True)) if labels.multi_label else None,
        thresholds_tuned_on=recipe.data.eval_split if labels.multi_label and recipe.data.thresholds == "tune" else None,
        train_samples=prepared.texts[0] if prepared.texts else len(prepared.train_set),
        eval_samples=prepared.texts[1] if prepared.texts else len(prepared.eval_set),
        train_windows=len(prepared.train_set) if prepared.texts else None,
        eval_windows=len(prepared.eval_set) if prepared.texts else None,
        global_steps=state.global_step,
        world_size=args.world_size,
        resumed_from_step=trainer.step_of(done.resumed_from) if done.resumed_from else None,
        fit=fitted,
        tokenize_s=round(prepared.tokenize_seconds, 3),
        train_runtime_s=round(done.train_seconds, 3),
        eval_during_training_s=round(done.eval_seconds, 3),
        train_samples_per_second=round(len(prepared.train_set) * epochs / step_seconds, 3),
        train_tokens_per_second=round(sum(prepared.train_lengths) * epochs / step_seconds, 1),
        train_loss=done.train_loss,
        peak_memory_mb=_peak_memory_mb(on_gpu),
        peak_memory_kind="cuda_max_allocated" if on_gpu else "process_max_rss",
        model_memory_mb=round(modeling.memory_footprint(model) / 2**20, 2),
        weights_mb=round(_size_on_disk(weights) / 2**20, 3),
        standalone_model_mb=round(_standalone_bytes(model, built.base_parameters, METHODS[recipe.method]) / 2**20, 3),
        quantization=recipe.model.quantization,
        device=str(args.device),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        versions=library_versions(),
        overrides=list(overrides),
        recipe_sha256=recipe.sha256(),
        finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _write_run(run: rundir.RunDir, recipe: Recipe, prepared: Prepared, record: Metrics, weights: Path) -> None:
    """Everything but the weights, metrics.json last: its presence marks the run complete."""
    (weights / rundir.TRAINING_ARGS).unlink(missing_ok=True)  # a pickle; the run folder keeps recipe.yaml instead
    _tidy_adapter_config(weights / rundir.ADAPTER_CONFIG, recipe.model.name_or_path)
    run.write_json(rundir.LABELS_FILE, prepared.labels.to_json())
    columns = [*recipe.data.text_columns, recipe.data.label_column]
    eval_raw = prepared.eval_raw
    samples = eval_raw.select(range(min(SAMPLES, len(eval_raw)))).select_columns(columns)
    run.write_text(rundir.SAMPLES_FILE, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in samples))
    if METHODS[recipe.method].is_adapter:  # peft's README.md is an empty template: a card that says what this is
        place = card.folder_place(recipe.name, weights, run.path)
        text = card.model_card(recipe, record, prepared.labels, place, "peft", modeling.hub_id(recipe.model))
        (weights / rundir.CARD_FILE).write_text(text, encoding="utf-8")
    run.write_json(rundir.METRICS_FILE, record.to_json())


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
