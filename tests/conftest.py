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


@pytest.fixture(scope="session")
def saved_scene_model(tmp_path_factory):
    """An untrained model of the bundled architecture (smaller), saved as a pipeline folder with defaults."""
    import json

    from conceptattention.bundled.model import BundledModelConfig, build_untrained

    config = BundledModelConfig(num_layers=2, num_attention_heads=2, attention_head_dim=16, text_dim=32)
    folder = tmp_path_factory.mktemp("models") / "scene-model"
    build_untrained(config, seed=0).save_pretrained(folder)
    defaults = {"height": 32, "width": 32, "max_sequence_length": 16, "num_inference_steps": 3}
    (folder / "conceptattention.json").write_text(json.dumps(defaults))
    return folder
