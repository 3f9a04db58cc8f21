"""Which registry names the values of which config key: the one map that config validation
(models/config.py) and the study-spec parser (studies/designs.py) both read.

A key listed here takes exactly the names its registry holds; the registries live beside the classes they
build (models/axes.py, models/data.py, ...), so a new axis value is registered there once and every reader -
`RunConfig` validation, `--set`, spec factors, Optuna's categorical choices - sees it.
"""

from __future__ import annotations

from typing import Any

from diffablate.models.registry import Registry


def registries() -> dict[str, Registry[Any]]:
    """Dotted config key -> the registry of its values (list-valued keys: of each element)."""
    # Imported on call: these modules import models/config.py, which calls back here while validating.
    from diffablate.models import axes, data, diffusion, space, targets, text

    return {
        "data.name": data.DATASETS,
        "diffusion.prediction_type": targets.PREDICTION_TYPES,
        "axes.timestep_sampler": axes.TIMESTEP_SAMPLERS,
        "axes.time_embedding": axes.TIME_EMBEDDINGS,
        "axes.conditioning": axes.CONDITIONINGS,
        "axes.loss_weighting": axes.LOSS_WEIGHTINGS,
        "axes.space": space.SPACES,
        "text.encoder": text.TEXT_ENCODERS,
        "eval.sampler": diffusion.SAMPLERS,
        "eval.panel_samplers": diffusion.SAMPLERS,
    }


def registry_for(key: str) -> Registry[Any] | None:
    """The registry naming `key`'s values, or None for a key that is not registry-named (`train.lr`)."""
    return registries().get(key)


def names(key: str) -> list[str]:
    """The names `key` accepts, in registration order (KeyError: `key` is not registry-named - a bug)."""
    return list(registries()[key])
