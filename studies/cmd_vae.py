"""CLI commands `vae train` and `vae eval` - the in-project autoencoder of `axes.space = "latent"` - and
`ensure_vae_scored`, which a study's preflight and `train` call before a latent run (models/ never trains a
VAE on its own: its cost is measured separately from a diffusion run's)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from diffablate.models.config import ConfigError, DataConfig, RunConfig, VaeConfig

# models.data and studies.tracking import torch / mlflow: imported inside the commands, so that
# `diffablate --version` and `--help` stay instant (tests/test_cli_ux.py).

vae_app = typer.Typer(help="Train and evaluate the in-project VAE of the latent space (axes.space=latent).",
                      no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add `diffablate vae ...` to the root app."""
    app.add_typer(vae_app, name="vae")


# --- library: train-or-reuse with the held-out quality recorded -------------------------------------


def heldout_quality(vae_dir: str | Path, data_cfg: DataConfig, *, rfid: bool = True,
                    device: str = "auto") -> dict[str, float]:
    """PSNR, SSIM and (with `rfid`) rFID of the VAE at `vae_dir` on the held-out split of `data_cfg`.

    rFID uses the held-out reference statistics that evaluation caches (studies/evaluate.reference_key), and
    its real baseline is the first n_heldout training images against the same reference.
    """
    from diffablate.metrics.reconstruction import reconstruction_scores
    from diffablate.models.data import build_dataset
    from diffablate.models.vae import Autoencoder

    heldout = build_dataset(data_cfg, "heldout")
    vae = Autoencoder(vae_dir, device)
    recon = vae.reconstruct(heldout.images)
    if not rfid:
        return reconstruction_scores(heldout.images, recon)
    from diffablate.metrics.fid import get_reference_stats
    from diffablate.metrics.inception import FeatureExtractor
    from diffablate.studies.evaluate import reference_key

    extractor = FeatureExtractor(device=vae.device)
    ref = get_reference_stats(reference_key(RunConfig(data=data_cfg)), len(heldout), lambda: heldout.images,
                              extractor)
    baseline = build_dataset(data_cfg, "train").images[:len(heldout)]
    return reconstruction_scores(heldout.images, recon, extractor=extractor, reference=ref, baseline=baseline)


def ensure_vae_scored(data_cfg: DataConfig, vae_cfg: VaeConfig, *, rfid: bool = True, tracker: Any = None,
                      progress: bool = True, device: str = "auto") -> Path:
    """The cached VAE for (data, vae config), trained first if missing, its held-out quality recorded."""
    from diffablate.models.vae import ensure_vae

    return ensure_vae(data_cfg, vae_cfg, tracker=tracker, progress=progress, device=device,
                      evaluate=lambda d: heldout_quality(d, data_cfg, rfid=rfid, device=device))


# --- commands ------------------------------------------------------------------------------------


def _fail(e: Exception) -> typer.Exit:
    typer.echo(f"error: {e}", err=True)
    return typer.Exit(2)


def _configs(config: Optional[Path], dataset: Optional[str], resolution: Optional[int],
             sets: list[str]) -> RunConfig:
    bad = [s for s in sets if not s.startswith(("data.", "vae."))]
    if bad:
        raise ConfigError(f"--set {bad[0]!r}: only data.* and vae.* keys apply to a VAE")
    cfg = RunConfig.from_file(config) if config is not None else RunConfig()
    given = {"data.name": dataset, "data.resolution": resolution}
    return cfg.with_overrides({k: v for k, v in given.items() if v is not None}).with_overrides(sets)


CONFIG_OPT = typer.Option(None, "--config", "-c", help="Run config (TOML/JSON) whose data and vae sections to use.")
DATASET_OPT = typer.Option(None, "--dataset", help="Dataset name (= --set data.name=...; default shapes).")
RESOLUTION_OPT = typer.Option(None, "--resolution", min=4, help="Image side in px (= --set data.resolution=N).")
SET_OPT = typer.Option(None, "--set", help="data.KEY=V or vae.KEY=V overrides (repeatable).")
RFID_OPT = typer.Option(True, "--rfid/--no-rfid", help="Also score rFID (FID Inception; ~5 img/s on a CPU).")
DEVICE_OPT = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N.")


