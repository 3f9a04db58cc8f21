"""diffablate: seeded, tracked ablation studies of text-to-image diffusion claims."""

__version__ = "0.1.0"
