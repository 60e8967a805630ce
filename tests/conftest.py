"""Shared fixtures: tiny Flux pipelines built in code (random weights, no network)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download anything
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_pipe():
    from tiny_flux import make_tiny_flux_pipeline

    return make_tiny_flux_pipeline(seed=0, num_layers=3, num_single_layers=1)


@pytest.fixture(scope="session")
def tiny_dev_pipe():
    """Guidance-distilled variant (FLUX.1-dev layout)."""
    from tiny_flux import make_tiny_flux_pipeline

    return make_tiny_flux_pipeline(seed=1, num_layers=2, num_single_layers=1, guidance_embeds=True)
