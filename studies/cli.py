"""The `diffablate` command line. Thin by design: each command module parses, builds, calls the library.

One handler (`_Cli.invoke`) ends every command: an error the user caused (a bad config, spec, file, URL, ...)
prints `error: <field or file>: ...` and exits 2, an unexpected one prints one `error:` line and exits 1 (the
traceback only with `diffablate --debug ...`), and Ctrl-C or SIGTERM exits 130 / 143 with a line saying how
to resume (studies/interrupts.py turns SIGTERM into the same KeyboardInterrupt Ctrl-C raises).
"""

from __future__ import annotations

import shlex
from typing import Any

import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException

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


class _Cli(TyperGroup):
    """The root command group: runs each command inside the one error / interrupt handler."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        ctx.meta["diffablate.argv"] = list(args)  # for the "run it again to resume" line
        return super().parse_args(ctx, args)

    def invoke(self, ctx: typer.Context) -> Any:
        from diffablate.studies import interrupts, preflight

        with interrupts.sigterm_as_interrupt():
            try:
                return super().invoke(ctx)
            except (typer.Exit, typer.Abort, TyperException):
                raise  # typer.Exit from a command, usage errors: the CLI framework reports them itself
            except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (interrupts.Terminated)
                argv = [a for a in ctx.meta.get("diffablate.argv", []) if a != "--debug"]
                typer.echo(f"interrupted ({interrupts.describe(e)}); to resume, run the same command again: "
                           f"diffablate {shlex.join(argv)}", err=True)
                raise typer.Exit(interrupts.exit_code(e)) from None
            except Exception as e:
                if ctx.params.get("debug"):
                    raise
                if preflight.is_user_error(e):
                    preflight.echo_errors(e)
                    raise typer.Exit(2) from None
                typer.echo(f"error: internal error ({type(e).__name__}: {e}); run `diffablate --debug ...` for "
                           f"the traceback", err=True)
                raise typer.Exit(1) from None


app = typer.Typer(
    cls=_Cli,
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
    debug: bool = typer.Option(False, "--debug", help="Show the traceback of an unexpected error."),
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
