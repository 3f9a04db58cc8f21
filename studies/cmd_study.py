"""CLI commands: `study run`, `study status`, `eval`, `ui`. Thin: parse, call studies.runner / evaluate / ui."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from diffablate.models.config import ConfigError

study_app = typer.Typer(help="Run and inspect Optuna studies tracked in MLflow.", no_args_is_help=True)


def _errors() -> tuple[type[BaseException], ...]:
    from diffablate.metrics.images import MetricsError
    from diffablate.models.data import DataError
    from diffablate.studies.preflight import PreflightError
    from diffablate.studies.runner import StudyError
    from diffablate.studies.spec import SpecError  # optuna: imported by the commands, not by `diffablate --help`
    from diffablate.studies.tracking import TrackingError
    from diffablate.studies.workdir import WorkdirError

    return (ConfigError, SpecError, StudyError, DataError, MetricsError, PreflightError, TrackingError, WorkdirError)


def _fail(e: BaseException) -> None:
    from diffablate.studies.preflight import echo_errors

    echo_errors(e)
    raise typer.Exit(2)


def register(app: typer.Typer) -> None:
    """Add `diffablate study ...`, `diffablate eval` and `diffablate ui` to the root app."""
    app.add_typer(study_app, name="study")
    app.command("eval")(eval_cmd)
    app.command("ui")(ui_cmd)


@study_app.command("run")
def run_cmd(
    spec_file: Path = typer.Argument(..., help="Study spec (TOML), e.g. studies/smoke.toml."),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Work directory (default studies-out/<name>/)."),
    storage: Optional[str] = typer.Option(None, "--storage",
                                          help="Optuna storage: an RDB URL (postgresql://...) or journal:<path>; "
                                               "default <workdir>/optuna.db."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1,
                                          help="Local worker processes (default: one per visible GPU, else 1)."),
    workers_per_gpu: int = typer.Option(1, "--workers-per-gpu", min=1, help="Workers sharing each GPU."),
    new_name: Optional[str] = typer.Option(None, "--new-name", help="Run a changed spec as a new study with this name."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri",
                                               help="MLflow store for the parent and every trial run: "
                                                    "sqlite:////shared/mlflow.db, http://host:5000, postgresql://... "
                                                    "(default: as recorded for the study, else <workdir>/mlflow.db)."),
    pack: str = typer.Option("auto", "--pack",
                             help="Trials a worker trains together as one pack (same UNet program, its own "
                                  "streams, run, checkpoints each): 'auto' (up to 12 on a GPU, off on the CPU), "
                                  "'off', or a number."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and list the planned trials, train nothing."),
    trial_fn: Optional[str] = typer.Option(None, "--trial-fn", hidden=True, help="module:function replacing train+eval (tests)."),
) -> None:
    """Run (or resume) a study until every planned trial has finished. Run it again to resume; run the same
    command with the same --storage (and --tracking-uri) elsewhere to add workers."""
    from diffablate.studies import preflight, runner
    from diffablate.studies.spec import load_spec

    try:
        spec = load_spec(spec_file)
        runner.check_pack(pack)
        # Everything the spec parser cannot see (each trial's config on this machine, data files, FID weights,
        # Optuna's sampler and pruner, storage, work dir, MLflow store, an existing study), all problems at
        # once, before the work dir, the Optuna study or any MLflow run is created.
        preflight.study(spec, workdir=workdir, storage=storage, new_name=new_name, tracking_uri=tracking_uri,
                        connect=not dry_run)
        if dry_run:
            _print_plan(spec)
            return
        from diffablate.studies import advice, progress

        for line in advice.for_configs(c.cfg for c in spec.cells):  # valid but unlikely to work well here
            typer.echo(f"warning: {line}", err=True)
        uri = runner.check_tracking_uri(tracking_uri, connect=True)  # creates an explicit SQLite store
        handle = runner.run_study(spec, workdir=workdir, storage=storage, new_name=new_name, workers=workers,
                                  workers_per_gpu=workers_per_gpu, trial_fn=trial_fn, tracking_uri=uri,
                                  log=typer.echo, pack=pack, display=progress.display_for())
    except _errors() as e:
        _fail(e)
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM: the trials were re-queued, their MLflow runs closed KILLED
        typer.echo("study run interrupted: any trial it was running is re-queued (its MLflow run closed KILLED, "
                   "its checkpoints kept in the work dir)", err=True)
        raise
    _print_status(handle)
    typer.echo(progress.next_line(progress.report_command(handle.study_name, handle.workdir,
                                                          runner.default_workdir(handle.study_name))))


def _print_plan(spec) -> None:  # noqa: ANN001 - StudySpec, imported lazily
    from rich.console import Console
    from rich.table import Table

    per_cell = spec.design.n_per_cell(spec)
    table = Table(title=f"{spec.name}: {spec.kind}, {len(spec.cells)} cells x {per_cell} = {spec.n_planned} trials "
                        f"(spec {spec.spec_hash})")
    table.add_column("#", justify="right")
    table.add_column("cell")
    for c in spec.cells:
        table.add_row(str(c.index), c.label)
    Console().print(table)


@study_app.command("status")
def status_cmd(
    study: Optional[str] = typer.Argument(None, help="Study name (under studies-out/) or work directory (default: "
                                                     "this directory's study, else the only one under studies-out/)."),
    name: Optional[str] = typer.Option(None, "--study", help="Which study of the work dir (default: its first)."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri",
                                               help="MLflow store of the study (default: the one `study run` "
                                                    "recorded in the work dir's study.json)."),
) -> None:
    """Trial counts (done/running/failed/pruned) and per-cell best/mean objective values."""
    from diffablate.studies import runner
    from diffablate.studies.workdir import WorkdirError, default_study_dir

    try:
        wd = runner.resolve_workdir(study) if study is not None else default_study_dir()
        handle = runner.load_handle(wd, name, tracking_uri, with_mlflow=False)  # Optuna alone: seconds faster
    except (*_errors(), WorkdirError) as e:
        _fail(e)
    _print_status(handle)


@study_app.command("list")
def list_cmd(
    root: Path = typer.Option(Path("studies-out"), "--root", help="Folder of study work directories."),
) -> None:
    """Every study under studies-out/ (or --root): trials done / planned, running, failed, where it is stored."""
    from rich.console import Console
    from rich.table import Table

    from diffablate.studies import runner

    rows = runner.list_studies(root)
    if not rows:
        typer.echo(f"no studies under {root}/ (run `diffablate study run SPEC` to start one)")
        return
    table = Table(title=f"studies under {root}/", caption="diffablate study status NAME for one study's cells")
    for col in ("study", "done", "running", "waiting", "failed", "pruned", "work dir", "storage", "MLflow"):
        table.add_column(col, justify="right" if col in ("done", "running", "waiting", "failed", "pruned") else "left")
    for r in rows:
        if r["error"]:
            table.add_row(r["study"], "?", "", "", "", "", str(r["workdir"]), r["storage"], r["error"])
            continue
        done = f"{r['complete']}/{r['planned']}" if r["planned"] is not None else str(r["complete"])
        table.add_row(r["study"], done, str(r["running"]), str(r["waiting"]), str(r["fail"]), str(r["pruned"]),
                      str(r["workdir"]), r["storage"], r["mlflow"])
    Console(width=200).print(table)


def _print_status(handle) -> None:  # noqa: ANN001 - StudyHandle
    from rich.console import Console
    from rich.table import Table

    from diffablate.studies import runner

    counts, rows = runner.status_rows(handle)
    spec = handle.spec
    title = (f"{handle.study_name}: {counts['complete']}/{counts['planned']} complete, {counts['running']} running, "
             f"{counts['waiting']} waiting, {counts['fail']} failed, {counts['pruned']} pruned, {counts['retried']} retried")
    table = Table(title=title, caption=f"objective: {spec.objective} ({spec.direction}); work dir {handle.workdir}; "
                                       f"MLflow {runner.redact(handle.tracking_uri)}")
    for col in ("cell", "done", "running", "failed", "pruned", "best", "mean"):
        table.add_column(col, justify="left" if col == "cell" else "right")
    fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
    for r in rows:
        table.add_row(r["cell"], str(r["complete"]), str(r["running"]), str(r["fail"]), str(r["pruned"]),
                      fmt(r["best"]), fmt(r["mean"]))
    Console(width=200).print(table)


def eval_cmd(
    run: Path = typer.Argument(..., help="A run directory (or checkpoint directory) written by the trainer."),
    n: Optional[int] = typer.Option(None, "--n", min=2, help="Images to generate and score (default: eval.n_samples)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda | cuda:N (default: the run's)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="eval.* overrides, e.g. --set eval.fid=false"),
) -> None:
    """Sample a trained run and score it: FID/KID, CLIP-score, shapes oracle (as cfg.eval enables)."""
    from rich.console import Console
    from rich.table import Table

    from diffablate.models.checkpoint import CheckpointError
    from diffablate.studies import preflight
    from diffablate.studies.evaluate import evaluate_run, format_metrics

    try:
        preflight.evaluate(run, device=device)
        from diffablate.models import checkpoint as ckpt
        from diffablate.models.config import RunConfig

        bad = [s for s in set_ or [] if not s.startswith("eval.")]
        if bad:
            raise ConfigError(f"--set {bad[0]!r}: eval only accepts eval.* overrides")
        path = ckpt.resolve_checkpoint(run)
        cfg = RunConfig.from_dict(ckpt.read_json(path, "config.json"), where=str(path / "config.json"))
        cfg = cfg.with_overrides(set_ or [])
        preflight.evaluate_config(cfg)
        metrics = evaluate_run(run, cfg=cfg if set_ else None, n=n, device=device)
    except (*_errors(), CheckpointError) as e:
        _fail(e)
    except FileNotFoundError as e:
        _fail(e)
    table = Table(title=f"{run}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in format_metrics(metrics):
        table.add_row(k, v)
    Console().print(table)


def ui_cmd(
    workdir: Path = typer.Argument(Path("."), help="A study work directory (or a study name under studies-out/)."),
    mlflow_port: Optional[int] = typer.Option(None, "--mlflow-port", help="MLflow UI port (default: a free one)."),
    optuna_port: Optional[int] = typer.Option(None, "--optuna-port", help="optuna-dashboard port (default: a free one)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Bind address; anything but loopback exposes unauthenticated UIs."),
) -> None:
    """Serve the MLflow UI and optuna-dashboard for one work directory until Ctrl-C."""
    from diffablate.studies import preflight, runner, ui

    try:
        wd = runner.resolve_workdir(workdir)
        # Ports, host, the study's stores and both executables, before a store is touched or logs/ written.
        preflight.ui(wd, host=host, ports={"--mlflow-port": mlflow_port, "--optuna-port": optuna_port})
        servers = ui.start_ui(wd, host, mlflow_port, optuna_port)
    except _errors() as e:
        _fail(e)
    ui.serve_until_interrupted(servers, typer.echo)
