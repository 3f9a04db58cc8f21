"""`diffablate bench --study SPEC`: a study's training timed the way a user runs it, and the ways to pack it.

Two parts, every measurement in a subprocess of its own with a timeout. A worker streams phase timestamps
back (`PHASE` lines: build, compile, warm-up, capture, steady state, per member), so a run that hangs is
located; on a timeout the parent first asks the worker for every thread's Python stack (faulthandler on
SIGUSR1) and keeps it with the record, then kills the worker's process group. Each record is appended to
`studies/bench_results.jsonl` as soon as it exists (the classic bench's format: date, device, command).

**study** - the spec's first `trials` trials in seed-major plan order (so a short list mixes the cells),
`train.steps` overridden, three ways:

- `off`: one worker process training them one at a time (`trainer.open_run` / `step.train_step` /
  `trainer.after_step` / `trainer.finish`: what `trainer.train` runs, with phase marks) - today's path, in
  which a `study run` worker pays model build, compile and capture per trial and the imports and data once;
- `pack`: one process, `pack.train_pack` over groups of at most `pack` trials with equal `pack_key`;
- `reference`: the diffusers-example loop (`bench.ReferenceLoop`, bf16 autocast) trial by trial in one
  process; it runs `reference_steps` steps per trial, and the trial time is its build time plus
  train.steps x its measured ms/step (stated as extrapolated in the record).

Training only (evaluation is not timed: it is the same per trial whichever way the steps ran).

**micro** - steady-state img/s of K copies of the study's UNet (the first trial's config, seeds 0..K-1,
its batch per copy), per variant:

- `serial`: K step contexts, each step one after the other on one stream (K CUDA graphs on a GPU);
- `streams`: the same, each member on its own CUDA stream (what `train_pack` does; CUDA only);
- `vmap`: `torch.func.stack_module_state` + `vmap` over the K copies: one fused forward/backward, one AdamW
  over the stacked parameters, per-copy gradient clipping, eager;
- `vmap-graph`: that fused step captured in one CUDA graph (CUDA only);

each with or without torch.compile (`micro_compile`). Warnings the variant raised (e.g. vmap falling back
to a loop for an op without a batching rule) are kept with the record.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from diffablate.models.config import RunConfig

PARTS = ("study", "micro")
STUDY_MODES = ("off", "pack", "reference")
MICRO_VARIANTS = ("serial", "streams", "vmap", "vmap-graph")
CUDA_ONLY = {"streams", "vmap-graph"}
MICRO_DATA = {"data.n_train": 1024, "data.n_heldout": 64}  # micro variants time steps, not data rendering


class StudyBenchError(ValueError):
    """A bad option of the study bench (named in the message)."""


# --- the plan -----------------------------------------------------------------------------------------------


def study_trials(spec_path: str | Path, n: int, *, steps: int | None, device: str,
                 overrides: list[str] | None = None) -> list[RunConfig]:
    """The first `n` trials of the spec's plan in seed-major order, with train.steps / device / overrides."""
    from diffablate.studies.spec import load_spec

    spec = load_spec(spec_path)
    plan = [spec.cell_config(cell, seed) for seed in spec.seeds for cell in spec.cells]
    if not plan:
        raise StudyBenchError(f"--study: {spec_path} plans no trials")
    extra: dict[str, Any] = {"device": device}
    if steps is not None:
        extra["train.steps"] = steps
    cfgs = [c.with_overrides(extra) for c in plan[:n]]
    return [c.with_overrides(overrides) for c in cfgs] if overrides else cfgs


# --- running one measurement in a subprocess -------------------------------------------------------------------


