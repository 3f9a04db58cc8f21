"""Promises of models/space.py: pixel and latent spaces behind one interface, decoded to the same images'
shape and scored by the same code path; latents encoded once, cached on disk, refused when corrupt."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from diffablate.metrics.reconstruction import psnr_ssim
from diffablate.models import space, vae
from diffablate.models.config import ConfigError, DataConfig, RunConfig, VaeConfig
from diffablate.models.data import build_dataset, to_model_range

DATA = DataConfig(resolution=16, n_train=256, n_heldout=32)
TINY = VaeConfig(block_channels=(8, 16, 16), mid_attention=False, steps=150, batch_size=32, lr=3e-3, warmup_steps=15)


def _quality(d: Path) -> dict[str, float]:
    held = build_dataset(DATA, "heldout")
    return psnr_ssim(held.images, vae.Autoencoder(d).reconstruct(held.images))


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture()
def latent_cfg(cache: Path, monkeypatch: pytest.MonkeyPatch) -> RunConfig:
    """A latent-space config whose VAE (tiny, trained once per module) is in this module's cache."""
    monkeypatch.setenv("DIFFABLATE_CACHE", str(cache))
    vae.ensure_vae(DATA, TINY, evaluate=_quality, progress=False, device="cpu")
    return RunConfig(data=DATA, vae=TINY).with_overrides({"axes.space": "latent"})


def test_registry_has_both_spaces_and_fails_loudly():
    assert list(space.SPACES) == ["pixel", "latent"]
    with pytest.raises(KeyError, match=r"unknown space 'latents' \(did you mean 'latent'\?\); choose one of "
                                       r"\['pixel', 'latent'\]"):
        space.SPACES.get("latents")


def test_pixel_space_is_the_identity_of_models_data():
    cfg = RunConfig(data=DATA)
    s = space.build_space(cfg)
    images = build_dataset(DATA, "heldout").images
    storage = s.prepare(images, "cpu")
    assert storage.dtype == torch.uint8 and torch.equal(storage, images)
    x0 = s.to_model(storage[:5])
    assert torch.equal(x0, to_model_range(images[:5])) and x0.shape[1:] == (3, 16, 16)
    assert torch.equal(s.decode(x0), images[:5])  # exact round trip
    assert s.model_shape == (3, 16) and s.clip_sample is True
    grey = space.build_space(RunConfig().with_overrides({"data.name": "fashion-mnist", "data.resolution": 28}))
    assert grey.model_shape == (1, 28)  # from the config alone: no data is read


def test_latent_space_shapes_and_decode_match_pixel_images(latent_cfg: RunConfig):
    s = space.build_space(latent_cfg)
    assert isinstance(s, space.LatentSpace) and s.model_shape == (4, 4) and s.clip_sample is False
    images = build_dataset(DATA, "heldout").images
    storage = s.prepare(images, "cpu")
    assert storage.shape == (32, 4, 4, 4) and storage.dtype == torch.float32
    x0 = s.to_model(storage)
    assert x0.shape[1:] == (4, 4, 4)
    pixel = space.build_space(RunConfig(data=DATA))
    decoded, decoded_pixel = s.decode(x0), pixel.decode(pixel.to_model(pixel.prepare(images, "cpu")))
    assert decoded.shape == decoded_pixel.shape == images.shape and decoded.dtype == decoded_pixel.dtype == torch.uint8
    assert torch.equal(decoded, s.vae.reconstruct(images))  # decode(to_model(prepare(x))) is the VAE round trip
    # decode takes whatever a sampler produced: any device, bf16 included, always returns CPU uint8.
    assert s.decode(x0.bfloat16()).shape == images.shape
    # Random latents at the model shape decode too (what generate() will hand it).
    assert s.decode(torch.randn(3, *s.model_shape[:1], s.model_shape[1], s.model_shape[1])).shape == (3, 3, 16, 16)
    params = s.params()
    assert params["space"] == "latent" and params["vae.scaling_factor"] == pytest.approx(s.vae.scaling_factor)
    assert "vae.heldout_psnr" in params and params["space.side"] == 4


