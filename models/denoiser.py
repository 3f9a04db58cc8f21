"""The denoising network: a diffusers `UNet2DConditionModel` with the conditioning and time-embedding axes
applied inside, so training and sampling call the same `forward(x_t, t, text)`.

Block layout, per level i of `model.block_channels`:
- attention level + cross-attention conditioning -> CrossAttnDownBlock2D / CrossAttnUpBlock2D (each a
  transformer block: self-attention, cross-attention to the text tokens, feed-forward), mid block
  UNetMidBlock2DCrossAttn;
- attention level + any other conditioning -> AttnDownBlock2D / AttnUpBlock2D (self-attention only) and a
  mid block with self-attention, so the network keeps attention where the config asks for it and only
  the text route changes (the cross-attention and its feed-forward are the parameters that go);
- otherwise DownBlock2D / UpBlock2D (resnets only).
The mid block has attention iff the deepest level has.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffusers import UNet2DConditionModel
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D
from torch import Tensor, nn

from diffablate.models.axes import CONDITIONINGS, TIME_EMBEDDINGS, Conditioning, TimeEmbedding
from diffablate.models.config import ConfigError
from diffablate.models.space import model_shape
from diffablate.models.text import TextEmbedding

if TYPE_CHECKING:
    from diffablate.models.config import RunConfig
    from diffablate.models.text import TextEncoder

# Image channels of the built-in datasets (the config names the dataset, not its channels).
DATASET_CHANNELS = {"shapes": 3, "fashion-mnist": 1, "folder": 3}  # folder images are converted to RGB


def dataset_channels(cfg: "RunConfig") -> int:
    """Channels of the configured dataset's images; ConfigError for a dataset this table does not know."""
    try:
        return DATASET_CHANNELS[cfg.data.name]
    except KeyError:
        raise ConfigError(f"data.name: image channels of dataset {cfg.data.name!r} unknown to "
                          f"models/denoiser.py; pass image_channels= to build_denoiser") from None


class Denoiser(nn.Module):
    """x_t, t, text -> the UNet's prediction (epsilon or v, per diffusion.prediction_type)."""

    def __init__(self, unet: UNet2DConditionModel, conditioning: Conditioning, time_embedding: TimeEmbedding,
                 image_channels: int) -> None:
        super().__init__()
        self.unet = unet
        self.conditioning = conditioning  # a module: concat's projection trains with the UNet
        self.time_embedding = time_embedding
        self.image_channels = image_channels

    def forward(self, x_t: Tensor, t: Tensor, text: TextEmbedding) -> Tensor:
        """Model output [B, C, H, W] for noisy images x_t [B, C, H, W] at true timesteps t long [B]."""
        sample, kwargs = self.conditioning(x_t, text)
        timesteps = self.time_embedding.unet_timesteps(t)
        return self.unet(sample, timesteps, return_dict=False, **kwargs)[0]

    @property
    def ignores_text(self) -> bool:
        """True when the output cannot depend on the caption (guidance needs no unconditional pass)."""
        return self.conditioning.ignores_text


def _unet_kwargs(cfg: "RunConfig", conditioning: Conditioning, image_channels: int, side: int) -> dict:
    m = cfg.model
    cross = conditioning.cross_attention
    attn = m.attention_levels
    down = tuple(("CrossAttnDownBlock2D" if cross else "AttnDownBlock2D") if a else "DownBlock2D" for a in attn)
    up = tuple(("CrossAttnUpBlock2D" if cross else "AttnUpBlock2D") if a else "UpBlock2D" for a in reversed(attn))
    # Without cross-attention the mid block is built as a plain resnet block here and replaced by one with
    # self-attention in build_denoiser (diffusers' factory builds UNetMidBlock2D without attention).
    mid = "UNetMidBlock2DCrossAttn" if cross and attn[-1] else "UNetMidBlock2D"
    if cross:
        # diffusers' naming trap: for the transformer (cross-attention) blocks UNet2DConditionModel's
        # `attention_head_dim` is the *number of heads*; heads = channels / model.attention_head_dim.
        heads_or_dim = tuple(c // m.attention_head_dim for c in m.block_channels)
    else:
        # ... while AttnDownBlock2D / AttnUpBlock2D read the same argument as the real head width.
        heads_or_dim = (m.attention_head_dim,) * len(m.block_channels)
    kwargs = dict(
        sample_size=side,  # x0's side in model space: data.resolution in pixels, / vae.downsample in latents
        in_channels=image_channels + conditioning.extra_in_channels,
        out_channels=image_channels,
        down_block_types=down,
        up_block_types=up,
        mid_block_type=mid,
        block_out_channels=tuple(m.block_channels),
        layers_per_block=m.layers_per_block,
        norm_num_groups=m.norm_num_groups,
        dropout=m.dropout,
        attention_head_dim=heads_or_dim,
    )
    # Route-specific kwargs: cross_attention_dim (cross-attention), class_embed_type (pooled). Without
    # cross-attention diffusers' default cross_attention_dim is read by no block, so it builds nothing.
    kwargs.update(conditioning.unet_kwargs())
    return kwargs


def build_denoiser(cfg: "RunConfig", text_encoder: "TextEncoder", *, image_channels: int | None = None) -> Denoiser:
    """The configured UNet with `axes.conditioning` and `axes.time_embedding` applied, for x0 of the shape
    `axes.space` gives (models/space.py `model_shape`: the dataset's channels at data.resolution in pixel
    space, vae.latent_channels at data.resolution / vae.downsample in latent space; concat's extra input
    channels add on top).

    `image_channels` overrides the space's channels. Impossible combinations raise ConfigError naming the
    field before any weights are allocated.
    """
    channels, side = model_shape(cfg)
    if image_channels is None:
        image_channels = channels
    conditioning = CONDITIONINGS.get(cfg.axes.conditioning)(cfg, text_encoder)
    time_embedding = TIME_EMBEDDINGS.get(cfg.axes.time_embedding)(cfg)
    if conditioning.cross_attention and not any(cfg.model.attention_levels):
        raise ConfigError("axes.conditioning: cross-attention needs at least one model.attention_levels entry = true")
    unet = UNet2DConditionModel(**_unet_kwargs(cfg, conditioning, image_channels, side))
    if not conditioning.cross_attention and cfg.model.attention_levels[-1]:
        c = cfg.model.block_channels[-1]
        unet.mid_block = UNetMidBlock2D(
            in_channels=c, temb_channels=unet.time_embedding.linear_2.out_features, dropout=cfg.model.dropout,
            num_layers=1, resnet_groups=cfg.model.norm_num_groups, attn_groups=cfg.model.norm_num_groups,
            attention_head_dim=cfg.model.attention_head_dim, add_attention=True,
        )
    return Denoiser(unet, conditioning, time_embedding, image_channels)


def count_parameters(module: nn.Module) -> int:
    """Trainable parameters (logged with every run: the conditioning routes differ in size)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)

