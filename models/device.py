"""The device a run uses and its fast-path switches as they apply there (`cfg.device`, `cfg.perf`).

One `resolve_device` for the package (the trainer, sampling, the CLIP and VAE trainers, metrics/' Inception
and classifier): "auto" means CUDA when there is one; a malformed name, or CUDA where there is none, is a
ConfigError naming the field, before anything is built.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from diffablate.models.config import ConfigError, PerfConfig


def resolve_device(name: str | torch.device, field: str = "device") -> torch.device:
    """`"auto"` -> cuda when available, else cpu; anything else as torch spells it (`field` names the
    config key or option in the error when CUDA is asked for and absent)."""
    if isinstance(name, str) and name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:  # "tpu", "cuda:x": torch's own message says what it expected
        raise ConfigError(f"{field}: {name!r} is not a device (auto, cpu, cuda or cuda:N): {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{field}: {str(name)!r} requested but CUDA is not available")
    return dev


@dataclass(frozen=True)
class PerfResolved:
    """The fast-path switches as they apply on this device (logged as params `perf_resolved.*`)."""

    mixed_precision: str  # "no" | "bf16" | "fp16"
    compile: bool
    channels_last: bool
    fused_adam: bool
    data_on_device: bool
    cuda_graphs: bool

    def params(self) -> dict[str, str]:
        return {f"perf_resolved.{k}": str(v) for k, v in asdict(self).items()}

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.mixed_precision]


# What "auto" means for each switch, given whether the device is a GPU. bf16 needs no loss scaling;
# compile and channels_last pay off on tensor cores and cost compile time / layout copies on a CPU.
_AUTO: dict[str, Callable[[bool], Any]] = {
    "mixed_precision": lambda cuda: "bf16" if cuda else "no",
    "compile": lambda cuda: cuda,
    "channels_last": lambda cuda: cuda,
    "fused_adam": lambda cuda: cuda,
    "data_on_device": lambda cuda: True,  # on the CPU "device" and host are the same memory
    # Graphs need static shapes and no host syncs in the step (true of step.device_step) and cannot replay
    # GradScaler's inf checks; on a GPU they remove the launch overhead that dominates small models.
    "cuda_graphs": lambda cuda: cuda,
}


def resolve_perf(perf: PerfConfig, device: torch.device) -> PerfResolved:
    """Resolve "auto" per device; ConfigError for a switch this build cannot honour."""
    cuda = device.type == "cuda"
    out: dict[str, Any] = {}
    for name, auto in _AUTO.items():
        value = getattr(perf, name)
        if value == "auto":
            out[name] = auto(cuda)
        elif name == "mixed_precision":
            out[name] = value
        else:
            out[name] = value == "on"
    if out["cuda_graphs"] and not cuda:
        raise ConfigError(f"perf.cuda_graphs: 'on' needs a CUDA device, the run's device is {device}")
    if out["cuda_graphs"] and out["mixed_precision"] == "fp16":
        if perf.cuda_graphs == "on":
            raise ConfigError("perf.cuda_graphs: 'on' cannot be combined with perf.mixed_precision = 'fp16' "
                              "(the loss scaler's inf check syncs with the host); use bf16 or cuda_graphs = 'off'")
        out["cuda_graphs"] = False
    return PerfResolved(**out)