def test_both_spaces_are_scored_by_the_same_evaluation_code(latent_cfg: RunConfig):
    from diffablate.studies.evaluate import eval_captions, score_images

    cfg = latent_cfg.with_overrides({"eval.fid": False, "eval.kid": False, "eval.clip_score": False,
                                     "eval.bootstrap": 10})
    captions, labels, heldout = eval_captions(cfg, 32)
    scores = {}
    for name in ("pixel", "latent"):
        s = space.build_space(cfg.with_overrides({"axes.space": name}))
        images = s.decode(s.to_model(s.prepare(heldout.images, "cpu")))
        scores[name] = score_images(images, captions, labels, heldout, cfg, torch.device("cpu"))
    assert set(scores["pixel"]) == set(scores["latent"]) >= {"oracle_acc", "oracle_n"}
    assert all(0 <= s["oracle_acc"] <= 1 and s["oracle_n"] == 32 for s in scores.values())


def test_latents_are_encoded_once_and_cached_on_disk(latent_cfg: RunConfig, monkeypatch: pytest.MonkeyPatch):
    s = space.build_space(latent_cfg)
    images = build_dataset(DATA, "train").images
    first = s.prepare(images, "cpu")
    path = s.latents_path(images)
    assert path.is_file() and path.parent.name == "latents"
    again = space.build_space(latent_cfg)  # a new run (or a resumed one) reads the file, bit for bit

    def boom(*a, **k):
        raise AssertionError("re-encoded a cached dataset")

    monkeypatch.setattr(again.vae, "encode", boom)
    assert torch.equal(again.prepare(images, "cpu"), first)
    assert s.latents_path(images[:100]) != path  # keyed by the images' bytes (and the VAE's weights)
    assert not list(path.parent.glob(".*.tmp"))


def test_corrupt_cached_latents_are_refused_naming_the_file(latent_cfg: RunConfig):
    s = space.build_space(latent_cfg)
    images = build_dataset(DATA, "heldout").images[:8]
    path = s.latents_path(images)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not a torch file")
    with pytest.raises(vae.VaeError, match=f"{path}: cannot read cached latents"):
        s.prepare(images, "cpu")
    torch.save({"format": space.LATENTS_FORMAT, "weights_sha256": "other", "latents": torch.zeros(8, 4, 4, 4)}, path)
    with pytest.raises(vae.VaeError, match=f"{path}: not the cached latents of these images under this VAE"):
        s.prepare(images, "cpu")
    path.unlink()


def test_latents_stay_on_the_cpu_when_the_gpu_is_too_full(latent_cfg: RunConfig, monkeypatch: pytest.MonkeyPatch):
    s = space.build_space(latent_cfg)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1024, 2 ** 30))
    images = build_dataset(DATA, "heldout").images
    with pytest.warns(UserWarning, match="kept on the CPU"):
        out = s.prepare(images, torch.device("cuda"))
    assert out.device.type == "cpu"


def test_a_vae_that_does_not_match_the_config_is_refused(latent_cfg: RunConfig, tmp_path: Path):
    vae_dir = vae.resolve_vae(latent_cfg)
    with pytest.raises(ConfigError, match=r"vae.path: .* trained on 16 px images, data.resolution is 32"):
        space.build_space(latent_cfg.with_overrides({"vae.path": str(vae_dir), "data.resolution": 32}))
    with pytest.raises(ConfigError, match=r"vae.path: .* has vae.latent_channels = 4, the config says 8"):
        space.build_space(latent_cfg.with_overrides({"vae.path": str(vae_dir), "vae.latent_channels": 8}))
    with pytest.raises(vae.VaeError, match="no trained VAE for this data"):
        space.build_space(dataclasses.replace(latent_cfg, vae=dataclasses.replace(TINY, steps=151)))
