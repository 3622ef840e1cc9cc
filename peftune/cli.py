"""The command line: each command parses its arguments, calls one function and prints the result.

Heavy libraries (torch, transformers, peft) are imported inside the functions a command calls, so
`peftune --help` and `peftune recipes` start instantly.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

import click

from peftune import __version__
from peftune.errors import PeftuneError

if TYPE_CHECKING:
    from peftune.recipe import Recipe
    from peftune.record import Metrics
    from peftune.rundir import RunDir


class _Group(click.Group):
    """Catches the one user-error type (and click's usage errors) once: one line on stderr, exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PeftuneError as err:
            if ctx.params.get("debug"):
                raise
            click.echo(f"error: {err}", err=True)
            ctx.exit(2)
        except click.UsageError as err:  # a missing argument, an unknown option or command: one line too
            if ctx.params.get("debug"):
                raise
            where = err.ctx.command_path if err.ctx else ctx.command_path
            click.echo(f"error: {err.format_message().rstrip('.')}; see {where} --help", err=True)
            ctx.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="peftune")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
@click.option("-q", "--quiet", is_flag=True, help="Log warnings only.")
def main(debug: bool, quiet: bool) -> None:
    """Fine-tune text classifiers: full fine-tuning, LoRA and prefix tuning, from YAML recipes."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    if not debug:
        _quiet_libraries()
    # Library chatter: transformers' load reports (peftune logs the new modules itself), and bitsandbytes'
    # note on every int8 matmul that fp32 inputs are cast to fp16, which is how its int8 kernels work.
    for noisy in ("transformers", "datasets", "peft", "accelerate", "httpx", "huggingface_hub", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _quiet_libraries() -> None:
    """What the libraries say that a user of peftune cannot act on, off (`--debug` keeps it all).

    transformers' load report lists the head as missing on every load (peftune logs what is new itself), its
    progress bars for loading and writing weights and datasets' for reading files redraw into logs, and their
    FutureWarnings are about their own internals.
    """
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    # The variables are read on import; where a library is imported already (peftune called from Python):
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].logging.set_verbosity_error()
        sys.modules["transformers"].logging.disable_progress_bar()


overrides_argument = click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")


@main.command("recipes")
def recipes_command() -> None:
    """List the shipped recipes."""
    from peftune.recipe import list_recipes

    rows = [("NAME", "TASK", "MODEL", "METHOD", "DESCRIPTION")]
    rows += [(r.name, r.task, r.model, r.method, r.description) for r in list_recipes()]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)) + "  " + row[4])


@main.command("show")
@click.argument("recipe")
@overrides_argument
def show_command(recipe: str, overrides: tuple[str, ...]) -> None:
    """Print the resolved RECIPE (a shipped name or a YAML path) with every default filled in."""
    from peftune.recipe import check_passthrough, load_recipe

    resolved = load_recipe(recipe, overrides)
    check_passthrough(resolved)  # the keys handed to peft and Trainer too: a typo is not a recipe to show
    click.echo(resolved.to_yaml(), nl=False)


@main.command("copy")
@click.argument("recipe")
@click.argument("dest", type=click.Path())
@click.option("--force", is_flag=True, help="Overwrite DEST if it exists.")
def copy_command(recipe: str, dest: str, force: bool) -> None:
    """Copy RECIPE to DEST (a file or a folder) to edit it."""
    from peftune.recipe import copy_recipe

    click.echo(f"copied {recipe} to {copy_recipe(recipe, dest, force)}")


@main.command("validate")
@click.argument("recipe")
@overrides_argument
def validate_command(recipe: str, overrides: tuple[str, ...]) -> None:
    """Check RECIPE and its overrides without loading weights or data."""
    from peftune.modeling import check_model_if_reachable
    from peftune.recipe import check_passthrough, load_recipe

    resolved = load_recipe(recipe, overrides)
    check_passthrough(resolved)
    checked = check_model_if_reachable(resolved)
    note = "" if checked else "; the model's config is not reachable offline, so its checks run when training starts"
    click.echo(f"ok: {resolved.name} ({resolved.method} on {resolved.model.name_or_path}){note}")


@main.command("plan")
@click.argument("recipe")
@overrides_argument
@click.option("--memory", help="Memory of your GPU, e.g. 8GB (default: columns for 8, 12, 16 and 24 GB).")
def plan_command(recipe: str, overrides: tuple[str, ...], memory: str | None) -> None:
    """Estimate RECIPE's peak training memory under each method, without loading weights, and what fits."""
    from peftune.plan import BUDGETS_GB, parse_memory, plan, render

    budgets = [parse_memory(memory)] if memory else [size * 2**30 for size in BUDGETS_GB]
    click.echo(render(plan(recipe, overrides), budgets, memory))


