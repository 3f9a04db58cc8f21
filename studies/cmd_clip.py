"""CLI commands: `clip train` and `clip eval` - the project's own CLIP (encoder and judge roles)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, ContextManager, List, Optional

import typer

from diffablate.models.config import ConfigError, DataConfig, RunConfig

clip_app = typer.Typer(help="Train and evaluate the in-project CLIP (no CLIP weights exist offline).",
                       no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add `diffablate clip ...` to the root app."""
    app.add_typer(clip_app, name="clip")


def _fail(e: Exception) -> typer.Exit:
    typer.echo(f"error: {e}", err=True)
    return typer.Exit(2)


def _data_config(dataset: str, sets: list[str]) -> DataConfig:
    data_sets = [s for s in sets if s.startswith("data.")]
    bad = [s for s in sets if not s.startswith(("data.", "clip."))]
    if bad:
        raise ConfigError(f"--set {bad[0]!r}: only data.* and clip.* keys apply to a CLIP")
    return RunConfig().with_overrides({"data.name": dataset}).with_overrides(data_sets).data


@clip_app.command("train")
def train(
    dataset: str = typer.Option("shapes", "--dataset", help="Dataset name (shapes, fashion-mnist, folder)."),
    role: str = typer.Option("encoder", "--role", help="encoder (UNet's text tower) or judge (CLIP-score)."),
    out: Optional[Path] = typer.Option(None, "--out", help="HF directory to write; default: the shared cache."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="data.KEY=V or clip.KEY=V overrides."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Training steps (= --set clip.steps=N)."),
    preset: str = typer.Option("small", "--preset", help="Base sizes: small (default, CPU-friendly) or base (GPU)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow store to log the run to."),
) -> None:
    """Train a CLIP on one role's half of the train split and save it in HF format."""
    from diffablate.models import clip
    from diffablate.models.data import DataError  # torch: imported by the command, not by `diffablate --help`
    from diffablate.studies import preflight
    from diffablate.studies.tracking import TrackingError

    sets = list(set_ or [])
    try:
        data_cfg = _data_config(dataset, sets)
        if role not in clip.ROLES:
            raise ConfigError(f"--role: must be one of {list(clip.ROLES)}, got {role!r}")
        if preset not in clip.PRESETS:
            raise ConfigError(f"--preset: must be one of {list(clip.PRESETS)}, got {preset!r}")
        clip_cfg = clip.PRESETS[preset].with_overrides([s for s in sets if s.startswith("clip.")] +
                                                       ([f"clip.steps={steps}"] if steps else []))
        preflight.clip_train(data_cfg, device=device, out=out, tracking_uri=tracking_uri)
    except (ConfigError, DataError, clip.ClipError, TrackingError) as e:
        raise _fail(e) from None
    tracker, lifecycle = _tracked_run(tracking_uri, dataset, role)
    with lifecycle:
        if out is None:
            path = clip.ensure_clip(data_cfg, role, clip_cfg, progress=True, tracker=tracker, device=device)
        else:
            clip.train_role(data_cfg, role, clip_cfg, out, tracker=tracker, progress=True, device=device)
            path = out
    meta = clip.Clip(path).meta
    typer.echo(f"wrote {path}  ({meta.get('n_train')} pairs, {meta.get('train_wall_s', 0):.0f} s)")
    typer.echo(json.dumps(meta.get("heldout_retrieval", {}), indent=1))


def _tracked_run(tracking_uri: str | None, dataset: str, role: str) -> tuple[Any, ContextManager[Any]]:
    """(MlflowTracker or None, the run's lifecycle) for an optional `--tracking-uri` (experiment "clip")."""
    if not tracking_uri:
        return None, contextlib.nullcontext()
    from diffablate.studies import tracking

    uri = tracking.open_tracking(tracking_uri, Path("."))  # creates a SQLite store (under the schema lock)
    run_id = tracking.start_run(uri, "clip", f"clip-{dataset}-{role}", tags={"diffablate.role": "clip",
                                                                            "diffablate.clip_role": role})
    return tracking.MlflowTracker(run_id, uri), tracking.run_lifecycle(uri, run_id)


@clip_app.command("eval")
def evaluate(
    clip_dir: Path = typer.Argument(..., help="A local HF CLIP directory (ours or any other)."),
    dataset: str = typer.Option("shapes", "--dataset", help="Dataset whose held-out pairs to score."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="data.KEY=V overrides (e.g. data.n_heldout=1024)."),
    bootstrap: int = typer.Option(200, "--bootstrap", min=0, help="Bootstrap resamples for the CIs."),
    seed: int = typer.Option(0, "--seed", help="Seed of the caption shuffle and the bootstrap."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N."),
) -> None:
    """Held-out retrieval top-1/top-5 both ways, and CLIP-score of matching vs shuffled captions."""
    from diffablate.metrics.clip_score import clip_score, matching_vs_shuffled
    from diffablate.metrics.retrieval import retrieval_scores
    from diffablate.models import clip
    from diffablate.models.data import DataError, build_dataset

    from diffablate.studies import preflight

    try:
        preflight.check_device(device, "--device")
        data_cfg = _data_config(dataset, [s for s in (set_ or []) if not s.startswith("clip.")])
        model = clip.Clip(clip_dir, device=device)
        held = build_dataset(data_cfg, "heldout")
    except (ConfigError, DataError, clip.ClipError) as e:
        raise _fail(e) from None
    r = retrieval_scores(model.image_embeds(held.images), model.text_embeds(held.captions), held.captions)
    typer.echo(f"held-out pairs: {len(held)} ({held.name}, {held.resolution}px); a hit = same caption text")
    for d, name in (("i2t", "image->text"), ("t2i", "text->image")):
        typer.echo(f"  {name}: top-1 {r[f'{d}_top1']:.3f} (chance {r[f'chance_{d}_top1']:.3f})   "
                   f"top-5 {r[f'{d}_top5']:.3f} (chance {r[f'chance_{d}_top5']:.3f})")
    cs = clip_score(held.images, held.captions, clip_dir, bootstrap=bootstrap, seed=seed, device=device)
    m = matching_vs_shuffled(held.images, held.captions, clip_dir, bootstrap=bootstrap, seed=seed, device=device)
    typer.echo(f"  CLIP-score (torchmetrics) matching: {cs.value:.2f} [{cs.ci_low:.2f}, {cs.ci_high:.2f}]")
    typer.echo(f"  CLIP-score shuffled captions: {m['shuffled']:.2f}   gap {m['gap']:.2f} "
               f"[{m['gap_ci_low']:.2f}, {m['gap_ci_high']:.2f}], matching higher for "
               f"{100 * m['frac_matching_higher']:.1f}% of images")