def run_job(job: dict[str, Any], timeout_s: float, log: Callable[[str], None] = print,
            argv: list[str] | None = None) -> dict[str, Any]:
    """Run one worker (`python -m diffablate.studies.bench_pack JOB`) -> its record: phases [(t, name)],
    status ("ok" | "timeout" | "error"), the worker's result, and on a timeout every thread's stack."""
    argv = argv or [sys.executable, "-m", "diffablate.studies.bench_pack", json.dumps(job)]
    name = job.get("name", "job")
    with tempfile.TemporaryDirectory(prefix="diffablate-bp-") as tmp:
        err_path = Path(tmp) / "stderr"
        with err_path.open("w") as err:
            # A session of its own: a timeout kills the worker and whatever it started (Inductor's compile pool).
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
        phases: list[tuple[float, str]] = []
        result: dict[str, Any] | None = None
        t0, status, stack = time.monotonic(), "ok", ""
        while True:
            left = timeout_s - (time.monotonic() - t0)
            try:
                line = lines.get(timeout=max(0.05, min(left, 1.0)))
            except queue.Empty:
                line = ""
            if line is None:  # the worker closed stdout: it is done
                break
            if line.startswith("PHASE "):
                mark = json.loads(line[6:])
                phases.append((round(mark["t"], 2), mark["phase"]))
                log(f"  [{name}] {mark['t']:7.1f} s  {mark['phase']}")
            elif line.startswith("RESULT "):
                result = json.loads(line[7:])
            if left <= 0:
                status, stack = "timeout", _stack_then_kill(proc, err_path)
                break
        rc = proc.wait()
        if status == "ok" and (rc != 0 or result is None):
            status = "error"
        tail = err_path.read_text(errors="replace")[-4000:]
    record = {"name": name, "status": status, "rc": rc, "wall_s": round(time.monotonic() - t0, 2),
              "phases": phases, "last_phase": phases[-1][1] if phases else "(none: before the worker started)",
              "result": result}
    if status != "ok":
        record["stderr_tail"] = tail
    if stack:
        record["stack"] = stack
    return record


def _pump(stream: Any, out: "queue.Queue[str | None]") -> None:
    for line in stream:
        out.put(line.rstrip("\n"))
    out.put(None)


def _stack_then_kill(proc: subprocess.Popen, err_path: Path) -> str:
    """SIGUSR1 -> the worker's faulthandler writes every thread's stack to stderr; then kill its group."""
    before = err_path.stat().st_size
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGUSR1)
        time.sleep(3.0)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    with err_path.open(errors="replace") as f:
        f.seek(before)
        return f.read()[:8000]  # each thread's stack starts with its innermost frame: where it is stuck


# --- the worker side -------------------------------------------------------------------------------------------


class _Phases:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self, name: str) -> None:
        print("PHASE " + json.dumps({"t": time.perf_counter() - self.t0, "phase": name}), flush=True)


def worker_main(job: dict[str, Any]) -> None:
    """Entry point of a worker process (see `run_job`)."""
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    phase = _Phases()
    phase("python up")
    import warnings

    import torch

    from diffablate.studies import bench

    phase("torch imported")
    cfgs = [RunConfig.from_dict(d) for d in job["cfgs"]]
    device = torch.device(cfgs[0].device)
    with warnings.catch_warnings(record=True) as caught, tempfile.TemporaryDirectory(prefix="diffablate-bp-") as tmp:
        warnings.simplefilter("always")
        out = JOBS[job["part"]](job, cfgs, Path(tmp), phase)
    out["warnings"] = sorted({f"{w.category.__name__}: {str(w.message)[:200]}" for w in caught})[:20]
    out["device_info"] = bench._device_info(device)
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    print("RESULT " + json.dumps(out, default=str), flush=True)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _images(cfgs: list[RunConfig]) -> int:
    return sum(c.train.steps * c.train.batch_size for c in cfgs)


