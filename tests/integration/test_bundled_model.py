"""The bundled model: loads offline through the FLUX.1 code path and its maps localise the named things."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import conceptattention as ca
from conceptattention.errors import ConceptAttentionError
from conceptattention.eval.config import EvalConfig
from conceptattention.eval.datasets import SceneDataset
from conceptattention.eval.harness import score_dataset
from conceptattention.loading import bundled_model_path

# Measured on the first 40 held-out test scenes with the shipped weights (see docs/bundled_model.md):
# ConceptAttention mIoU 0.579 (untrained transformer: 0.174); demo scenes 0-3 mean IoU 0.445. The
# thresholds leave a margin for numerical differences across machines and library versions.
MIN_MIOU = 0.50
MIN_MARGIN_OVER_UNTRAINED = 0.30
MIN_DEMO_MEAN_IOU = 0.38


@pytest.fixture(scope="module")
def bundled():
    return ca.load_pipeline()


def test_bundled_model_is_a_flux_pipeline_within_budget(bundled):
    folder = bundled_model_path()
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline" and type(bundled).__name__ == "FluxPipeline"
    assert type(bundled.transformer).__name__ == "FluxTransformer2DModel"
    weights = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    assert weights <= 25 * 2**20
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))  # safetensors only
    assert bundled.transformer.dtype == torch.float32  # recorded default dtype for CPU use
    assert bundled.transformer.config.num_single_layers >= 1


def _miou(pipe, scenes: SceneDataset) -> float:
    return score_dataset(pipe, scenes, EvalConfig(dataset="scenes"))[0]["miou"]


def test_maps_localise_the_named_things(bundled):
    from conceptattention.bundled.model import BundledModelConfig, build_untrained

    scenes = SceneDataset("test", 40)
    trained = _miou(bundled, scenes)
    original = bundled.transformer
    architecture = BundledModelConfig.of_model(bundled_model_path())
    bundled.transformer = build_untrained(architecture, seed=0).transformer
    try:
        untrained = _miou(bundled, scenes)
    finally:
        bundled.transformer = original
    assert trained >= MIN_MIOU
    assert trained - untrained >= MIN_MARGIN_OVER_UNTRAINED


def test_demo_scene_iou_and_generation(bundled, tmp_path):
    import io

    from rich.console import Console

    from conceptattention.demo import run_demo

    ious = run_demo(out=tmp_path, model=None, scenes=(0, 1, 2, 3), prompt="a photo of lemon, brick and grass",
                    console=Console(file=io.StringIO()))  # fmt: skip
    assert list(ious) == [0, 1, 2, 3] and list(ious[3]) == ["grass", "apple", "sand", "brick"]
    assert np.mean([v for scene in ious.values() for v in scene.values()]) > MIN_DEMO_MEAN_IOU
    assert (tmp_path / "encode" / "scene_003" / "overlay_grid.png").is_file()
    with pytest.raises(ConceptAttentionError, match="at least one test scene"):
        run_demo(out=tmp_path, model=None, scenes=(), prompt="sky", console=Console(file=io.StringIO()))
    meta = json.loads((tmp_path / "generate" / "metadata.json").read_text())
    assert meta["image_size"] == [32, 32] and meta["concepts"] == ["lemon", "brick", "grass"]
