"""CLI commands: `fid` - FID (and KID) between two image folders, pytorch-fid style."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add `diffablate fid` to the root app."""
    app.command("fid")(fid)


def fid(
    dir_a: Path = typer.Argument(..., help="Reference folder of PNG/JPEG images (e.g. real images)."),
    dir_b: Path = typer.Argument(..., help="Folder to score against it (e.g. generated images)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    batch_size: int = typer.Option(0, "--batch-size", min=0, help="Images per Inception batch (0: 256 on GPU, 32 on CPU)."),
    kid: bool = typer.Option(False, "--kid", help="Also compute KID."),
    bootstrap: int = typer.Option(200, "--bootstrap", min=0, help="Bootstrap resamples of DIR_B for the 95% CI (0: none)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap and the KID subsets."),
) -> None:
    """Print FID(DIR_A, DIR_B); the last line of stdout is the bare number."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from diffablate.metrics.fid import compare_image_sets
    from diffablate.metrics.images import MetricsError, load_image_folder
    from diffablate.metrics.inception import FeatureExtractor
    from diffablate.studies import preflight

    preflight.fid([dir_a, dir_b], device=device)  # both folders and the device, every problem at once
    try:
        images_a = load_image_folder(dir_a)
        images_b = load_image_folder(dir_b)
        extractor = FeatureExtractor(device=device, batch_size=batch_size or None)
        # progress on stderr so that stdout stays machine-readable
        columns = (TextColumn("Inception features"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("features", total=len(images_a) + len(images_b))
            result = compare_image_sets(
                images_a, images_b, extractor, kid=kid, n_bootstrap=bootstrap, seed=seed,
                progress=lambda k: bar.advance(task, k),
            )
    except MetricsError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None

    f = result.fid
    ci = f" 95% CI [{f.ci_low:.4f}, {f.ci_high:.4f}] (B={f.n_bootstrap}, seed={seed})" if f.ci_low is not None else ""
    typer.echo(f"FID: {f.value:.6f}{ci} n_a={f.n_ref} n_b={f.n_gen}")
    if result.kid is not None:
        k = result.kid
        typer.echo(f"KID: {k.value:.6f} +- {k.std:.6f} (subsets={k.subsets}, subset_size={k.subset_size})")
    typer.echo(f"{f.value:.6f}")
