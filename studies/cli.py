"""The `diffablate` command line. Thin by design: each command module parses, builds, calls the library."""

from __future__ import annotations

import typer

from diffablate import __version__
from diffablate.studies import (
    cmd_bench,
    cmd_clip,
    cmd_data,
    cmd_metrics,
    cmd_report,
    cmd_study,
    cmd_train,
    cmd_vae,
)

app = typer.Typer(
    name="diffablate",
    help="Seeded, tracked ablation studies of text-to-image diffusion claims.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"diffablate {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Seeded, tracked ablation studies of text-to-image diffusion claims."""


# Each module owns its commands; registration order is the order of `diffablate --help`.
for _module in (cmd_data, cmd_train, cmd_clip, cmd_vae, cmd_metrics, cmd_study, cmd_report, cmd_bench):
    _module.register(app)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # `python -m diffablate.studies.cli ...` (what the tests and CI use) works like `diffablate`
    main()
