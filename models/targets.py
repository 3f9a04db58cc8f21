"""The prediction target (`diffusion.prediction_type`): what the network outputs, as one small registry.

Three places need to know a target, and all read it from here: config validation (the names), the training
loss (`target`: what the output is regressed on) with the Min-SNR loss weighting (`x0_mse_factor`), and the
samplers (`scheduler_name`: how diffusers' schedulers turn the output back into x0). A new target is one
class; a name that is not registered fails loudly wherever it is used.

Light on purpose (torch only, no diffusers): models/config.py and models/axes.py import it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from torch import Tensor

from diffablate.models.registry import Registry


class PredictionTarget(ABC):
    """What the denoiser predicts at (x0, noise, t)."""

    scheduler_name: str  # diffusers' `prediction_type` for the same target (schedulers invert it when sampling)

    @abstractmethod
    def target(self, scheduler: Any, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The regression target of the network's output (`scheduler`: the training DDPMScheduler)."""

    @abstractmethod
    def x0_mse_factor(self, snr: Tensor) -> Tensor:
        """k(SNR) with |target - output|^2 = k(SNR) |x0 - x0_hat|^2: converts an x0-space loss weight (Min-SNR)
        into a weight on this target's own MSE."""


PREDICTION_TYPES: Registry[type[PredictionTarget]] = Registry("prediction type")


@PREDICTION_TYPES.register("epsilon")
class Epsilon(PredictionTarget):
    """The noise (DDPM): |eps - eps_hat|^2 = SNR |x0 - x0_hat|^2."""

    scheduler_name = "epsilon"

    def target(self, scheduler: Any, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return noise

    def x0_mse_factor(self, snr: Tensor) -> Tensor:
        return snr


@PREDICTION_TYPES.register("v_prediction")
class Velocity(PredictionTarget):
    """v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022, progressive distillation):
    |v - v_hat|^2 = (SNR + 1) |x0 - x0_hat|^2."""

    scheduler_name = "v_prediction"

    def target(self, scheduler: Any, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return scheduler.get_velocity(x0, noise, t)

    def x0_mse_factor(self, snr: Tensor) -> Tensor:
        return snr + 1


def prediction_target(name: str) -> PredictionTarget:
    """The target registered as `name` (KeyError listing the known ones otherwise)."""
    return PREDICTION_TYPES.get(name)()