def job_off(job: dict[str, Any], cfgs: list[RunConfig], tmp: Path, phase: Callable[[str], None]) -> dict[str, Any]:
    """Today's path: one trial after the other in one worker (the calls `trainer.train` makes)."""
    from diffablate.models import step, trainer

    trials = []
    t_first = time.perf_counter()
    for i, cfg in enumerate(cfgs):
        t0 = time.perf_counter()
        run = trainer.open_run(cfg, tmp / f"t{i}", resume=False)
        phase(f"trial {i}: built (data, models, compile)")
        run.lr = step.train_step(run.s, run.step)
        run.step += 1
        _sync(run.s.device)
        phase(f"trial {i}: first step done (graph captured: {run.s.graph is not None and run.s.graph.graph is not None})")
        trainer.after_step(run)
        while run.step < run.total:
            run.lr = step.train_step(run.s, run.step)
            run.step += 1
            trainer.after_step(run)
        result = trainer.finish(run)
        phase(f"trial {i}: done")
        trials.append({"wall_s": time.perf_counter() - t0, "img_per_s": result.img_per_s, "steps": result.steps_done})
    wall = time.perf_counter() - t_first
    train_s = sum(c.train.steps * c.train.batch_size / t["img_per_s"] for c, t in zip(cfgs, trials))
    return {"trials": trials, "trials_wall_s": wall, "train_s": train_s, "images": _images(cfgs)}


def job_pack(job: dict[str, Any], cfgs: list[RunConfig], tmp: Path, phase: Callable[[str], None]) -> dict[str, Any]:
    """`train_pack` over groups of at most job["pack"] trials with equal pack_key, group after group."""
    from diffablate.models import pack

    groups: dict[str, list[int]] = {}
    for i, c in enumerate(cfgs):
        groups.setdefault(pack.pack_key(c), []).append(i)
    chunks = [idx[j:j + job["pack"]] for idx in groups.values() for j in range(0, len(idx), job["pack"])]
    packs = []
    t_first = time.perf_counter()
    for g, idx in enumerate(chunks):
        t0 = time.perf_counter()
        phase(f"pack {g}: {len(idx)} members")
        results = pack.train_pack([pack.PackMember(cfgs[i], tmp / f"t{i}", resume=False) for i in idx],
                                  log=lambda m, g=g: phase(f"pack {g}: {m}"))
        failed = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, Exception)]
        # Members share the pack's training time: their img/s add up to the pack's.
        rate = sum(r.img_per_s for r in results if not isinstance(r, Exception))
        packs.append({"members": idx, "wall_s": time.perf_counter() - t0, "failed": failed, "img_per_s": rate,
                      "train_s": _images([cfgs[i] for i in idx]) / rate if rate else float("nan")})
    wall = time.perf_counter() - t_first
    return {"packs": packs, "trials_wall_s": wall, "train_s": sum(p["train_s"] for p in packs), "images": _images(cfgs)}


def job_reference(job: dict[str, Any], cfgs: list[RunConfig], tmp: Path, phase: Callable[[str], None]) -> dict[str, Any]:
    """The diffusers-example loop trial by trial; steps beyond job["reference_steps"] extrapolated."""
    from diffablate.studies import bench

    trials = []
    for i, cfg in enumerate(cfgs):
        t0 = time.perf_counter()
        loop = bench.ReferenceLoop(cfg, "bf16")
        build = time.perf_counter() - t0
        phase(f"trial {i}: built")
        n = min(cfg.train.steps, job["reference_steps"])
        _, step_ms = bench._timed(loop.device, n, cfg.train.batch_size, loop.step)  # .item() per step: synced
        phase(f"trial {i}: {n} steps at {step_ms:.1f} ms")
        trials.append({"build_s": build, "step_ms": step_ms, "steps_run": n,
                       "wall_s": build + cfg.train.steps * step_ms / 1000, "extrapolated": n < cfg.train.steps})
        del loop
    train_s = sum(c.train.steps * t["step_ms"] / 1000 for c, t in zip(cfgs, trials))
    return {"trials": trials, "trials_wall_s": sum(t["wall_s"] for t in trials), "train_s": train_s,
            "images": _images(cfgs)}


def job_micro(job: dict[str, Any], cfgs: list[RunConfig], tmp: Path, phase: Callable[[str], None]) -> dict[str, Any]:
    """Steady-state img/s of len(cfgs) copies under job["variant"] (see the module docstring)."""
    variant, steps, warmup = job["variant"], job["steps"], job["warmup"]
    run = _micro_vmap if variant.startswith("vmap") else _micro_contexts
    img, step_ms, extra = run(job, cfgs, tmp, phase, steps, warmup)
    return {"img_per_s": img, "step_ms": step_ms, **extra}


