"""Promises of models/denoiser.py and models/diffusion.py on tiny UNets (8 px, channels [16, 32])."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffablate.models import text
from diffablate.models.config import ConfigError, RunConfig
from diffablate.models.denoiser import Denoiser, build_denoiser, dataset_channels
from diffablate.models.diffusion import (SAMPLERS, bucket_edges, build_scheduler, generate, timestep_bucket_losses,
                                         training_losses)
from diffablate.models.text import TextEmbedding

CAPTIONS = ["a red circle", "a blue square", "a green triangle left of a red square"]
TINY = {"data.resolution": 8, "model.block_channels": [16, 32], "model.attention_levels": [False, True],
        "text.embed_dim": 16, "text.max_length": 12, "diffusion.num_train_timesteps": 100}


def cfg(**over) -> RunConfig:
    return RunConfig().with_overrides({**TINY, **over})


def build(**over) -> tuple[Denoiser, text.TextEncoder, RunConfig]:
    torch.manual_seed(0)
    c = cfg(**over)
    enc = text.build_text_encoder(c, CAPTIONS)
    return build_denoiser(c, enc), enc, c


def x_t(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


# --- time embedding ----------------------------------------------------------------------------------


@torch.no_grad()
def test_time_embedding_off_makes_output_independent_of_t():
    d, enc, _ = build(**{"axes.time_embedding": "off"})
    e, x = enc(CAPTIONS[:2]), x_t()
    assert torch.equal(d(x, torch.tensor([1, 1]), e), d(x, torch.tensor([90, 55]), e))


@torch.no_grad()
def test_time_embedding_on_makes_output_depend_on_t():
    d, enc, _ = build(**{"axes.time_embedding": "on"})
    e, x = enc(CAPTIONS[:2]), x_t()
    assert not torch.allclose(d(x, torch.tensor([1, 1]), e), d(x, torch.tensor([90, 55]), e), atol=1e-5)


# --- conditioning ------------------------------------------------------------------------------------


@torch.no_grad()
def test_conditioning_none_ignores_the_caption():
    d, enc, _ = build(**{"axes.conditioning": "none"})
    x, t = x_t(), torch.tensor([10, 60])
    assert d.ignores_text
    assert torch.equal(d(x, t, enc(CAPTIONS[:2])), d(x, t, enc(["", CAPTIONS[2]])))
    assert not any(getattr(m, "has_cross_attention", False) for m in d.modules())
    assert d.unet.class_embedding is None and d.unet.conv_in.in_channels == 3


@pytest.mark.parametrize("route", ["cross-attention", "cross-attention-pooled", "pooled", "concat"])
@torch.no_grad()
def test_conditioned_routes_depend_on_the_caption(route):
    d, enc, _ = build(**{"axes.conditioning": route})
    x, t = x_t(), torch.tensor([10, 60])
    assert not d.ignores_text
    assert not torch.allclose(d(x, t, enc(CAPTIONS[:2])), d(x, t, enc(["", CAPTIONS[2]])), atol=1e-5)


def test_each_route_builds_its_own_unet():
    cross, _, _ = build(**{"axes.conditioning": "cross-attention"})
    pooled, _, _ = build(**{"axes.conditioning": "pooled"})
    concat, _, _ = build(**{"axes.conditioning": "concat"})
    assert [type(b).__name__ for b in cross.unet.down_blocks] == ["DownBlock2D", "CrossAttnDownBlock2D"]
    assert cross.unet.config.cross_attention_dim == 16  # = text.embed_dim
    for d in (pooled, concat):  # self-attention where the config asks for attention, no cross-attention
        assert [type(b).__name__ for b in d.unet.down_blocks] == ["DownBlock2D", "AttnDownBlock2D"]
        assert d.unet.mid_block.attentions[0] is not None
        assert not any(getattr(m, "has_cross_attention", False) for m in d.modules())
    assert pooled.unet.class_embedding is not None and concat.unet.class_embedding is None
    assert concat.unet.conv_in.in_channels == 3 + 4 and concat.unet.conv_out.out_channels == 3


@torch.no_grad()
def test_pooled_cross_attention_matches_cross_attention_in_size_and_sees_only_the_pooled_vector():
    cross, _, _ = build(**{"axes.conditioning": "cross-attention"})
    pooled_x, enc, _ = build(**{"axes.conditioning": "cross-attention-pooled"})
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(pooled_x) == count(cross)  # the parameter-matched control of the text route
    assert [type(b).__name__ for b in pooled_x.unet.down_blocks] == ["DownBlock2D", "CrossAttnDownBlock2D"]
    e = enc(CAPTIONS[:2])
    # Changing every token state but keeping the pooled vector changes nothing: one token, the pooled one.
    other = TextEmbedding(torch.randn_like(e.tokens), e.mask, e.pooled)
    x, t = x_t(), torch.tensor([10, 60])
    assert torch.equal(pooled_x(x, t, e), pooled_x(x, t, other))
    assert not torch.allclose(pooled_x(x, t, e), pooled_x(x, t, TextEmbedding(e.tokens, e.mask, e.pooled + 1)), atol=1e-5)


@torch.no_grad()
def test_cross_attention_respects_the_padding_mask():
    d, enc, _ = build(**{"axes.conditioning": "cross-attention"})
    e = enc(CAPTIONS[:2])
    garbage = TextEmbedding(e.tokens + 100.0 * (~e.mask)[..., None], e.mask, e.pooled)  # only padding changes
    x, t = x_t(), torch.tensor([10, 60])
    assert torch.allclose(d(x, t, e), d(x, t, garbage), atol=1e-5)


def test_cross_attention_without_attention_levels_is_a_config_error():
    with pytest.raises(ConfigError, match="axes.conditioning"):
        cfg(**{"axes.conditioning": "cross-attention", "model.attention_levels": [False, False]})


def test_image_channels_follow_the_dataset():
    c = cfg(**{"data.name": "fashion-mnist"})
    assert dataset_channels(c) == 1
    d = build_denoiser(c, text.build_text_encoder(c, CAPTIONS))
    assert d.unet.conv_in.in_channels == 1 and d.unet.conv_out.out_channels == 1


# --- training loss -----------------------------------------------------------------------------------


class _Constant(nn.Module):
    """A stand-in denoiser returning a fixed output, to check the loss against hand-computed targets."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = out

    def forward(self, x_t, t, text):
        return self.out


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_losses_match_hand_computed_targets(prediction_type):
    c = cfg(**{"diffusion.prediction_type": prediction_type})
    sch = build_scheduler(c.diffusion)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1, torch.randn(3, 3, 8, 8, generator=g)
    t = torch.tensor([0, 37, 99])
    ab = sch.alphas_cumprod[t][:, None, None, None]
    target = noise if prediction_type == "epsilon" else ab.sqrt() * noise - (1 - ab).sqrt() * x0
    zero = training_losses(_Constant(torch.zeros_like(x0)), sch, x0, t, noise, None, prediction_type)
    assert zero.shape == (3,)
    assert torch.allclose(zero, target.pow(2).mean((1, 2, 3)), rtol=1e-5)
    exact = training_losses(_Constant(target), sch, x0, t, noise, None, prediction_type)
    assert torch.allclose(exact, torch.zeros(3), atol=1e-10)


