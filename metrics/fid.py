"""FID and KID of generated images against cached reference statistics, with torchmetrics' own math.

Typical use::

    extractor = FeatureExtractor(device="auto")
    ref = get_reference_stats("fashion-mnist.test.28px", 10_000, load_real_images, extractor)
    result = score_fid(extractor(generated_uint8), ref)   # FIDResult(value, n_gen, n_ref, ci_low, ci_high, ...)

Features come from `diffablate.metrics.inception.FeatureExtractor` (standard FID Inception, torchmetrics'
bilinear-antialias resize). The FID/KID numbers are computed by torchmetrics' `FrechetInceptionDistance`
and `KernelInceptionDistance`, handed precomputed features through an identity "feature network", so a
number here equals plain torchmetrics fed the same uint8 images (tested to 0.1 %).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from diffablate.metrics.images import MetricsError
from diffablate.metrics.inception import FeatureExtractor, cache_dir
from diffablate.models.cache import atomic_save
from diffablate.metrics.stats import percentile_bootstrap

_KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=-]*")
_STATS_FORMAT = 1  # bump when the saved dict changes; older cache files are then rebuilt, not misread

# A percentile interval from 200 resamples is stable to about +-1 in its 2.5 / 97.5 % ends' rank; more
# buys little for ablation comparisons and each resample costs an (n_gen x 2048) @ (2048 x 2048) product.
DEFAULT_BOOTSTRAP = 200


@dataclass(frozen=True)
class ReferenceStats:
    """Features of a reference (real) image set and torchmetrics' FID state built from them.

    `feature_sum` and `cov_sum` are exactly torchmetrics' `real_features_sum` / `real_features_cov_sum`
    (float64 sums of x and x x^T); the raw features are kept because KID needs them.
    """

    key: str
    weights_sha256: str
    features: Tensor  # (n, 2048) float32, CPU
    feature_sum: Tensor  # (2048,) float64
    cov_sum: Tensor  # (2048, 2048) float64

    @property
    def n(self) -> int:
        """Number of reference images."""
        return int(self.features.shape[0])

    @classmethod
    def from_features(cls, key: str, features: Tensor, weights_sha256: str) -> ReferenceStats:
        """Build the stats from (n, d) features; n >= 2 since FID needs a covariance."""
        _check_features(features, "reference")
        feats64 = features.double()
        return cls(key, weights_sha256, features.float().cpu(), feats64.sum(dim=0), feats64.t().mm(feats64))

    def save(self, path: Path) -> None:
        """Write atomically (tmp + rename), so concurrent workers never read half a file."""
        payload = {
            "format": _STATS_FORMAT,
            "key": self.key,
            "weights_sha256": self.weights_sha256,
            "features": self.features,
            "feature_sum": self.feature_sum,
            "cov_sum": self.cov_sum,
        }
        atomic_save(payload, path)

    @classmethod
    def load(cls, path: Path) -> ReferenceStats:
        """Read a file written by `save`; raises MetricsError if it is not one of the current format."""
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated / foreign file: report it as the cache problem it is
            raise MetricsError(f"cannot read reference stats {path}: {err}") from err
        if not isinstance(payload, dict) or payload.get("format") != _STATS_FORMAT:
            raise MetricsError(f"{path} is not a diffablate reference-stats file of format {_STATS_FORMAT}")
        return cls(payload["key"], payload["weights_sha256"], payload["features"], payload["feature_sum"], payload["cov_sum"])


def reference_stats_path(key: str, n: int, weights_sha256: str, cache: Path | None = None) -> Path:
    """Cache file for reference stats of `n` images named `key` (e.g. "fashion-mnist.test.28px")."""
    if not _KEY_PATTERN.fullmatch(key):
        raise ValueError(f"reference key {key!r} must match {_KEY_PATTERN.pattern} (it becomes a file name)")
    root = cache if cache is not None else cache_dir()
    return root / "fid-ref" / f"{key}.n{n}.{weights_sha256[:16]}.pt"


def get_reference_stats(
    key: str,
    n: int,
    images: Callable[[], Tensor | Sequence[Tensor]],
    extractor: FeatureExtractor,
    *,
    cache: Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> ReferenceStats:
    """Reference stats from the disk cache, or extracted from `images()` and cached.

    The cache is keyed by the caller's `key` (which must name dataset, split and resolution), `n` and the
    extractor's weights hash. `images` is a callable so that a cache hit never loads the dataset.
    """
    path = reference_stats_path(key, n, extractor.weights_sha256, cache)
    if path.is_file():
        stats = ReferenceStats.load(path)
        if stats.key == key and stats.n == n and stats.weights_sha256 == extractor.weights_sha256:
            return stats
        warnings.warn(f"{path} holds stats for another key/n/weights; rebuilding it", stacklevel=2)
    loaded = images()
    if len(loaded) != n:
        raise MetricsError(f"reference {key!r}: asked for n={n} images, the loader returned {len(loaded)}")
    stats = ReferenceStats.from_features(key, extractor(loaded, progress=progress), extractor.weights_sha256)
    stats.save(path)
    return stats


@dataclass(frozen=True)
class FIDResult:
    """An FID with the sample counts behind it and a bootstrap CI over the generated samples."""

    value: float
    n_gen: int
    n_ref: int
    ci_low: float | None  # None when n_bootstrap == 0
    ci_high: float | None
    confidence: float
    n_bootstrap: int

    def to_metrics(self, prefix: str = "fid") -> dict[str, float]:
        """Flat name -> number dict for MLflow; one column per field so reports pivot without parsing."""
        out = {prefix: self.value, f"{prefix}_n_gen": float(self.n_gen), f"{prefix}_n_ref": float(self.n_ref)}
        if self.ci_low is not None and self.ci_high is not None:
            out[f"{prefix}_ci_low"] = self.ci_low
            out[f"{prefix}_ci_high"] = self.ci_high
        return out


@dataclass(frozen=True)
class KIDResult:
    """KID (mean over random subsets, as torchmetrics reports it) with its std and sample counts."""

    value: float
    std: float
    n_gen: int
    n_ref: int
    subsets: int
    subset_size: int

    def to_metrics(self, prefix: str = "kid") -> dict[str, float]:
        """Flat name -> number dict for MLflow."""
        return {
            prefix: self.value,
            f"{prefix}_std": self.std,
            f"{prefix}_n_gen": float(self.n_gen),
            f"{prefix}_n_ref": float(self.n_ref),
            f"{prefix}_subset_size": float(self.subset_size),
        }


def score_fid(
    gen_features: Tensor,
    ref: ReferenceStats,
    *,
    n_bootstrap: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    confidence: float = 0.95,
    device: str | torch.device | None = None,
) -> FIDResult:
    """FID of generated features against `ref`, with a percentile-bootstrap CI over generated samples.

    The value is torchmetrics' `FrechetInceptionDistance.compute()`. The CI resamples the generated set
    only (the reference is the fixed yardstick), with `seed`. FID is biased upward at small n and a
    resample with repeats has fewer distinct samples, so the interval tends to sit above the value; it
    measures the spread from generated-sample noise, for comparing runs scored at equal n_gen.
    The bootstrap runs on `device` (default: CUDA when available), in float64 either way.
    """
    _check_features(gen_features, "generated", dim=ref.features.shape[1])
    value = _torchmetrics_fid(gen_features, ref)
    ci_low = ci_high = None
    if n_bootstrap > 0:
        dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        fast = _SymmetricFID(ref, dev)
        gen64 = gen_features.double().to(dev)
        ci = percentile_bootstrap(lambda idx: fast(gen64[torch.from_numpy(idx).to(dev)]), len(gen64), n_resamples=n_bootstrap, seed=seed, confidence=confidence)
        ci_low, ci_high = ci.low, ci.high
    return FIDResult(value, len(gen_features), ref.n, ci_low, ci_high, confidence, n_bootstrap)


def score_kid(
    gen_features: Tensor,
    ref: ReferenceStats,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> KIDResult:
    """KID via torchmetrics' `KernelInceptionDistance`; `subset_size` is capped at the smaller set's size.

    torchmetrics draws its subsets from torch's global RNG; that RNG is forked and seeded here, so the
    same `seed` gives the same number and the caller's RNG stream is untouched.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    _check_features(gen_features, "generated", dim=ref.features.shape[1])
    size = min(subset_size, len(gen_features), ref.n)
    with warnings.catch_warnings():
        # "KID will save all extracted features": we already hold them, that is the point of ReferenceStats
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=_PrecomputedFeatures(ref.features.shape[1]), subsets=subsets, subset_size=size)
    metric.update(ref.features, real=True)
    metric.update(gen_features.float().cpu(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return KIDResult(float(mean), float(std), len(gen_features), ref.n, subsets, size)


@dataclass(frozen=True)
class SetComparison:
    """FID (and optionally KID) of one image set against another."""

    fid: FIDResult
    kid: KIDResult | None


def compare_image_sets(
    ref_images: Tensor | Sequence[Tensor],
    gen_images: Tensor | Sequence[Tensor],
    extractor: FeatureExtractor,
    *,
    kid: bool = False,
    n_bootstrap: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> SetComparison:
    """Score `gen_images` against `ref_images` (no caching: for ad-hoc folder-vs-folder comparisons)."""
    ref = ReferenceStats.from_features("adhoc", extractor(ref_images, progress=progress), extractor.weights_sha256)
    gen = extractor(gen_images, progress=progress)
    fid = score_fid(gen, ref, n_bootstrap=n_bootstrap, seed=seed)
    return SetComparison(fid, score_kid(gen, ref, seed=seed) if kid else None)


class _PrecomputedFeatures(torch.nn.Module):
    """Identity "feature network": lets torchmetrics' FID/KID accumulate features computed elsewhere."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim  # torchmetrics reads this instead of probing with a dummy image

    def forward(self, features: Tensor) -> Tensor:
        return features


def _torchmetrics_fid(gen_features: Tensor, ref: ReferenceStats) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=_PrecomputedFeatures(ref.features.shape[1]))
    # the real side is loaded as torchmetrics' own accumulated state, so cached stats skip the n x d x d product
    metric.real_features_sum = ref.feature_sum.clone()
    metric.real_features_cov_sum = ref.cov_sum.clone()
    metric.real_features_num_samples = torch.tensor(ref.n, dtype=torch.long)
    metric.update(gen_features.float().cpu(), real=False)
    return float(metric.compute())


class _SymmetricFID:
    """torchmetrics' FID formula, rewritten for bootstrap speed; same number up to float rounding.

    Hand-written because torchmetrics takes `eigvals` of the non-symmetric 2048 x 2048 product
    sigma_ref @ sigma_gen (~5 s on a 2-core CPU), too slow for hundreds of resamples. With
    sigma_gen = A^T A (A: centred generated features / sqrt(n - 1)), sigma_ref sigma_gen has the nonzero
    eigenvalues of the symmetric PSD A sigma_ref A^T (n x n), so tr sqrt(sigma_ref sigma_gen) is the sum
    of square roots of its eigenvalues. For n > d the d x d form S A^T A S with S = sigma_ref^(1/2) is
    smaller. (torch.linalg.matrix_norm(ord="nuc") is no shortcut: it takes eigvalsh of a d x d Gram
    matrix even for a 4 x 2048 input.)
    """

    def __init__(self, ref: ReferenceStats, device: torch.device | None = None) -> None:
        n = ref.n
        dev = device if device is not None else torch.device("cpu")  # score_fid passes CUDA when available
        self.mu = (ref.feature_sum / n).to(dev)
        # torchmetrics' covariance estimator, from the same sums
        self.cov = (ref.cov_sum.to(dev) - n * torch.outer(self.mu, self.mu)) / (n - 1)
        self.trace = float(self.cov.trace())
        self._sqrt_cov: Tensor | None = None  # only needed when n_gen > d; an eigh of d x d costs seconds

    def __call__(self, gen: Tensor) -> float:
        mu_g = gen.mean(dim=0)
        a = (gen - mu_g) / (len(gen) - 1) ** 0.5
        n, d = a.shape
        if n <= d:
            inner = a @ self.cov @ a.t()
        else:
            if self._sqrt_cov is None:
                evals, evecs = torch.linalg.eigh(self.cov)
                self._sqrt_cov = (evecs * evals.clamp(min=0).sqrt()) @ evecs.t()
            inner = self._sqrt_cov @ (a.t() @ a) @ self._sqrt_cov
        # rounding can push zero eigenvalues of a PSD matrix slightly negative; their true sqrt is 0
        cross = float(torch.linalg.eigvalsh(inner).clamp(min=0).sqrt().sum())
        mean_term = float((self.mu - mu_g).square().sum())
        return mean_term + self.trace + float(a.square().sum()) - 2.0 * cross


def _check_features(features: Tensor, what: str, dim: int | None = None) -> None:
    if features.dim() != 2:
        raise ValueError(f"{what} features must be (n, d), got shape {tuple(features.shape)}")
    if dim is not None and features.shape[1] != dim:
        raise ValueError(f"{what} features have dimension {features.shape[1]}, the reference has {dim}")
    if features.shape[0] < 2:
        raise MetricsError(f"{what} set has {features.shape[0]} image(s); FID needs at least 2 (a covariance)")
