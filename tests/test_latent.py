"""The latent-space axis wired end to end (issue 18) on the CPU: a latent run and a pixel run train, sample and
are scored through the same code on images of the same shape; a latent run resumes bit for bit; a resume or a
load with another VAE is refused; the samplers never clip latents; and a latent run without its VAE is refused
before anything is created, with the command that trains it. (The VAE's own round trip: tests/test_vae.py.)"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
import tomli_w
from typer.testing import CliRunner

from diffablate.metrics.reconstruction import psnr_ssim
from diffablate.models import diffusion, vae
from diffablate.models import trainer as tr
from diffablate.models.checkpoint import CheckpointError
from diffablate.models.config import ConfigError, DataConfig, RunConfig, VaeConfig
from diffablate.models.data import build_dataset
from diffablate.models.space import LatentSpace, PixelSpace, build_space
from diffablate.models.tracker import MemoryTracker

DATA = DataConfig(resolution=16, n_train=64, n_heldout=16)
# A VAE trained just enough to be a codec (f = 4: 16 px -> 4 x 4 x 4 latents); ~5 s on one core.
TINY_VAE = VaeConfig(block_channels=(8, 16, 16), mid_attention=False, steps=40, batch_size=16, lr=3e-3, warmup_steps=5)
BASE = {
    "device": "cpu", "model.block_channels": [16, 32], "model.attention_levels": [False, True],
    "text.embed_dim": 32, "train.batch_size": 8, "train.steps": 8, "train.lr": 1e-3, "train.warmup_steps": 2,
    "train.log_every": 2, "train.eval_every": 4, "train.checkpoint_every": 4, "perf.compile": "off",
    "eval.timestep_buckets": 4, "eval.sampling_steps": 2, "eval.n_samples": 6, "eval.fid": False, "eval.kid": False,
    "eval.clip_score": False, "eval.oracle": True, "eval.bootstrap": 10,
    # Loss-aware sampling with a short history exercises the sampler-state restore; T = 20 lets it warm up.
    "axes.timestep_sampler": "loss-aware", "axes.loss_aware_history": 1, "diffusion.num_train_timesteps": 20,
}


def cfg(space: str, **overrides: Any) -> RunConfig:
    c = dataclasses.replace(RunConfig(), data=DATA, vae=TINY_VAE)
    return c.with_overrides({**BASE, "axes.space": space, **overrides})


def quality(d: Path) -> dict[str, float]:
    held = build_dataset(DATA, "heldout")
    return psnr_ssim(held.images, vae.Autoencoder(d).reconstruct(held.images))


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """This module's DIFFABLATE_CACHE, holding the tiny VAE (trained once, through the cache as `vae train` does)."""
    root = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("DIFFABLATE_CACHE", str(root))
    vae.ensure_vae(DATA, TINY_VAE, evaluate=quality, progress=False, device="cpu")
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def runs(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, MemoryTracker]]:
    """One pixel and one latent run of the same config, 8 steps each, uninterrupted."""
    out = {}
    for space in ("pixel", "latent"):
        run_dir, t = tmp_path_factory.mktemp(space), MemoryTracker()
        tr.train(cfg(space), run_dir, tracker=t, progress=False)
        out[space] = (run_dir, t)
    return out


def test_pixel_and_latent_runs_give_images_of_one_shape_scored_by_one_code_path(runs, monkeypatch):
    from diffablate.studies import evaluate

    seen: dict[str, list[tuple[tuple[int, ...], torch.dtype]]] = {"pixel": [], "latent": []}
    real = evaluate.score_images
    current = {"space": ""}

    def spy(images: torch.Tensor, *args: Any, **kwargs: Any) -> dict[str, float]:
        seen[current["space"]].append((tuple(images.shape), images.dtype))
        return real(images, *args, **kwargs)

    monkeypatch.setattr(evaluate, "score_images", spy)
    metrics = {}
    for space, (run_dir, _) in runs.items():
        trained = tr.load_trained(run_dir, "cpu")
        assert trained.space is not None and trained.space.name == space
        current["space"] = space
        metrics[space] = evaluate.evaluate_trained(trained, trained.cfg, device="cpu")
    # The same number of entries, each decoded to uint8 images at the data resolution, scored by one function.
    assert seen["pixel"] == seen["latent"] == [((6, 3, 16, 16), torch.uint8)] * 4
    assert set(metrics["pixel"]) == set(metrics["latent"])
    assert {"oracle_acc/ddpm-g3", "sample_img_per_s/ddpm-g3", "sample_img_per_s/ddim-g1"} <= set(metrics["latent"])
    assert all(v > 0 for k, v in metrics["latent"].items() if k.startswith("sample_img_per_s/"))
    # The latent run's UNet is built for its latents: 4 channels at 16 / 4 = 4 px.
    latent = tr.load_trained(runs["latent"][0], "cpu")
    assert latent.denoiser.image_channels == 4 and latent.denoiser.unet.config.sample_size == 4
    assert latent.denoiser.unet.config.in_channels == 4 and isinstance(latent.space, LatentSpace)
    assert tr.load_trained(runs["pixel"][0], "cpu").denoiser.unet.config.sample_size == 16


