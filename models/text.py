"""Text encoders (being built)."""

from diffablate.models.registry import Registry

TEXT_ENCODERS: Registry = Registry("text encoder")
TEXT_ENCODERS.register("learned")(object)
TEXT_ENCODERS.register("clip")(object)