def _micro_contexts(job: dict[str, Any], cfgs: list[RunConfig], tmp: Path, phase: Callable[[str], None],
                    steps: int, warmup: int) -> tuple[float, float, dict[str, Any]]:
    import torch

    from diffablate.models import pack, step, trainer

    ctxs = []
    for k, cfg in enumerate(cfgs):
        ctxs.append(trainer.build_context(cfg, tmp / f"m{k}"))
        phase(f"member {k} built" + (" and compiled" if ctxs[-1].forward_denoiser is not ctxs[-1].model.denoiser else ""))
    device = ctxs[0].device
    streams = [torch.cuda.Stream(device) if job["variant"] == "streams" else None for _ in ctxs]

    def one_round(i: int) -> None:
        for s, st in zip(ctxs, streams):
            with pack.on_stream(st, device):
                step.train_step(s, i)

    for k, (s, st) in enumerate(zip(ctxs, streams)):  # first steps one by one: each captures its graph
        with pack.on_stream(st, device):
            step.train_step(s, 0)
        _sync(device)
        phase(f"member {k} first step (graph captured: {s.graph is not None and s.graph.graph is not None})")
    for i in range(1, warmup):
        one_round(i)
    _sync(device)
    phase("warm-up done")
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        one_round(i)
    _sync(device)
    dt = time.perf_counter() - t0
    phase("steady state timed")
    B = cfgs[0].train.batch_size
    return (len(cfgs) * B * steps / dt, 1000 * dt / steps,
            {"graphs": [s.graph is not None and s.graph.graph is not None for s in ctxs],
             "compiled": [s.forward_denoiser is not s.model.denoiser for s in ctxs]})