def test_a_latent_run_logs_its_space_and_trains_on_cached_latents(runs, cache: Path):
    run_dir, t = runs["latent"]
    entry = vae.check_entry(vae.cache_path(DATA, TINY_VAE))
    assert t.params["axes.space"] == "latent" and t.params["derived.space"] == "latent"
    assert t.params["derived.vae.scaling_factor"] == pytest.approx(entry["scaling_factor"])
    assert t.params["derived.vae.weights_sha256"] == entry["weights_sha256"]
    assert t.params["derived.vae.heldout_psnr"] == pytest.approx(entry["heldout_quality"]["psnr"])
    assert (t.params["derived.space.channels"], t.params["derived.space.side"]) == (4, 4)
    assert t.params["derived.space.side"] != runs["pixel"][1].params["derived.space.side"]
    space = build_space(cfg("latent"))  # the training split and the held-out probe, each encoded once, cached
    for images in (build_dataset(DATA, "train").images, build_dataset(DATA, "heldout").images[:16]):
        assert space.latents_path(images).is_file() and space.latents_path(images).parent == cache / "latents"
    # The samples grid is decoded images: the same size as the pixel run's.
    from PIL import Image

    assert Image.open(run_dir / "samples" / "final.png").size == \
        Image.open(runs["pixel"][0] / "samples" / "final.png").size


def test_a_latent_run_resumes_exactly(runs, tmp_path: Path):
    _, ref = runs["latent"]
    first, second = MemoryTracker(), MemoryTracker()
    c = cfg("latent")
    tr.train(c.with_overrides({"train.steps": 4}), tmp_path, tracker=first, progress=False)
    tr.train(c, tmp_path, tracker=second, progress=False)
    for k in ("train_loss", "train_objective", "grad_norm"):
        assert first.series(k) + second.series(k) == ref.series(k), k  # bit for bit
    assert dict(first.series("heldout_loss") + second.series("heldout_loss")) == dict(ref.series("heldout_loss"))
    assert second.tags["diffablate.resumed_from_step"] == "4"


