"""CLI commands: `data preview` - look at a dataset's images next to their captions."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from diffablate.models.config import ConfigError, DataConfig, RunConfig

SPLITS_HELP = "One of ['train', 'heldout']."  # models.data.SPLITS, without importing torch for `--help`

data_app = typer.Typer(help="Inspect datasets.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add `diffablate data ...` to the root app."""
    app.add_typer(data_app, name="data")


@data_app.command("preview")
def preview(
    dataset: str = typer.Argument(..., help="Dataset name: shapes, fashion-mnist or folder."),
    out: Path = typer.Option(Path("grid.png"), "--out", "-o", help="PNG file to write."),
    n: int = typer.Option(16, "--n", min=1, max=256, help="How many items to show."),
    split: str = typer.Option("train", "--split", help=SPLITS_HELP),
    path: str = typer.Option("", "--path", help="Dataset directory (folder) or Fashion-MNIST root."),
    resolution: int = typer.Option(32, "--resolution", help="Image side in pixels."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Extra data.* overrides, e.g. --set data.seed=3"),
) -> None:
    """Write a captioned grid of a dataset's first items, so a person can check captions against images."""
    from diffablate.models.data import SPLITS, DataError, build_dataset, preview_grid

    try:
        overrides = {"data.name": dataset, "data.path": path, "data.resolution": resolution,
                     "data.n_train": max(n, 16), "data.n_heldout": max(n, 16)}
        cfg: DataConfig = RunConfig().with_overrides(overrides).with_overrides(set_ or []).data
        if split not in SPLITS:
            raise ConfigError(f"--split: must be one of {list(SPLITS)}, got {split!r}")
        ds = build_dataset(cfg, split)
    except (ConfigError, DataError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    preview_grid(ds, n=n).save(out)
    typer.echo(f"wrote {out} ({min(n, len(ds))} of {len(ds)} {ds.name} {split} items, {ds.resolution}px)")
