"""Ablation axes (being built): timestep samplers, time embedding, conditioning, loss weighting."""

from diffablate.models.registry import Registry

TIMESTEP_SAMPLERS: Registry = Registry("timestep sampler")
TIME_EMBEDDINGS: Registry = Registry("time embedding")
CONDITIONINGS: Registry = Registry("conditioning")
LOSS_WEIGHTINGS: Registry = Registry("loss weighting")

for _n in ("uniform", "sequential", "cyclic", "stratified", "loss-aware", "logit-normal", "curriculum"):
    TIMESTEP_SAMPLERS.register(_n)(object)
for _n in ("on", "off"):
    TIME_EMBEDDINGS.register(_n)(object)
for _n in ("none", "cross-attention", "pooled", "concat"):
    CONDITIONINGS.register(_n)(object)
for _n in ("none", "min-snr"):
    LOSS_WEIGHTINGS.register(_n)(object)
