"""The sampler registry's promises (issue 14): every flag that changes samples is set on purpose, never
inherited, and the sampling loop inverts the training noise exactly when the model is exact."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from diffablate.models import diffusion
from diffablate.models.config import RunConfig
from diffablate.models.data import to_uint8
from diffablate.models.text import TextEmbedding

T = 1000


def cfg(**overrides: object) -> RunConfig:
    base = {"data.resolution": 8, "model.block_channels": [8], "model.attention_levels": [True],
            "eval.sampling_steps": 25}
    base.update(overrides)
    return RunConfig().with_overrides(base)


def test_registry_names_and_every_flag_reaches_the_scheduler():
    assert list(diffusion.SAMPLERS) == ["ddim", "ddim-clip", "ddpm"]
    c = cfg()
    for name in diffusion.SAMPLERS:
        method = diffusion.SAMPLERS.get(name)(c.diffusion)
        flags = method.flags()
        sched = method.scheduler()
        assert type(sched).__name__ == flags["scheduler"]
        for key, value in flags.items():
            if key in sched.config:  # step-time flags (eta, use_clipped_model_output) are not config
                assert sched.config[key] == value, (name, key)
        # The training schedule is restated, not inherited.
        for key in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type"):
            assert sched.config[key] == getattr(c.diffusion, key), (name, key)


def test_the_flags_that_broke_the_old_default_are_set_on_purpose():
    c = cfg()
    ddim = diffusion.SAMPLERS.get("ddim")(c.diffusion)
    # The inherited clip_sample=True is what destroyed alignment with guidance (issue 14).
    assert ddim.flags()["clip_sample"] is False and ddim.scheduler().config.clip_sample is False
    clipped = diffusion.SAMPLERS.get("ddim-clip")(c.diffusion).flags()
    assert clipped["clip_sample"] is True and clipped["use_clipped_model_output"] is True  # consistent step
    ddpm = diffusion.SAMPLERS.get("ddpm")(c.diffusion).flags()
    assert ddpm["variance_type"] == "fixed_small" and ddpm["clip_sample"] is True
    # Training never samples: its scheduler carries no sampling flag that could leak into a sampler.
    assert diffusion.build_scheduler(c.diffusion).config.clip_sample is False


@pytest.mark.parametrize("name", ["ddim", "ddim-clip", "ddpm"])
def test_trailing_spacing_starts_at_pure_noise(name: str):
    sched = diffusion.SAMPLERS.get(name)(cfg().diffusion).scheduler()
    sched.set_timesteps(25)
    ts = sched.timesteps.tolist()
    assert ts[0] == T - 1 and len(ts) == 25 and ts == sorted(ts, reverse=True)


def test_sampler_flags_cover_the_panel_and_the_primary():
    c = cfg(**{"eval.panel_samplers": ["ddpm", "ddim-clip"], "eval.sampler": "ddpm"})
    assert set(diffusion.sampler_flags(c)) == {"ddpm", "ddim-clip"}


class ExactDenoiser(nn.Module):
    """Knows the clean images: predicts the exact epsilon (or v) of x_t, row by row. Guided batches stack
    [conditional rows; unconditional rows], so row i and row n + i get the same clean image and the
    guided mix uncond + s * (cond - uncond) must equal the conditional prediction at any scale s."""

    image_channels = 3
    ignores_text = False

    def __init__(self, x0: Tensor, scheduler: object, prediction_type: str) -> None:
        super().__init__()
        self.x0 = x0
        self.ac = scheduler.alphas_cumprod.double()
        self.prediction_type = prediction_type
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x_t: Tensor, t: Tensor, text: TextEmbedding) -> Tensor:
        x0 = self.x0[torch.arange(len(x_t)) % len(self.x0)].double()
        a = self.ac[t].view(-1, 1, 1, 1)
        eps = (x_t.double() - a.sqrt() * x0) / (1 - a).sqrt()
        out = eps if self.prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
        return out.float()


class NullEncoder(nn.Module):
    def forward(self, captions: list[str]) -> TextEmbedding:
        n = len(captions)
        return TextEmbedding(torch.zeros(n, 1, 1), torch.ones(n, 1, dtype=torch.bool), torch.zeros(n, 1))


@pytest.mark.parametrize("name", ["ddim", "ddim-clip", "ddpm"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_an_exact_model_samples_its_clean_images(name: str, prediction_type: str, guidance: float):
    # With the exact model every sampler must land on x0: trailing spacing starts at t = T-1 and the final
    # step returns the x0 prediction (DDIM: set_alpha_to_one; DDPM: alpha_bar_prev = 1 past t = 0). With
    # set_alpha_to_one = False the last DDIM step would leave ~1 % of noise in: about one uint8 level.
    c = cfg(**{"diffusion.prediction_type": prediction_type})
    g = torch.Generator().manual_seed(0)
    levels = torch.randint(0, 256, (4, 3, 8, 8), generator=g).float() / 127.5 - 1  # exactly representable in uint8
    den = ExactDenoiser(levels, diffusion.build_scheduler(c.diffusion), prediction_type)
    images = diffusion.generate(den, NullEncoder(), ["a", "b", "c", "d"], cfg=c, sampler=name, steps=25,
                                guidance_scale=guidance, generator=torch.Generator().manual_seed(1), device="cpu")
    assert torch.equal(images, to_uint8(levels)), (name, (images.int() - to_uint8(levels).int()).abs().max())