def test_training_losses_backpropagates_into_unet_and_text_encoder():
    d, enc, c = build()
    sch = build_scheduler(c.diffusion)
    x0 = x_t(2).clamp(-1, 1)
    loss = training_losses(d, sch, x0, torch.tensor([5, 80]), x_t(2, 1), enc(CAPTIONS[:2]), "epsilon").mean()
    loss.backward()
    assert d.unet.conv_in.weight.grad.abs().sum() > 0 and enc.token_emb.weight.grad.abs().sum() > 0


# --- sampling ---------------------------------------------------------------------------------------


def test_generate_is_deterministic_uint8_and_seed_dependent():
    d, enc, c = build()
    kw = dict(cfg=c, steps=3, guidance_scale=2.0, device="cpu", batch_size=2)
    a = generate(d, enc, CAPTIONS, generator=torch.Generator().manual_seed(1), **kw)
    b = generate(d, enc, CAPTIONS, generator=torch.Generator().manual_seed(1), **kw)
    other = generate(d, enc, CAPTIONS, generator=torch.Generator().manual_seed(2), **kw)
    assert a.dtype == torch.uint8 and a.shape == (3, 3, 8, 8)
    assert torch.equal(a, b) and not torch.equal(a, other)
    # DDIM draws all initial noise up front: the batch size does not change the images.
    c3 = generate(d, enc, CAPTIONS, generator=torch.Generator().manual_seed(1), **{**kw, "batch_size": 3})
    assert (a.int() - c3.int()).abs().max() <= 1
    assert d.training and enc.training  # modes restored after sampling