def test_an_interrupted_latent_run_resumes_exactly(runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _, ref = runs["latent"]
    real, calls = tr.step.device_step, {"n": 0}

    def interrupted_at_6(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt  # a torn step: the checkpoint of step 4 must stand, not a half step 6
        return real(*args, **kwargs)

    first, second = MemoryTracker(), MemoryTracker()
    with monkeypatch.context() as m:
        m.setattr(tr.step, "device_step", interrupted_at_6)
        with pytest.raises(KeyboardInterrupt):
            tr.train(cfg("latent"), tmp_path, tracker=first, progress=False)
    assert tr.ckpt.latest_checkpoint(tmp_path).name == "step_0000004"
    tr.train(cfg("latent"), tmp_path, tracker=second, progress=False)
    assert second.series("train_loss") == [(s, v) for s, v in ref.series("train_loss") if s > 4]


def test_resume_and_load_refuse_another_vae(cache: Path, tmp_path: Path):
    mine = tmp_path / "vae"
    shutil.copytree(vae.cache_path(DATA, TINY_VAE), mine)
    c = cfg("latent", **{"vae.path": str(mine), "train.steps": 4})
    tr.train(c, tmp_path / "run", progress=False)
    # The directory now holds another VAE (another seed): every cached latent and the model's targets change.
    shutil.rmtree(mine)
    vae.train_vae(build_dataset(DATA, "train"), dataclasses.replace(TINY_VAE, seed=1, steps=2), mine, progress=False,
                  device="cpu")
    with pytest.raises(CheckpointError, match="cannot resume, it was trained in space .*a different VAE"):
        tr.train(c.with_overrides({"train.steps": 8}), tmp_path / "run", progress=False)
    with pytest.raises(CheckpointError, match="decoded by another VAE"):
        tr.load_trained(tmp_path / "run", "cpu")


def test_samplers_clip_pixels_never_latents(cache: Path):
    pixel, latent = cfg("pixel"), cfg("latent")
    assert diffusion.sampler_flags(pixel)["ddpm"]["clip_sample"] is True  # the pixel default is unchanged
    flags = diffusion.sampler_flags(latent)
    assert flags["ddpm"]["clip_sample"] is False and flags["ddpm"]["space"] == "latent"
    assert flags["ddim"]["clip_sample"] is False and flags["ddim"]["use_clipped_model_output"] is False
    assert diffusion.SAMPLERS.get("ddpm")(latent.diffusion, "latent").scheduler().config.clip_sample is False
    assert diffusion.SAMPLERS.get("ddpm")(pixel.diffusion, "pixel").scheduler().config.clip_sample is True
    # A sampler that *is* clipping has no meaning for latents: refused in the config and when built.
    with pytest.raises(ConfigError, match=r"eval.panel_samplers\[1\]: clips the predicted x0 to the pixel range"):
        latent.with_overrides({"eval.panel_samplers": ["ddpm", "ddim-clip"]})
    with pytest.raises(ConfigError, match="clips the predicted x0"):
        diffusion.SAMPLERS.get("ddim-clip")(latent.diffusion, "latent")
    assert diffusion.sampler_flags(pixel.with_overrides({"eval.panel_samplers": ["ddim-clip", "ddpm"]}))["ddim-clip"][
        "clip_sample"] is True


def test_generate_samples_noise_in_model_space_and_decodes_outside_the_forward(cache: Path):
    from diffablate.models.text import TextEmbedding

    c = cfg("latent")
    space = build_space(c)
    shapes: list[tuple[int, ...]] = []

    class Recorder(torch.nn.Module):
        image_channels, ignores_text = 4, True

        def forward(self, x_t: torch.Tensor, t: torch.Tensor, text: TextEmbedding) -> torch.Tensor:
            shapes.append(tuple(x_t.shape))
            return torch.zeros_like(x_t)

    class Null(torch.nn.Module):
        def forward(self, captions: list[str]) -> TextEmbedding:
            n = len(captions)
            return TextEmbedding(torch.zeros(n, 1, 1), torch.ones(n, 1, dtype=torch.bool), torch.zeros(n, 1))

    images = diffusion.generate(Recorder(), Null(), ["a", "b", "c"], cfg=c, sampler="ddim", steps=2,
                                generator=torch.Generator().manual_seed(0), device="cpu", space=space)
    assert shapes == [(3, 4, 4, 4)] * 2 and images.shape == (3, 3, 16, 16) and images.dtype == torch.uint8
    # Without a space, generate builds the config's own: the same images.
    again = diffusion.generate(Recorder(), Null(), ["a", "b", "c"], cfg=c, sampler="ddim", steps=2,
                               generator=torch.Generator().manual_seed(0), device="cpu")
    assert torch.equal(images, again)
    assert isinstance(build_space(cfg("pixel")), PixelSpace)


# --- a latent run without its VAE is refused before anything is created ------------------------------------


def _sets(c: RunConfig) -> list[str]:
    import json

    return [a for k, v in c.flat().items()
            for a in ("--set", f"{k}={v if isinstance(v, str) and v.startswith('[') else json.dumps(v)}")]


def test_train_without_the_vae_is_refused_with_the_command_that_trains_it(tmp_path: Path, monkeypatch):
    from diffablate.studies.cli import app

    monkeypatch.setenv("DIFFABLATE_CACHE", str(tmp_path / "empty-cache"))
    wd = tmp_path / "wd"
    r = CliRunner().invoke(app, ["train", "--workdir", str(wd), "--no-progress", *_sets(cfg("latent"))])
    assert r.exit_code == 2, r.output
    assert "error: vae: no trained VAE for this data + vae config" in r.output
    assert "train it first: diffablate vae train --dataset shapes --resolution 16 --set data.n_train=64" in r.output
    assert "Traceback" not in r.output and not wd.exists() and not (tmp_path / "empty-cache" / "vae").exists()


def test_study_without_the_vae_is_refused_naming_the_cell(tmp_path: Path, monkeypatch):
    from diffablate.studies.cli import app

    monkeypatch.setenv("DIFFABLATE_CACHE", str(tmp_path / "empty-cache"))
    base = {k: v for k, v in cfg("pixel").to_dict().items() if k not in ("seed", "replicate")}  # set by the spec
    spec = {"name": "lat", "seeds": [0], "base": base,
            "design": {"kind": "factorial", "objective": "oracle_acc", "direction": "maximize",
                       "axes": {"space": ["pixel", "latent"]}}}
    (tmp_path / "lat.toml").write_text(tomli_w.dumps(spec))
    wd = tmp_path / "wd"
    r = CliRunner().invoke(app, ["study", "run", str(tmp_path / "lat.toml"), "--workdir", str(wd)])
    assert r.exit_code == 2, r.output
    assert "diffablate vae train --dataset shapes --resolution 16" in r.output
    assert "(in cell axes.space=latent)" in r.output and not wd.exists()


def test_the_latent_study_spec_is_the_measurement_issue_18_asks_for():
    from diffablate.studies.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parents[1] / "studies" / "latent.toml")
    assert spec.n_planned == 12 and len(spec.seeds) == 3 and spec.objective == "fid"
    assert {(c.cfg.axes.space, c.cfg.data.resolution) for c in spec.cells} == \
        {(s, r) for s in ("pixel", "latent") for r in (32, 64)}
    assert all("ddim-clip" not in c.cfg.eval.panel_samplers for c in spec.cells)
    assert {c.metric for c in spec.claims} == {"img_per_s_mean", "fid"}
