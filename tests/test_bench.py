"""diffablate bench: the reference loop and the trainer measure the same loss; fast vs fp32 agree; the bench runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffablate.models import step, trainer
from diffablate.studies import bench

TINY = ["data.resolution=8", "data.n_heldout=8", "text.embed_dim=16", "eval.sampling_steps=2", "train.warmup_steps=5"]


def _cfg(**perf: str):
    cfg = bench.bench_config(width=32, batch_size=4, device="cpu", n_train=16, overrides=TINY)
    return cfg.with_overrides({f"perf.{k}": v for k, v in perf.items()}) if perf else cfg


def test_reference_loss_is_the_trainers_objective(tmp_path: Path) -> None:
    """On a fixed batch the diffusers-example loss (F.mse_loss mean) equals the trainer's optimised objective
    (uniform sampler: weights 1, no loss weighting) and the mean of its per-example losses."""
    c = trainer.build_context(_cfg(), tmp_path)
    batch = step.draw_batch(c, 0)
    assert torch.equal(batch.w, torch.ones_like(batch.w))
    losses, objective = step.losses(c, batch)
    text = c.model.text_encoder(batch.captions)
    ref = bench.reference_loss(c.model.denoiser, c.scheduler, batch.x0, batch.t, batch.noise, text,
                               c.cfg.diffusion.prediction_type)
    assert ref.item() == pytest.approx(objective.item(), rel=1e-5)
    assert ref.item() == pytest.approx(losses.mean().item(), rel=1e-5)


def test_bf16_fast_switches_agree_with_fp32_on_a_fixed_batch(tmp_path: Path) -> None:
    """The CPU-testable fast switches (bf16 autocast, channels_last) change the loss only by bf16 rounding."""
    fp32 = trainer.build_context(_cfg(), tmp_path / "a")
    fast = trainer.build_context(_cfg(mixed_precision="bf16", channels_last="on"), tmp_path / "b")
    assert fast.perf.mixed_precision == "bf16" and fast.perf.channels_last
    b32, bfast = step.draw_batch(fp32, 0), step.draw_batch(fast, 0)
    assert torch.equal(b32.t, bfast.t) and torch.equal(b32.noise, bfast.noise) and b32.captions == bfast.captions
    l32, o32 = step.losses(fp32, b32)
    lfast, ofast = step.losses(fast, bfast)
    assert lfast.dtype == torch.float32  # the reduction stays fp32 under autocast
    assert ofast.item() == pytest.approx(o32.item(), rel=3e-2)
    assert torch.allclose(lfast, l32, rtol=5e-2, atol=1e-3)


def test_curve_agreement_measures_relative_difference() -> None:
    a = torch.linspace(1.0, 0.5, 100, dtype=torch.float64)
    assert bench.curve_agreement(a, a.clone(), window=10)["max_rel_diff"] == 0.0
    assert bench.curve_agreement(a, a * 1.1, window=10)["max_rel_diff"] == pytest.approx(0.1)


@pytest.mark.slow
def test_bench_runs_end_to_end_on_cpu(tmp_path: Path) -> None:
    record = bench.run_bench(device="cpu", batch_size=4, steps=2, warmup=1, width=32, reference_precisions=("no",),
                             curve_steps=30, sample_n=4, sample_batch=4, profile=2, n_train=16, overrides=TINY,
                             variants={"nhwc": ["perf.channels_last=on"]}, command="test", log=lambda s: None)
    loops = record["loops"]
    assert set(loops) == {"reference-fp32", "diffablate", "nhwc"}
    assert all(r["img_per_s"] > 0 for r in loops.values())
    assert loops["nhwc"]["extra"]["perf_resolved"]["channels_last"] is True
    assert record["flops_per_step"] > 0 and record["speedup_vs_reference-fp32"] > 0
    assert record["speedup_vs_reference-fp32__nhwc"] > 0
    assert set(record["sampling"]) == {"diffablate", "nhwc"}
    assert all(s["img_per_s"] > 0 for s in record["sampling"].values())
    assert "profile:" in record["profile_table"]
    # On the CPU "auto" resolves every switch to the fp32 eager path: that curve is the same run as fp32's;
    # channels_last changes only the convolutions' summation order.
    assert record["curves"]["diffablate"]["max_rel_diff"] == 0.0 and record["curves"]["diffablate"]["steps"] == 30
    assert record["curves"]["nhwc"]["max_rel_diff"] < 1e-3
    path = bench.append_result(record, tmp_path / "r.jsonl")
    assert json.loads(path.read_text().splitlines()[-1])["command"] == "test"


def test_cli_errors_exit_2_before_compute() -> None:
    from typer.testing import CliRunner

    from diffablate.studies.cli import app

    runner = CliRunner()
    if not torch.cuda.is_available():
        r = runner.invoke(app, ["bench", "--device", "cuda", "--no-save"])
        assert r.exit_code == 2 and "error: device" in r.output
    r = runner.invoke(app, ["bench", "--device", "cpu", "--reference", "fp64", "--no-save"])
    assert r.exit_code == 2 and "error: --reference" in r.output
    r = runner.invoke(app, ["bench", "--device", "cpu", "--model-width", "44", "--no-save"])
    assert r.exit_code == 2 and "--model-width" in r.output
    for bad in ("nocolon", "x:", "x:perf.compile", "diffablate:perf.compile=off"):
        r = runner.invoke(app, ["bench", "--device", "cpu", "--variant", bad, "--no-save"])
        assert r.exit_code == 2 and "--variant" in r.output, bad
    r = runner.invoke(app, ["bench", "--device", "cpu", "--variant", "x:perf.compile=maybe", "--no-save"])
    assert r.exit_code == 2 and "perf.compile" in r.output


# --- bench --study (studies/bench_pack.py) ------------------------------------------------------------------

SMOKE = Path(__file__).resolve().parents[1] / "studies" / "smoke.toml"
STUDY_TINY = ["data.n_train=64", "data.n_heldout=16", "eval.sampling_steps=2"]


def _micro_job(**kw: object) -> dict:
    from diffablate.studies import bench_pack

    cfg = bench_pack.study_trials(SMOKE, 1, steps=2, device="cpu", overrides=STUDY_TINY)[0]
    return {"name": "t", "part": "micro", "variant": "serial", "cfgs": [cfg.to_dict()], "steps": 1, "warmup": 1, **kw}


def test_study_bench_locates_a_hang_and_keeps_the_stacks() -> None:
    """A measurement past its timeout: the record names the last phase reached and carries every thread's
    Python stack (faulthandler, asked for before the kill)."""
    from diffablate.studies import bench_pack

    rec = bench_pack.run_job(_micro_job(steps=10**6), timeout_s=8, log=lambda s: None)
    assert rec["status"] == "timeout" and rec["rc"] != 0
    assert rec["phases"] and rec["phases"][0][1] == "python up" and rec["last_phase"] == rec["phases"][-1][1]
    assert "File " in rec["stack"] and "thread" in rec["stack"].lower()


def test_study_bench_records_a_failing_worker() -> None:
    from diffablate.studies import bench_pack

    rec = bench_pack.run_job(_micro_job(part="no-such-part"), timeout_s=300, log=lambda s: None)
    assert rec["status"] == "error" and rec["result"] is None and "KeyError" in rec["stderr_tail"]


def test_study_bench_cli_errors_exit_2_before_compute(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from diffablate.studies.cli import app

    runner = CliRunner()
    out = tmp_path / "r.jsonl"
    for args, field in ((["--study", str(tmp_path / "missing.toml")], "cannot read study spec"),
                        (["--study", str(SMOKE), "--micro-k", "3,x"], "--micro-k"),
                        (["--study", str(SMOKE), "--parts", "study,bogus"], "--parts"),
                        (["--study", str(SMOKE), "--micro-variants", "vmap,warp"], "--micro-variants"),
                        (["--study", str(SMOKE), "--micro-compile", "maybe"], "--micro-compile"),
                        (["--study", str(SMOKE), "--set", "train.batch_size=-1"], "train.batch_size")):
        r = runner.invoke(app, ["bench", "--device", "cpu", "--out", str(out), *args])
        assert r.exit_code == 2 and "error:" in r.output and field in r.output, (args, r.output)
    assert not out.exists()


@pytest.mark.slow
def test_study_bench_runs_end_to_end_on_cpu(tmp_path: Path) -> None:
    from diffablate.studies import bench_pack

    out = tmp_path / "r.jsonl"
    records = bench_pack.run_study_bench(SMOKE, device="cpu", trials=2, train_steps=3, reference_steps=2, micro_k=(2,),
                                         micro_steps=2, micro_warmup=1, overrides=STUDY_TINY, command="test",
                                         on_record=lambda r: bench.append_result(r, out), log=lambda s: None)
    assert [r["name"] for r in records] == ["study-off", "study-pack-K2", "study-reference", "micro-serial-K2",
                                            "micro-vmap-K2"]  # streams / vmap-graph need CUDA
    assert all(r["status"] == "ok" for r in records), [(r["name"], r.get("stderr_tail")) for r in records]
    for r in records[:3]:
        assert r["trials"] == 2 and r["trials_per_hour"] > 0 and r["train_img_per_s"] > r["img_per_s"] > 0
    assert records[1]["result"]["packs"][0]["members"] == [0, 1] and not records[1]["result"]["packs"][0]["failed"]
    assert all(r["train_img_per_s"] > 0 for r in records[3:])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["name"] for line in lines] == [r["name"] for r in records]
    assert all(line["command"] == "test" and line["date"] and line["device_name"] for line in lines)
