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
    variant: Optional[list[str]] = typer.Option(None, "--variant",
                                                help="Also time a fast-path variant NAME:key=value[,key=value...], "
                                                     "e.g. no-graphs:perf.cuda_graphs=off (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Results file to append to (default studies/bench_results.jsonl)."),
    no_save: bool = typer.Option(False, "--no-save", help="Print only; append no result line."),
    study: Optional[Path] = typer.Option(None, "--study", help="Study mode: time SPEC's training unpacked (--pack off), "
                                         "packed and with the reference loop, plus the packing variants (micro)."),
    trials: int = typer.Option(3, "--trials", help="Study mode: the spec's first N trials (seed-major plan order)."),
    train_steps: int = typer.Option(100, "--train-steps", help="Study mode: train.steps of every trial (0 = the spec's)."),
    pack: int = typer.Option(0, "--pack", help="Study mode: members per pack (0 = all selected trials)."),
    reference_steps: int = typer.Option(30, "--reference-steps", help="Study mode: reference-loop steps run per trial "
                                        "(the rest extrapolated from its ms/step)."),
    parts: str = typer.Option("study,micro", "--parts", help="Study mode: study, micro or both."),
    modes: str = typer.Option("off,pack,reference", "--modes", help="Study mode: which of off, pack, reference."),
    micro_variants: str = typer.Option("serial,streams,vmap,vmap-graph", "--micro-variants",
                                       help="Study mode: packing variants (serial, streams, vmap, vmap-graph)."),
    micro_k: str = typer.Option("3", "--micro-k", help="Study mode: copies per variant, comma-separated, e.g. 1,3,6,9,12."),
    micro_compile: str = typer.Option("off", "--micro-compile", help="Study mode: torch.compile the variants: off, on, both."),
    micro_steps: int = typer.Option(20, "--micro-steps", help="Study mode: timed steps per variant."),
    micro_warmup: int = typer.Option(3, "--micro-warmup", help="Study mode: untimed steps per variant (incl. capture)."),
    study_timeout: float = typer.Option(300, "--study-timeout", help="Study mode: seconds per study measurement."),
    micro_timeout: float = typer.Option(90, "--micro-timeout", help="Study mode: seconds per variant."),
) -> None:
    """Time diffablate's training fast path against a diffusers-example loop on the same UNet and batch;
    also sampling and FID-feature throughput, MFU, and fp32-vs-fast loss-curve agreement. With --study SPEC:
    the study's training the way a user runs it, packed or not, and the packing variants (studies/bench_pack.py)."""
    from diffablate.studies import bench, preflight

    preflight.bench(device=device, out=out, sets=list(set_ or []))
    if study is not None:
        _study_bench(study, device, trials, train_steps, pack, reference_steps, parts, modes, micro_variants, micro_k,
                     micro_compile, micro_steps, micro_warmup, study_timeout, micro_timeout, list(set_ or []), out, no_save)
        return
    try:
        precisions = tuple(p.strip() for p in reference.split(",") if p.strip() and p.strip() != "none")
        bad = [p for p in precisions if p not in ("no", "bf16", "fp16")]
        if bad or not (precisions or reference.strip() == "none"):
            raise bench.BenchError(f"--reference: expected none or a comma-separated subset of no,bf16,fp16, got {reference!r}")
        variants = parse_variants(variant or [])
        partial = None if no_save else (out or bench.RESULTS_FILE).with_suffix(".partial.json")
        record = bench.run_bench(device=device, batch_size=batch_size, steps=steps, warmup=warmup, width=model_width,
                                 reference_precisions=precisions, curve_steps=curve_steps, sample_n=sample_n,
                                 sample_batch=sample_batch, fid_n=fid_n, fid_batch=fid_batch, profile=profile,
                                 n_train=n_train, overrides=list(set_ or []), command=bench.command_line(),
                                 variants=variants, on_part=partial and (lambda rec: _write_partial(partial, rec)),
                                 log=typer.echo)
    except (ConfigError, bench.BenchError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    if not no_save:
        path = bench.append_result(record, out or bench.RESULTS_FILE)
        typer.echo(f"appended to {path}")
        if partial is not None:
            partial.unlink(missing_ok=True)
    summary = {k: record[k] for k in record if k.startswith("speedup_vs_")}
    typer.echo(json.dumps(summary))


def parse_variants(items: list[str]) -> dict[str, list[str]]:
    """["name:k=v,k=v", ...] -> {name: ["k=v", "k=v"]}; BenchError naming --variant on a malformed item."""
    from diffablate.studies.bench import BenchError

    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, rest = item.partition(":")
        sets = [kv.strip() for kv in rest.split(",") if kv.strip()]
        if not sep or not name.strip() or not sets or any("=" not in kv for kv in sets):
            raise BenchError(f"--variant: expected NAME:key=value[,key=value...], got {item!r}")
        if name.strip() in out or name.strip() == "diffablate":
            raise BenchError(f"--variant: duplicate or reserved name {name.strip()!r}")
        out[name.strip()] = sets
    return out


def _write_partial(path: Path, record: dict) -> None:
    """The record so far, rewritten after each part: a run killed at a time limit still leaves its numbers."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, default=str))
    tmp.replace(path)


def _study_bench(study: Path, device: str, trials: int, train_steps: int, pack: int, reference_steps: int, parts: str,
                 modes: str, micro_variants: str, micro_k: str, micro_compile: str, micro_steps: int, micro_warmup: int,
                 study_timeout: float, micro_timeout: float, overrides: list[str], out: Optional[Path],
                 no_save: bool) -> None:
    from diffablate.models.device import resolve_device
    from diffablate.studies import bench, bench_pack
    from diffablate.studies.spec import SpecError

    def csv(text: str) -> tuple[str, ...]:
        return tuple(x.strip() for x in text.split(",") if x.strip())

    try:
        resolve_device(device, "--device")
        ks = csv(micro_k)
        if not all(k.isdigit() for k in ks):
            raise bench_pack.StudyBenchError(f"--micro-k: expected comma-separated integers, got {micro_k!r}")
        compiles = {"off": (False,), "on": (True,), "both": (False, True)}.get(micro_compile)
        if compiles is None:
            raise bench_pack.StudyBenchError(f"--micro-compile: expected off, on or both, got {micro_compile!r}")
        if pack < 0 or train_steps < 0:
            raise bench_pack.StudyBenchError("--pack and --train-steps must be >= 0")
        path = out or bench.RESULTS_FILE
        bench_pack.run_study_bench(
            study, device=device, trials=trials, train_steps=train_steps or None, pack=pack or None,
            reference_steps=reference_steps, parts=csv(parts), modes=csv(modes), micro_variants=csv(micro_variants),
            micro_k=tuple(int(k) for k in ks), micro_compile=compiles, micro_steps=micro_steps,
            micro_warmup=micro_warmup, study_timeout_s=study_timeout, micro_timeout_s=micro_timeout,
            overrides=overrides, command=bench.command_line(),
            on_record=None if no_save else (lambda rec: bench.append_result(rec, path)), log=typer.echo)
    except (ConfigError, SpecError, bench_pack.StudyBenchError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    if not no_save:
        typer.echo(f"appended to {path}")
