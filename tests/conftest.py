"""Shared pytest fixtures. Each room prefixes its fixtures (fid_ for metrics/fid)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def fid_weights() -> Path:
    """Converted FID Inception weights in the real cache ($DIFFABLATE_CACHE or ~/.cache/diffablate).

    The real cache, not a tmp dir: conversion is verified by hash and worth keeping across sessions.
    """
    from diffablate.metrics.inception import fid_inception_weights

    return fid_inception_weights()


@pytest.fixture(scope="session")
def fid_extractor(fid_weights: Path):
    """One CPU FeatureExtractor per session; batch 12 so the 32-image test sets span uneven batches."""
    from diffablate.metrics.inception import FeatureExtractor

    return FeatureExtractor(device="cpu", batch_size=12, weights=None)
