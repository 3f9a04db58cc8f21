"""CLI command: `report STUDY` - regenerate a study's report from its MLflow store alone."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    """Add `diffablate report` to the root app."""
    app.command("report")(report)


def report(
    study: str = typer.Argument(..., help="Study name (= MLflow experiment name)."),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Study work dir (default: studies-out/STUDY)."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri",
                                               help="MLflow tracking URI (default: the --tracking-uri the study "
                                                    "was run with, as recorded in WORKDIR/study.json, "
                                                    "else sqlite:///WORKDIR/mlflow.db)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default: WORKDIR/report)."),
    optuna_storage: Optional[str] = typer.Option(None, "--optuna-storage",
                                                 help="Optuna storage URL for the search plots "
                                                      "(default: as recorded in WORKDIR/study.json, "
                                                      "else WORKDIR/optuna.db)."),
    log: bool = typer.Option(True, "--log/--no-log", help="Log the report to the study's parent MLflow run."),
) -> None:
    """Write report.md, report.html, trials.csv, claims.csv and figures/ for STUDY, from MLflow alone."""
    # Imported here so `diffablate --help` stays fast (mlflow, seaborn and scipy are heavy imports).
    from diffablate.reports.build import build_report, find_optuna_storage
    from diffablate.reports.load import ReportError
    from diffablate.studies import preflight
    from diffablate.studies import workdir as wdl

    wd = workdir if workdir is not None else wdl.default_workdir(study)
    out = out if out is not None else wd / "report"
    try:
        # The store exists (a report never creates an empty one), study.json is sound, the output can be written.
        uri = preflight.report(wd, study, tracking_uri=tracking_uri, out=out, optuna_storage=optuna_storage)
        relocate(uri)
        result = build_report(study, uri, out, optuna_storage=optuna_storage or find_optuna_storage(wd, study),
                              log_to_mlflow=log)
    except (ReportError, preflight.PreflightError, wdl.WorkdirError, OSError, sqlite3.Error) as e:
        preflight.echo_errors(e)
        raise typer.Exit(2) from None
    verdicts = ", ".join(f"{c}: {v}" for c, v in zip(result.claims["claim"], result.claims["verdict"])) or "no claims"
    typer.echo(f"wrote {result.out_dir} ({len(result.files)} files; {verdicts})")


def relocate(tracking_uri: str) -> None:
    """A work dir copied elsewhere (e.g. back from the GPU machine) still names its old artifact paths in
    mlflow.db; studies/tracking.py re-points them, as `study` commands do when they open a store. A missing
    database is left alone (and not created): reports.load names it in its error."""
    from diffablate.studies import tracking

    db = tracking.sqlite_path(tracking_uri)
    if db is not None and db.is_file():
        tracking.relocate_store(db)