def _micro_vmap(job: dict[str, Any], cfgs: list[RunConfig], tmp: Path, phase: Callable[[str], None],
                steps: int, warmup: int) -> tuple[float, float, dict[str, Any]]:
    """K copies as one program: stacked parameters, a vmapped loss, one AdamW, per-copy clipping and EMA."""
    import torch
    from torch.func import functional_call, stack_module_state, vmap

    from diffablate.models import cuda_graph, diffusion, step, trainer

    eager = [c.with_overrides({"perf.compile": "off", "perf.cuda_graphs": "off"}) for c in cfgs]
    ctxs = [trainer.build_context(c, tmp / f"m{k}") for k, c in enumerate(eager)]
    device, cfg = ctxs[0].device, cfgs[0]
    phase(f"{len(ctxs)} members built")

    class Loss(torch.nn.Module):
        def __init__(self, s: step.StepContext) -> None:
            super().__init__()
            self.bundle, self.scheduler = s.model, s.scheduler

        def forward(self, x0: Any, ids: Any, mask: Any, t: Any, noise: Any) -> Any:
            text = self.bundle.text_encoder.encode(ids, mask)
            return diffusion.training_losses(self.bundle.denoiser, self.scheduler, x0, t, noise, text,
                                             cfg.diffusion.prediction_type).float()

    mods = [Loss(s) for s in ctxs]
    params, buffers = stack_module_state(mods)
    template = copy.deepcopy(mods[0]).to("meta")
    fwd = vmap(lambda p, b, *xs: functional_call(template, (p, b), xs), randomness="different")
    if cfg.perf.compile != "off":
        fwd = torch.compile(fwd)
    plist = list(params.values())
    graphed = job["variant"] == "vmap-graph"
    opt = torch.optim.AdamW(plist, lr=cfg.train.lr, betas=(0.9, cfg.train.adam_beta2),
                            weight_decay=cfg.train.weight_decay, fused=device.type == "cuda" or None,
                            capturable=graphed)
    ema = [p.detach().clone() for p in plist]
    weighting = ctxs[0].loss_weighting
    keys = ("x0", "ids", "mask", "t", "w", "noise")
    phase("stacked")

    def draw(i: int) -> dict[str, Any]:
        batches = [step.draw_batch(s, i) for s in ctxs]
        return {k: torch.stack([getattr(b, k) for b in batches]) for k in keys}

    def fused_step(x: dict[str, Any]) -> Any:
        with ctxs[0].autocast():  # the run's mixed precision, as the other variants
            losses = fwd(params, buffers, x["x0"], x["ids"], x["mask"], x["t"], x["noise"])  # [K, B]
        objective = (losses * x["w"] * weighting(x["t"])).mean(dim=1)
        opt.zero_grad(set_to_none=True)
        objective.sum().backward()  # the copies share no parameter: each gets its own gradient
        grads = [p.grad for p in plist]
        norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()  # per copy
        coef = (cfg.train.grad_clip / (norms + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, [coef.view(-1, *([1] * (g.dim() - 1))) for g in grads])
        opt.step()
        torch._foreach_lerp_(ema, plist, 1.0 - cfg.train.ema_decay)
        return losses

    static = draw(0)
    if graphed:
        graph, _ = cuda_graph.capture(lambda: fused_step(static), device, cuda_graph.WARMUP_ITERS,
                                      before_capture=lambda: opt.zero_grad(set_to_none=True))
        phase("warm-up + capture done")

        def run_step(i: int) -> None:
            for k, v in draw(i).items():
                static[k].copy_(v, non_blocking=True)
            graph.replay()
    else:
        def run_step(i: int) -> None:
            fused_step(draw(i))

    for i in range(1, warmup):
        run_step(i)
    _sync(device)
    phase("warm-up done" + (" (first call compiled)" if cfg.perf.compile != "off" else ""))
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        run_step(i)
    _sync(device)
    dt = time.perf_counter() - t0
    phase("steady state timed")
    return len(cfgs) * cfg.train.batch_size * steps / dt, 1000 * dt / steps, {"graphs": graphed}


JOBS: dict[str, Callable[..., dict[str, Any]]] = {"off": job_off, "pack": job_pack, "reference": job_reference,
                                                  "micro": job_micro}


# --- the whole bench ----------------------------------------------------------------------------------------------


def run_study_bench(spec_path: str | Path, *, device: str = "cuda", trials: int = 4, train_steps: int | None = 150,
                    pack: int | None = None, reference_steps: int = 40, parts: tuple[str, ...] = PARTS,
                    modes: tuple[str, ...] = STUDY_MODES, micro_variants: tuple[str, ...] = MICRO_VARIANTS,
                    micro_k: tuple[int, ...] = (3,), micro_compile: tuple[bool, ...] = (False,), micro_steps: int = 30,
                    micro_warmup: int = 5, study_timeout_s: float = 300, micro_timeout_s: float = 90,
                    overrides: list[str] | None = None, command: str = "",
                    on_record: Callable[[dict[str, Any]], None] | None = None,
                    log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run the parts asked for (module docstring); `on_record(record)` after every measurement (appending
    it to the results file). Returns the records. Bad options raise StudyBenchError before any compute."""
    _check_options(parts, modes, micro_variants, micro_k, trials, reference_steps, micro_steps, micro_warmup)
    save = on_record or (lambda r: None)
    cfgs = study_trials(spec_path, trials, steps=train_steps, device=device, overrides=overrides)
    records: list[dict[str, Any]] = []

    def measure(job: dict[str, Any], timeout_s: float, **fields: Any) -> None:
        log(f"{job['name']}: starting (timeout {timeout_s:.0f} s)")
        rec = run_job(job, timeout_s, log)
        res = rec.get("result") or {}
        record = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "kind": "study-bench",
                  "device": device, **res.pop("device_info", {}), "command": command, "spec": str(spec_path),
                  **fields, **rec}
        record.update(_summary(record))
        records.append(record)
        save(record)
        log(f"{job['name']}: {record['status']} after {record['wall_s']:.0f} s; {_brief(record)}")

    if "study" in parts:
        k = pack or len(cfgs)
        for mode in modes:
            job = {"name": f"study-{mode}" + (f"-K{k}" if mode == "pack" else ""), "part": mode,
                   "cfgs": [c.to_dict() for c in cfgs], "pack": k, "reference_steps": reference_steps}
            measure(job, study_timeout_s, part="study", mode=mode, trials=len(cfgs), pack=k if mode == "pack" else None,
                    train_steps=cfgs[0].train.steps, batch_size=cfgs[0].train.batch_size)
    if "micro" in parts:
        base = cfgs[0].with_overrides(MICRO_DATA)
        for variant in micro_variants:
            for compiled in micro_compile:
                for k in micro_k:
                    name = f"micro-{variant}-K{k}" + ("-compile" if compiled else "")
                    if variant in CUDA_ONLY and not device.startswith("cuda"):
                        log(f"{name}: skipped (needs CUDA)")
                        continue
                    perf = {"perf.compile": "on" if compiled else "off",
                            "perf.cuda_graphs": "auto" if variant in ("serial", "streams") else "off"}
                    members = [base.with_overrides({**perf, "seed": j}).to_dict() for j in range(k)]
                    job = {"name": name, "part": "micro", "variant": variant, "cfgs": members, "steps": micro_steps,
                           "warmup": micro_warmup}
                    measure(job, micro_timeout_s, part="micro", variant=variant, k=k, compile=compiled,
                            batch_size=base.train.batch_size)
    log(table(records))
    return records


def _check_options(parts: tuple[str, ...], modes: tuple[str, ...], variants: tuple[str, ...], ks: tuple[int, ...],
                   trials: int, reference_steps: int, micro_steps: int, micro_warmup: int) -> None:
    for opt, given, known in (("--parts", parts, PARTS), ("--modes", modes, STUDY_MODES),
                              ("--micro-variants", variants, MICRO_VARIANTS)):
        bad = [g for g in given if g not in known]
        if bad or not given:
            raise StudyBenchError(f"{opt}: expected a comma-separated subset of {list(known)}, got {list(given)}")
    if not ks or any(k < 1 for k in ks):
        raise StudyBenchError(f"--micro-k: expected positive integers, got {list(ks)}")
    if trials < 1 or reference_steps < 1 or micro_steps < 1 or micro_warmup < 1:
        raise StudyBenchError("--trials, --reference-steps, --micro-steps and --micro-warmup must be >= 1")


def _summary(rec: dict[str, Any]) -> dict[str, Any]:
    """A study record: trials/hour and img/s over the trials' wall time (every per-trial cost included),
    img/s over the pure training time, and the per-trial fixed cost (wall minus training, per trial).
    A micro record: its steady-state img/s."""
    res = rec.get("result") or {}
    if rec.get("part") == "micro":
        return {"train_img_per_s": res.get("img_per_s")}
    wall = res.get("trials_wall_s")
    if not wall:
        return {}
    return {"trials_per_hour": rec["trials"] / wall * 3600, "img_per_s": res["images"] / wall,
            "train_img_per_s": res["images"] / res["train_s"],
            "fixed_s_per_trial": (wall - res["train_s"]) / rec["trials"]}


def _brief(rec: dict[str, Any]) -> str:
    if rec["status"] != "ok":
        return f"last phase: {rec['last_phase']}"
    return ", ".join(f"{_fmt(rec.get(k))} {unit}" for k, unit in (
        ("train_img_per_s", "img/s training"), ("img_per_s", "img/s over the trials' wall time"),
        ("trials_per_hour", "trials/h"), ("fixed_s_per_trial", "s fixed cost per trial")) if rec.get(k))


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:,.0f}" if abs(v) >= 10 else f"{v:.1f}"


def table(records: list[dict[str, Any]]) -> str:
    """The short table printed at the end."""
    rows = [("measurement", "status", "train img/s", "wall img/s", "trials/h", "fixed s/trial", "wall s", "last phase")]
    for r in records:
        rows.append((r["name"], r["status"], _fmt(r.get("train_img_per_s")), _fmt(r.get("img_per_s")),
                     _fmt(r.get("trials_per_hour")), _fmt(r.get("fixed_s_per_trial")), f"{r['wall_s']:.0f}",
                     "" if r["status"] == "ok" else r["last_phase"]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


if __name__ == "__main__":
    try:
        worker_main(json.loads(sys.argv[1]))
    except Exception:  # the parent reads the traceback from stderr and records status "error"
        traceback.print_exc()
        sys.exit(1)
