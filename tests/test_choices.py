"""One map from config keys to registries (models/choices.py), one registry of prediction targets
(models/targets.py) and one `resolve_device` (models/device.py), each read by every place that needs it
(issue 15's "Also" list)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import Tensor

from diffablate.metrics.images import MetricsError
from diffablate.models import axes, choices, diffusion, targets
from diffablate.models import device as dev
from diffablate.models.config import ConfigError, RunConfig


@pytest.mark.parametrize("key", sorted(choices.registries()))
def test_every_registry_named_key_takes_exactly_its_registrys_names(key: str):
    names = choices.names(key)
    assert names and choices.registry_for(key) is not None
    listed = key == "eval.panel_samplers"  # a list of names: each element is checked
    field = f"{key}[0]" if listed else key
    with pytest.raises(ConfigError, match=rf"^{re.escape(field)}: must be one of {re.escape(str(names))}"):
        RunConfig().with_overrides({key: ["no-such-name"] if listed else "no-such-name"})
    assert choices.registry_for("train.lr") is None


def test_specs_read_the_same_map():
    from diffablate.studies.designs import SpecError, check_value

    for key in ("axes.space", "diffusion.prediction_type", "eval.sampler"):
        reg = choices.registry_for(key)
        with pytest.raises(SpecError, match=rf"design.axes.x\[0\]: unknown {reg.kind} 'typo'.*; choose one of"):
            check_value(key, "typo", "design.axes.x[0]", RunConfig())


class X0(targets.PredictionTarget):
    """The clean image itself (diffusers' "sample"): |x0 - x0_hat|^2, factor 1."""

    scheduler_name = "sample"

    def target(self, scheduler, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return x0

    def x0_mse_factor(self, snr: Tensor) -> Tensor:
        return torch.ones_like(snr)


def test_one_registered_target_reaches_config_loss_weighting_and_samplers(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(targets.PREDICTION_TYPES._items, "x0", X0)
    cfg = RunConfig().with_overrides({"diffusion.prediction_type": "x0", "axes.loss_weighting": "min-snr"})
    scheduler = diffusion.build_scheduler(cfg.diffusion)
    assert scheduler.config.prediction_type == "sample"  # diffusers' own name for it
    for name in diffusion.SAMPLERS:
        assert diffusion.SAMPLERS.get(name)(cfg.diffusion).scheduler().config.prediction_type == "sample", name
    x0, noise, t = torch.rand(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([3, 500])
    assert torch.equal(diffusion.training_target(scheduler, x0, noise, t, "x0"), x0)
    w = axes.LOSS_WEIGHTINGS.get("min-snr")(cfg, scheduler)
    snr = torch.tensor([0.5, 5.0, 50.0], dtype=torch.float64)
    assert torch.allclose(w.weights(snr), snr.clamp(max=cfg.axes.min_snr_gamma))  # min(SNR, gamma) / 1


def test_the_shipped_targets_and_their_min_snr_factors():
    assert list(targets.PREDICTION_TYPES) == ["epsilon", "v_prediction"]
    snr = torch.tensor([0.1, 2.0])
    assert torch.equal(targets.prediction_target("epsilon").x0_mse_factor(snr), snr)
    assert torch.equal(targets.prediction_target("v_prediction").x0_mse_factor(snr), snr + 1)
    with pytest.raises(ConfigError, match=r"diffusion.prediction_type: unknown prediction type 'x0'"):
        diffusion.training_target(diffusion.build_scheduler(RunConfig().diffusion), torch.zeros(1), torch.zeros(1),
                                  torch.zeros(1, dtype=torch.long), "x0")


def test_one_resolve_device_for_the_package():
    from diffablate.metrics import classifier, inception
    from diffablate.models import vae

    assert vae.resolve_device is classifier.resolve_device is dev.resolve_device
    assert dev.resolve_device("cpu") == inception.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"^device: 'tpu' is not a device \(auto, cpu, cuda or cuda:N\)"):
        dev.resolve_device("tpu")
    with pytest.raises(MetricsError, match=r"^--device: 'cuda:x' is not a device"):
        inception.resolve_device("cuda:x")
    if not torch.cuda.is_available():
        with pytest.raises(MetricsError, match=r"^--device: 'cuda' requested but CUDA is not available"):
            inception.resolve_device("cuda")