@main.command("train")
@click.argument("recipe")
@overrides_argument
@click.option("--output-dir", type=click.Path(), help="Run folder (default: the recipe's output_dir or runs/NAME).")
@click.option("--overwrite", is_flag=True, help="Replace a complete or interrupted run in the run folder.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last checkpoint.")
@click.option("--fit", help="Choose batch size, accumulation and checkpointing to fit this memory, e.g. 8GB.")
def train_command(
    recipe: str, overrides: tuple[str, ...], output_dir: str | None, overwrite: bool, resume: bool, fit: str | None
) -> None:
    """Fine-tune with RECIPE (a shipped name or a YAML path); KEY=VALUE overrides any recipe key."""
    import os

    from peftune.recipe import load_recipe
    from peftune.train import train

    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun, only the main process reports

    def announce(resolved: Recipe, run: RunDir) -> None:  # once the recipe and the folder are checked
        if main_process:
            click.echo(resolved.to_yaml())
            click.echo(f"run folder: {run.path}", err=True)

    run = train(load_recipe(recipe, overrides), output_dir=output_dir, overrides=overrides, overwrite=overwrite,
                resume=resume, fit=fit, announce=announce)  # fmt: skip
    if main_process:
        click.echo("\n" + summary_line(run.read_metrics()))
        click.echo(f"run folder: {run.path}")


def summary_line(record: Metrics) -> str:
    """`name: metric value on N eval examples (method on its base, trainable parameters, time, epoch)`."""
    from peftune.recipe import ON_BASE

    primary = record.primary_metric
    where = f", epoch {primary.epoch:g}" if primary.epoch is not None else ""
    return (
        f"{record.name}: {primary.name} {primary.value:.4f} on {record.eval_samples} eval examples "
        f"({record.method}{ON_BASE.get(record.quantization, '')}, {record.trainable_parameters:,} trainable "
        f"parameters, {record.train_runtime_s:.0f} s{where})"
    )


@main.command("eval")
@click.argument("target")
@overrides_argument
@click.option("--split", help="Split to score (default: the recipe's eval split).")
@click.option("--output", type=click.Path(), help="JSON file to write (default: TARGET/eval-SPLIT.json).")
@click.option("--batch-size", default=64, show_default=True)
def eval_command(
    target: str, overrides: tuple[str, ...], split: str | None, output: str | None, batch_size: int
) -> None:
    """Score TARGET (a run folder or a merged folder) again; data.KEY=VALUE points it at other data."""
    from peftune.evaluation import evaluate, format_result

    result = evaluate(target, split=split, overrides=overrides, output=output, batch_size=batch_size)
    click.echo(format_result(result))
    if "written_to" in result:
        plot = result.get("confusion_matrix_plot")
        click.echo(f"\nwritten to {result['written_to']}" + (f" (confusion matrix: {plot})" if plot else ""))


@main.command("predict")
@click.argument("target")
@click.option("--text", "texts", multiple=True, help="A text to classify (repeat for more).")
@click.option("--pair", "pairs", multiple=True, help="The second sentence of each --text, for a pair model.")
@click.option("--input", "input_path", type=click.Path(), help="CSV, TSV, JSONL or parquet file to classify.")
@click.option("--output", "output_path", type=click.Path(), help="Where to write predictions (.csv, .tsv, .jsonl).")
@click.option("--text-column", "text_columns", multiple=True, help="Text column(s) of --input (default: the recipe's).")
@click.option("--probabilities", is_flag=True, help="Add the probability of every class.")
@click.option("--batch-size", default=64, show_default=True)
def predict_command(
    target: str,
    texts: tuple[str, ...],
    pairs: tuple[str, ...],
    input_path: str | None,
    output_path: str | None,
    text_columns: tuple[str, ...],
    probabilities: bool,
    batch_size: int,
) -> None:
    """Classify text with TARGET: a run folder, a merged or exported folder, or a Hub model id."""
    import json

    from peftune.predict import predict_file, predict_texts

    if bool(texts) == bool(input_path):
        raise click.UsageError("give either --text (one or more) or --input FILE --output FILE")
    if input_path:
        if not output_path:
            raise click.UsageError("--input needs --output FILE")
        rows = predict_file(target, input_path, output_path, text_columns, batch_size, probabilities)
        click.echo(f"wrote {rows} predictions to {output_path}")
        return
    for record in predict_texts(target, texts, pairs or None, batch_size, probabilities):
        click.echo(json.dumps(record, ensure_ascii=False))


