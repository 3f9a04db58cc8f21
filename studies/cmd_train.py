"""CLI commands: `train`, `sample`, `config show`. Thin: parse, build, call models.trainer; no logic of its own.

Errors a user can cause (bad config, dataset, tracking URI, checkpoint) print `error: <message>` to stderr
and exit 2 before any compute (studies/preflight.py, the CLI's one handler); a diverged run exits 1 after its
MLflow run is marked FAILED; Ctrl-C or SIGTERM closes it KILLED and says how to resume.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import List, Optional

import typer

from diffablate.models.config import ConfigError, RunConfig

TRAIN_EXPERIMENT = "train"  # experiment of ad-hoc `diffablate train` runs (studies use one per study)
RUN_RECORD = "mlflow_run.json"  # in the run dir: which MLflow run a resumed `train` keeps logging to

config_app = typer.Typer(help="Inspect run configurations.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add `train`, `sample` and `config show` to the root app."""
    app.command("train")(train_cmd)
    app.command("sample")(sample_cmd)
    app.add_typer(config_app, name="config")


def _fail(msg: object, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {msg}", err=True)
    return typer.Exit(code)


def resolve_config(config: Optional[Path], sets: Optional[List[str]]) -> RunConfig:
    """`--config FILE` (TOML/JSON; default: the built-in defaults) with `--set key=value` overrides applied.
    Several bad `--set`s are all reported (a PreflightError), not only the first."""
    cfg = RunConfig.from_file(config) if config is not None else RunConfig()
    try:
        return cfg.with_overrides(sets or [])
    except ConfigError as e:
        from diffablate.studies.preflight import PreflightError

        alone = []
        for item in sets or []:  # which overrides are wrong on their own (a combination may be wrong too)
            try:
                cfg.with_overrides([item])
            except ConfigError as one:
                alone.append(str(one))
        raise PreflightError(alone if len(alone) > 1 else [str(e)]) from None


CONFIG_OPT = typer.Option(None, "--config", "-c", help="TOML or JSON config file (default: built-in defaults).")
SET_OPT = typer.Option(None, "--set", "-s", help="Override a field: --set train.lr=1e-3 (repeatable).")


@config_app.command("show")
def config_show(config: Optional[Path] = CONFIG_OPT, set_: Optional[List[str]] = SET_OPT) -> None:
    """Print the resolved config as TOML (the same as `train --dry-run`)."""
    cfg = resolve_config(config, set_)
    typer.echo(cfg.to_toml(), nl=False)


def default_run_name(cfg: RunConfig) -> str:
    """`run-<hash>` of the config minus what a resume may change: the same command resumes the same run."""
    from diffablate.models.trainer import RESUME_MUTABLE

    stable = {k: v for k, v in cfg.flat().items() if not k.startswith(RESUME_MUTABLE)}
    return "run-" + hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()[:10]


def train_cmd(
    config: Optional[Path] = CONFIG_OPT,
    set_: Optional[List[str]] = SET_OPT,
    workdir: Path = typer.Option(Path("."), "--workdir", "-w", help="Holds mlflow.db, mlartifacts/ and runs/."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri",
                                               help="MLflow tracking URI (default: sqlite:///<workdir>/mlflow.db)."),
    experiment: str = typer.Option(TRAIN_EXPERIMENT, "--experiment", "-e", help="MLflow experiment name."),
    run_name: Optional[str] = typer.Option(None, "--run-name",
                                           help="Run directory / MLflow run name (default: run-<config hash>)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config as TOML and exit."),
    no_resume: bool = typer.Option(False, "--no-resume", help="Start over: delete the run's checkpoints."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar (only on a terminal)."),
) -> None:
    """Train one configuration, tracked in MLflow; re-running the same command resumes from its checkpoint."""
    from diffablate.models.checkpoint import CheckpointError, latest_checkpoint
    from diffablate.models.data import DataError
    from diffablate.models.trainer import TrainingDiverged, train
    from diffablate.studies import preflight, tracking

    cfg = resolve_config(config, set_)
    if dry_run:
        typer.echo(cfg.to_toml(), nl=False)
        return
    name = run_name or default_run_name(cfg)
    # Device, perf, data files, paths, the MLflow store: every problem at once, before anything is created.
    preflight.train(cfg, workdir=workdir, tracking_uri=tracking_uri, run_name=name, experiment=experiment)
    uri = tracking.open_tracking(tracking_uri, workdir)

    run_dir = workdir / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    run_id, resumed = _mlflow_run(uri, experiment, name, run_dir, resume=not no_resume, cfg=cfg, workdir=workdir)
    tracker = tracking.MlflowTracker(run_id, uri)
    typer.echo(f"run {name}: {run_dir} (MLflow run {run_id} in {uri}, experiment {experiment!r})", err=True)
    from diffablate.studies import advice

    for line in advice.for_config(cfg):  # valid but unlikely to work well here: said before the wait
        typer.echo(f"warning: {line}", err=True)

    def ending(e: BaseException) -> tracking.RunEnding | None:
        if isinstance(e, TrainingDiverged):
            return tracking.RunEnding("FAILED", "FAIL", e.reason)
        if isinstance(e, (ConfigError, DataError, CheckpointError)):
            return tracking.RunEnding("FAILED", "FAIL", str(e))
        return None  # interrupts KILLED, anything else FAILED (tracking.default_ending)

    try:
        with tracking.run_lifecycle(uri, run_id, reopen=resumed, ending_for=ending):
            result = train(cfg, run_dir, tracker=tracker, resume=not no_resume, progress=progress)
    except TrainingDiverged as e:
        raise _fail(e, code=1) from None
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the CLI's handler prints how to resume
        latest = latest_checkpoint(run_dir)
        typer.echo(f"run {name}: MLflow run {run_id} closed KILLED; "
                   + (f"newest checkpoint {latest} (a rerun continues from there)" if latest is not None
                      else "no checkpoint yet (a rerun starts at step 0)"), err=True)
        raise
    typer.echo(f"done: {result.steps_done} steps, train loss {result.final_train_loss:.4f}, held-out loss "
               f"{result.heldout_loss:.4f}, {result.img_per_s:.0f} img/s, {result.wall_s:.0f} s; {run_dir}")


def _mlflow_run(uri: str, experiment: str, name: str, run_dir: Path, *, resume: bool, cfg: RunConfig,
                workdir: Path) -> tuple[str, bool]:
    """(run id, resumed): the run recorded in run_dir when resuming (and it still exists), else a new one."""
    from diffablate.studies import tracking

    record = run_dir / RUN_RECORD
    if resume and record.is_file():
        try:
            saved = json.loads(record.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            saved = {}  # a damaged record: start a new MLflow run (the checkpoints still resume the training)
        run_id = saved.get("run_id") if isinstance(saved, dict) else None
        if isinstance(run_id, str) and saved.get("tracking_uri") == uri and tracking.run_exists(uri, run_id):
            return run_id, True
    run_id = tracking.start_run(uri, experiment, name, tags={"diffablate.role": "train", "diffablate.seed": str(cfg.seed)},
                                workdir=workdir)
    record.write_text(json.dumps({"run_id": run_id, "tracking_uri": uri, "experiment": experiment}))
    return run_id, False


def sample_cmd(
    path: Path = typer.Argument(..., help="A run directory (its newest checkpoint) or a checkpoint directory."),
    prompts: Optional[List[str]] = typer.Option(None, "--prompts", "--prompt", "-p",
                                                help="Caption to sample (repeatable; default: the run's grid prompts)."),
    n: int = typer.Option(1, "--n", min=1, help="Images per prompt."),
    sampler: str = typer.Option("ddim", "--sampler", help="ddim or ddpm."),
    steps: int = typer.Option(50, "--steps", min=1, help="Sampling steps."),
    guidance: float = typer.Option(3.0, "--guidance", min=1.0, help="Classifier-free guidance scale (1 = off)."),
    out: Path = typer.Option(Path("samples"), "--out", "-o", help="Folder for the PNGs."),
    seed: int = typer.Option(0, "--seed", help="Noise seed: same seed, same images."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Generate images from a trained run with its EMA weights; writes one PNG per image plus grid.png."""
    import torch

    from diffablate.models import diffusion
    from diffablate.models.checkpoint import CheckpointError, read_json
    from diffablate.models.probes import grid_image
    from diffablate.models.trainer import load_trained
    from diffablate.studies import preflight

    preflight.sample(path, device=device, out=out, prompts=prompts)
    try:
        if sampler not in diffusion.SAMPLERS:
            raise ConfigError(f"--sampler: must be one of {list(diffusion.SAMPLERS)}, got {sampler!r}")
        trained = load_trained(path, device)
    except (ConfigError, CheckpointError) as e:
        raise _fail(e) from None
    prompts = list(prompts or read_json(trained.checkpoint, "meta.json").get("grid_prompts", []))
    if not prompts:
        raise _fail("--prompts: none given and the checkpoint records no grid prompts")
    captions = [p for p in prompts for _ in range(n)]
    dev = next(trained.denoiser.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    images = diffusion.generate(trained.denoiser, trained.text_encoder, captions, cfg=trained.cfg, sampler=sampler,
                                steps=steps, guidance_scale=guidance, generator=g, device=dev)
    out.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    files = []
    for i, (caption, img) in enumerate(zip(captions, images)):
        slug = re.sub(r"[^a-z0-9]+", "-", caption.lower()).strip("-")[:48] or "null"
        f = out / f"{i // n:03d}_{slug}_{i % n}.png"
        arr = img.expand(3, -1, -1) if img.shape[0] == 1 else img
        Image.fromarray(arr.permute(1, 2, 0).numpy()).save(f)
        files.append({"file": f.name, "prompt": caption})
    grid_image(images, cols=n if n > 1 else min(len(images), 8)).save(out / "grid.png")
    (out / "prompts.json").write_text(json.dumps({"checkpoint": str(trained.checkpoint), "step": trained.step,
                                                  "sampler": sampler, "steps": steps, "guidance_scale": guidance,
                                                  "seed": seed, "images": files}, indent=2))
    typer.echo(f"wrote {len(images)} images + grid.png to {out} (step {trained.step}, {trained.checkpoint})")
