"""CLI command `diffablate bench`: thin; the measurements live in studies/bench.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from diffablate.models.config import ConfigError


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("bench")(bench_cmd)


def bench_cmd(
    device: str = typer.Option("cuda", "--device", help="cuda | cuda:N | cpu."),
    batch_size: int = typer.Option(512, "--batch-size", min=1, help="Images per step, both loops."),
    steps: int = typer.Option(50, "--steps", min=1, help="Timed steps per loop (after warm-up)."),
    warmup: int = typer.Option(10, "--warmup", min=0, help="Untimed steps per loop before timing."),
    model_width: int = typer.Option(64, "--model-width", help="UNet base width w (levels w, 2w, 2w); 64 = 10 M params."),
    reference: str = typer.Option("no,bf16", "--reference",
                                  help="Reference-loop precisions to time, comma-separated: no (fp32), bf16, fp16; none = fast path only."),
    curve_steps: int = typer.Option(0, "--curve-steps", min=0,
                                    help="Also train fp32-eager and fast trainers this many steps and compare loss curves."),
    sample_n: int = typer.Option(0, "--sample-n", min=0, help="Also time sampling of this many images (DDIM 50, guided)."),
    sample_batch: int = typer.Option(2048, "--sample-batch", min=1, help="Captions per sampling batch."),
    fid_n: int = typer.Option(0, "--fid-n", min=0, help="Also time FID-feature extraction of this many images."),
    fid_batch: Optional[int] = typer.Option(None, "--fid-batch", min=1, help="FID-feature batch size (default: its own)."),
    profile: int = typer.Option(0, "--profile", min=0, help="Profile this many fast-path steps (torch.profiler table)."),
    n_train: int = typer.Option(4096, "--n-train", min=1, help="Training images rendered (shapes)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="RunConfig overrides, e.g. --set perf.compile=off"),
    out: Optional[Path] = typer.Option(None, "--out", help="Results file to append to (default studies/bench_results.jsonl)."),
    no_save: bool = typer.Option(False, "--no-save", help="Print only; append no result line."),
) -> None:
    """Time diffablate's training fast path against a diffusers-example loop on the same UNet and batch;
    also sampling and FID-feature throughput, MFU, and fp32-vs-fast loss-curve agreement."""
    from diffablate.studies import bench

    try:
        precisions = tuple(p.strip() for p in reference.split(",") if p.strip() and p.strip() != "none")
        bad = [p for p in precisions if p not in ("no", "bf16", "fp16")]
        if bad or not (precisions or reference.strip() == "none"):
            raise bench.BenchError(f"--reference: expected none or a comma-separated subset of no,bf16,fp16, got {reference!r}")
        record = bench.run_bench(device=device, batch_size=batch_size, steps=steps, warmup=warmup, width=model_width,
                                 reference_precisions=precisions, curve_steps=curve_steps, sample_n=sample_n,
                                 sample_batch=sample_batch, fid_n=fid_n, fid_batch=fid_batch, profile=profile,
                                 n_train=n_train, overrides=list(set_ or []), command=bench.command_line(),
                                 log=typer.echo)
    except (ConfigError, bench.BenchError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    if not no_save:
        path = bench.append_result(record, out or bench.RESULTS_FILE)
        typer.echo(f"appended to {path}")
    summary = {k: record[k] for k in record if k.startswith("speedup_vs_")}
    typer.echo(json.dumps(summary))