@main.command("merge")
@click.argument("run")
@click.option("--output", type=click.Path(), help="Folder for the merged model (default: RUN/merged).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True)
def merge_command(run: str, output: str | None, dtype: str) -> None:
    """Fold RUN's LoRA (or IA3) adapter into its base: a standalone model folder, checked against the adapter."""
    import json

    from peftune.merge import merge_adapter
    from peftune.record import MergeRecord
    from peftune.rundir import MERGE_FILE

    folder = merge_adapter(run, output=output, dtype=dtype)
    check = MergeRecord.from_json(json.loads((folder / MERGE_FILE).read_text())).check
    agreement = f", label agreement {check.label_agreement:.3f}" if check.label_agreement is not None else ""
    click.echo(
        f"merged into {folder} ({dtype}); on {check.samples} eval rows: "
        f"max |logit difference| {check.max_abs_logit_difference:.2e}{agreement}"
    )


@main.command("export")
@click.argument("target")
@click.option("--format", "fmt", type=click.Choice(["onnx", "safetensors"]), required=True)
@click.option(
    "--output",
    type=click.Path(),
    help="Folder to create (default: TARGET/export-FORMAT; ./NAME-export-FORMAT for a Hub id).",
)
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True)
def export_command(target: str, fmt: str, output: str | None, dtype: str) -> None:
    """Export TARGET (a run folder, a merged folder, or a run pushed to the Hub) as ONNX or safetensors."""
    from peftune.export import export_model

    folder, record = export_model(target, fmt, output=output, dtype=dtype)
    details = []
    if record.merge_check:
        details.append(
            f"merged, vs the adapter max |logit difference| {record.merge_check.max_abs_logit_difference:.2e}"
        )
    if record.check:
        details.append(f"onnxruntime vs PyTorch max |logit difference| {record.check.max_abs_logit_difference:.2e}")
    click.echo(f"exported {fmt} ({dtype}) to {folder}" + "".join(f"; {d}" for d in details))


@main.command("compare")
@click.argument("runs", nargs=-1, required=True)
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "csv", "json"]), default="table",
              show_default=True)  # fmt: skip
@click.option("--sort", help="Column to sort by, ascending; -COLUMN for descending (e.g. --sort -metric).")
@click.option("--plot", "plot_file", type=click.Path(), help="Draw eval curves and trade-off charts into FILE.png.")
def compare_command(runs: tuple[str, ...], fmt: str, sort: str | None, plot_file: str | None) -> None:
    """Compare run folders side by side: metric, trainable parameters, time, memory, size."""
    from peftune.compare import compare_runs

    click.echo(compare_runs(runs, fmt, sort, plot_file), nl=False)
    if plot_file:
        click.echo(f"chart written to {plot_file}", err=True)


@main.command("sweep")
@click.argument("recipe")
@overrides_argument
@click.option("--grid", "grids", multiple=True, required=True, help="KEY=V1,V2,... (repeat for a product).")
@click.option("--output-dir", type=click.Path(), help="Sweep folder (default: runs/NAME-sweep).")
def sweep_command(recipe: str, overrides: tuple[str, ...], grids: tuple[str, ...], output_dir: str | None) -> None:
    """Train the product of the grids on RECIPE, one run each, and write a comparison report.

    Runs already complete in the sweep folder are reused, so an interrupted sweep resumes.
    """
    from peftune.compare import best_first, collect, render
    from peftune.rundir import SWEEP_REPORT_FILE
    from peftune.sweep import sweep

    result = sweep(recipe, grids, overrides, output_dir, echo=click.echo)
    if result.runs:
        click.echo("\n" + render(best_first(collect(result.runs)), "table"), nl=False)
    click.echo(f"\nreport: {result.path / SWEEP_REPORT_FILE}")


@main.command("push")
@click.argument("run")
@click.option("--repo-id", required=True, help="NAMESPACE/NAME of the model repository.")
@click.option("--merged", is_flag=True, help="Push the standalone merged model instead of the adapter.")
@click.option("--private/--public", default=True, show_default=True, help="Visibility of a new repository.")
@click.option("--revision", help="Branch to push to (created when missing).")
@click.option("--commit-message", help="Commit message (default: Upload RUN).")
@click.option("--base-model-id", help="Hub id of the base model, when the run loaded it from a local folder.")
@click.option("--license", "license_id", help="License id for the card, e.g. apache-2.0.")
@click.option("--dry-run", is_flag=True, help="Write the folder that would be uploaded, list it, send nothing.")
@click.option("--output", type=click.Path(), help="Where --dry-run writes the folder (default: RUN/hub-upload).")
def push_command(
    run: str,
    repo_id: str,
    merged: bool,
    private: bool,
    revision: str | None,
    commit_message: str | None,
    base_model_id: str | None,
    license_id: str | None,
    dry_run: bool,
    output: str | None,
) -> None:
    """Push RUN's adapter (or --merged model) to the Hugging Face Hub with a model card."""
    from peftune.push import push

    result = push(
        run, repo_id, merged=merged, private=private, revision=revision, commit_message=commit_message,
        dry_run=dry_run, base_model_id=base_model_id, license=license_id, output=output,
        echo=lambda line: click.echo(line, err=True),
    )  # fmt: skip
    for name, size in result.files:
        click.echo(f"{size:>12,}  {name}")
    if dry_run:
        click.echo(f"dry run: nothing sent; the folder that would be uploaded to {repo_id} is {result.folder}")
    else:
        click.echo(f"pushed to {repo_id}: {result.url}")
