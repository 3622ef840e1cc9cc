"""The command line: each command parses its arguments, calls one function and prints the result.

Heavy libraries (torch, transformers, peft) are imported inside the functions a command calls, so
`peftune --help` and `peftune recipes` start instantly.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from peftune import __version__
from peftune.errors import PeftuneError


class _Group(click.Group):
    """Catches the one user-error type once: one line on stderr, exit code 2, no traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PeftuneError as err:
            if ctx.params.get("debug"):
                raise
            click.echo(f"error: {err}", err=True)
            ctx.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="peftune")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
@click.option("-q", "--quiet", is_flag=True, help="Log warnings only.")
def main(debug: bool, quiet: bool) -> None:
    """Fine-tune text classifiers: full fine-tuning, LoRA and prefix tuning, from YAML recipes."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("transformers", "datasets", "peft", "accelerate", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


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
    from peftune.recipe import load_recipe

    click.echo(load_recipe(recipe, overrides).to_yaml(), nl=False)


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
    from peftune.recipe import check_passthrough, load_recipe

    resolved = load_recipe(recipe, overrides)
    check_passthrough(resolved)
    click.echo(f"ok: {resolved.name} ({resolved.method} on {resolved.model.name_or_path})")


@main.command("train")
@click.argument("recipe")
@overrides_argument
@click.option("--output-dir", type=click.Path(), help="Run folder (default: the recipe's output_dir or runs/NAME).")
@click.option("--overwrite", is_flag=True, help="Replace a complete run already in the run folder.")
def train_command(recipe: str, overrides: tuple[str, ...], output_dir: str | None, overwrite: bool) -> None:
    """Fine-tune with RECIPE (a shipped name or a YAML path); KEY=VALUE overrides any recipe key."""
    from peftune.recipe import load_recipe
    from peftune.train import train

    resolved = load_recipe(recipe, overrides)
    click.echo(resolved.to_yaml())
    run = train(resolved, output_dir=output_dir, overrides=overrides, overwrite=overwrite)
    record = run.read_metrics()
    primary = record["primary_metric"]
    click.echo(
        f"\n{record['name']}: {primary['name']} {primary['value']:.4f} on {record['eval_samples']} eval examples "
        f"({record['method']}, {record['trainable_parameters']:,} trainable parameters, "
        f"{record['train_runtime_s']:.0f} s)"
    )
    click.echo(f"run folder: {run.path}")
