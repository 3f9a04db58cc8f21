"""CLI commands: report (work in progress)."""

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