def test_generate_ddpm_is_deterministic():
    d, enc, c = build()
    kw = dict(cfg=c, sampler="ddpm", steps=3, guidance_scale=1.0, device="cpu")
    a = generate(d, enc, CAPTIONS[:2], generator=torch.Generator().manual_seed(4), **kw)
    b = generate(d, enc, CAPTIONS[:2], generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(a, b)
    with pytest.raises(KeyError, match="ddim.*ddpm"):
        SAMPLERS.get("euler")


def _count_rows(d: Denoiser) -> list[int]:
    rows: list[int] = []
    d.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    return rows


@pytest.mark.parametrize("route,scale,rows_per_step", [("cross-attention", 3.0, 4), ("cross-attention", 1.0, 2),
                                                        ("none", 3.0, 2)])
def test_guidance_runs_the_unconditional_pass_only_when_needed(route, scale, rows_per_step):
    d, enc, c = build(**{"axes.conditioning": route})
    rows = _count_rows(d)
    generate(d, enc, CAPTIONS[:2], cfg=c, steps=2, guidance_scale=scale, generator=torch.Generator().manual_seed(0),
             device="cpu")
    assert rows == [rows_per_step] * 2


def test_guidance_scale_changes_the_images():
    d, enc, c = build(**{"axes.conditioning": "cross-attention"})
    kw = dict(cfg=c, steps=3, device="cpu")
    a = generate(d, enc, CAPTIONS[:2], guidance_scale=1.0, generator=torch.Generator().manual_seed(0), **kw)
    b = generate(d, enc, CAPTIONS[:2], guidance_scale=5.0, generator=torch.Generator().manual_seed(0), **kw)
    assert not torch.equal(a, b)


# --- per-timestep diagnostic ---------------------------------------------------------------------------


def test_bucket_edges_tile_the_schedule():
    lo, hi, mid = bucket_edges(1000, 20)
    assert lo[0] == 0 and hi[-1] == 1000 and torch.equal(lo[1:], hi[:-1])
    assert bool(((lo <= mid) & (mid < hi)).all())
    lo, hi, _ = bucket_edges(100, 7)  # uneven split still tiles [0, T)
    assert torch.equal(torch.cat([torch.arange(a, b) for a, b in zip(lo.tolist(), hi.tolist())]), torch.arange(100))


def test_timestep_bucket_losses_deterministic_and_batch_independent():
    d, enc, c = build()
    sch = build_scheduler(c.diffusion)
    x0, e = x_t(3).clamp(-1, 1), enc(CAPTIONS)
    t_mid, a = timestep_bucket_losses(d, sch, x0, e, 4, torch.Generator().manual_seed(0))
    _, b = timestep_bucket_losses(d, sch, x0, e, 4, torch.Generator().manual_seed(0), batch_size=2)
    _, other = timestep_bucket_losses(d, sch, x0, e, 4, torch.Generator().manual_seed(1))
    assert t_mid.tolist() == [12, 37, 62, 87] and a.shape == (4,)
    assert torch.allclose(a, b, rtol=1e-5) and not torch.allclose(a, other)
    assert bool((a > 0).all())