@vae_app.command("train")
def train(
    config: Optional[Path] = CONFIG_OPT,
    dataset: Optional[str] = DATASET_OPT,
    resolution: Optional[int] = RESOLUTION_OPT,
    set_: Optional[List[str]] = SET_OPT,
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Training steps (= --set vae.steps=N)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Directory to write; default: the shared cache."),
    rfid: bool = RFID_OPT,
    device: str = DEVICE_OPT,
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow store to log the run to."),
) -> None:
    """Train the VAE for a dataset and resolution, record its held-out PSNR / SSIM / rFID, print them."""
    from diffablate.models import vae
    from diffablate.models.data import DataError
    from diffablate.studies.tracking import TrackingError

    try:
        cfg = _configs(config, dataset, resolution, list(set_ or []) + ([f"vae.steps={steps}"] if steps else []))
        if cfg.vae.path:
            raise ConfigError("vae.path: names an existing VAE; `vae train` trains one (use --out to choose where)")
        tracker, finish = _tracker(tracking_uri, cfg)
    except (ConfigError, DataError, TrackingError) as e:
        raise _fail(e) from None
    status = "FAILED"
    try:
        if out is None:
            path = ensure_vae_scored(cfg.data, cfg.vae, rfid=rfid, tracker=tracker, device=device)
        else:
            from diffablate.models.data import build_dataset

            vae.train_vae(build_dataset(cfg.data, "train"), cfg.vae, out, tracker=tracker, device=device,
                          meta={"data": dataclasses.asdict(cfg.data)})
            vae.record_quality(out, heldout_quality(out, cfg.data, rfid=rfid, device=device), tracker)
            path = out
        status = "FINISHED"
    except (DataError, vae.VaeError) as e:
        raise _fail(e) from None
    finally:
        finish(status)
    meta = vae.check_entry(path)
    typer.echo(f"wrote {path}  ({meta['n_train']} images, {meta['train_wall_s']:.0f} s, "
               f"scaling factor {meta['scaling_factor']:.4f})")
    typer.echo(json.dumps(meta.get("heldout_quality", {}), indent=1))


@vae_app.command("eval")
def evaluate(
    vae_dir: Optional[Path] = typer.Argument(None, help="A VAE directory (default: the cached one for the config)."),
    config: Optional[Path] = CONFIG_OPT,
    dataset: Optional[str] = DATASET_OPT,
    resolution: Optional[int] = RESOLUTION_OPT,
    set_: Optional[List[str]] = SET_OPT,
    rfid: bool = RFID_OPT,
    device: str = DEVICE_OPT,
) -> None:
    """Held-out reconstruction quality (PSNR, SSIM, rFID) of a VAE; prints JSON."""
    from diffablate.models import vae
    from diffablate.models.data import DataError

    try:
        cfg = _configs(config, dataset, resolution, list(set_ or []))
        path = vae_dir if vae_dir is not None else vae.resolve_vae(cfg)
        vae.check_entry(Path(path))
        scores = heldout_quality(path, cfg.data, rfid=rfid, device=device)
    except (ConfigError, DataError, vae.VaeError) as e:
        raise _fail(e) from None
    typer.echo(f"held-out images: {int(scores['n'])} ({cfg.data.name}, {cfg.data.resolution}px), VAE {path}")
    typer.echo(json.dumps(scores, indent=1))


def _tracker(tracking_uri: str | None, cfg: RunConfig) -> tuple[Any, Callable[[str], None]]:
    """(MlflowTracker or None, finish(status)) for an optional `--tracking-uri` (experiment "vae")."""
    if not tracking_uri:
        return None, lambda status: None
    from diffablate.studies import tracking

    uri = tracking.validate_uri(tracking_uri)
    tracking.check_reachable(uri)  # fail before training, not after
    run_id = tracking.start_run(uri, "vae", f"vae-{cfg.data.name}-{cfg.data.resolution}px",
                                tags={"diffablate.role": "vae"})
    tracker = tracking.MlflowTracker(run_id, uri)
    tracker.log_params({f"data.{k}": v for k, v in dataclasses.asdict(cfg.data).items()})
    return tracker, lambda status: tracking.end_run(uri, run_id, status)
