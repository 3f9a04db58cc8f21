"""How faithfully an autoencoder reconstructs held-out images: PSNR, SSIM and rFID.

All three compare uint8 images [N, C, H, W] - the reconstructions exactly as the latent space decodes
them, rounded to uint8 like every generated image - with the originals:

- **PSNR:** torchmetrics `PeakSignalNoiseRatio`, `data_range=255` (the uint8 scale), computed per image
  (`dim=(1, 2, 3)`) and averaged, the convention of the Stable Diffusion VAE model cards. (torchmetrics'
  default pools the MSE over the whole set first, which gives a different number.)
- **SSIM:** torchmetrics `StructuralSimilarityIndexMeasure`, `data_range=255`, an 11 x 11 Gaussian window
  with sigma 1.5 and k1 = 0.01, k2 = 0.03 (Wang et al. 2004's constants, torchmetrics' defaults, set here
  on purpose), per image (per channel, averaged), then averaged over images.
- **rFID:** the FID of the reconstructions against the originals' reference statistics, through the same
  `FeatureExtractor`, `ReferenceStats` and `score_fid` as a generated sample's FID (metrics/fid.py). FID is
  biased at small n, so `rfid_real_baseline` gives the FID of n *other real* images against the same
  reference: what a perfect autoencoder would score at this n.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffablate.metrics.fid import DEFAULT_BOOTSTRAP, ReferenceStats, score_fid
from diffablate.metrics.images import MetricsError
from diffablate.metrics.inception import FeatureExtractor

SSIM_KERNEL = 11  # Wang et al.'s window; images must be at least this wide


def _check_pair(originals: Tensor, recon: Tensor) -> None:
    if originals.dtype != torch.uint8 or recon.dtype != torch.uint8:
        raise MetricsError(f"reconstruction scores take uint8 images, got {originals.dtype} and {recon.dtype}")
    if originals.shape != recon.shape or originals.ndim != 4:
        raise MetricsError(f"originals {tuple(originals.shape)} and reconstructions {tuple(recon.shape)} must both "
                           "be [N, C, H, W] of one shape")
    if min(originals.shape[-2:]) < SSIM_KERNEL:
        raise MetricsError(f"SSIM's {SSIM_KERNEL} px window needs images of at least {SSIM_KERNEL} px, "
                           f"got {tuple(originals.shape[-2:])}")


def psnr_ssim(originals: Tensor, recon: Tensor) -> dict[str, float]:
    """Mean per-image PSNR (dB) and SSIM of uint8 reconstructions against uint8 originals, plus n."""
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

    _check_pair(originals, recon)
    x, y = originals.float(), recon.float()  # torchmetrics computes in float32 either way
    psnr = PeakSignalNoiseRatio(data_range=255.0, base=10.0, reduction="elementwise_mean", dim=(1, 2, 3))
    ssim = StructuralSimilarityIndexMeasure(gaussian_kernel=True, sigma=1.5, kernel_size=SSIM_KERNEL,
                                            reduction="elementwise_mean", data_range=255.0, k1=0.01, k2=0.03)
    return {"psnr": float(psnr(y, x)), "ssim": float(ssim(y, x)), "n": float(len(x))}


def reconstruction_scores(originals: Tensor, recon: Tensor, *, extractor: FeatureExtractor | None = None,
                          reference: ReferenceStats | None = None, baseline: Tensor | None = None,
                          n_bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> dict[str, float]:
    """PSNR, SSIM and n; with an `extractor` also rFID (`rfid`, its CI and counts, from `score_fid`).

    `reference` is the originals' cached reference stats (extracted here when None); `baseline`, real uint8
    images disjoint from the originals (the same n is fairest), adds `rfid_real_baseline`.
    """
    out = psnr_ssim(originals, recon)
    if extractor is None:
        return out
    if reference is None:
        reference = ReferenceStats.from_features("originals", extractor(originals), extractor.weights_sha256)
    out.update(score_fid(extractor(recon), reference, n_bootstrap=n_bootstrap, seed=seed).to_metrics("rfid"))
    if baseline is not None:
        out["rfid_real_baseline"] = score_fid(extractor(baseline), reference, n_bootstrap=0).value
    return out
