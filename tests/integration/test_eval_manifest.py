"""The eval manifest of a real (tiny, untrained) pipeline differs exactly where the settings do."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from conceptattention.eval.config import EvalConfig
from conceptattention.eval.manifest import manifest_of


@pytest.fixture(scope="module")
def scene_pipe(saved_scene_model):
    from conceptattention.loading import load_pipeline

    return load_pipeline(str(saved_scene_model))


BASE = EvalConfig(dataset="scenes", limit=3)


# setting changed -> the manifest keys that must differ (the settings a resumed run must match)
CHANGES = [
    ({"seed": 1}, {"seed"}),
    ({"limit": 2}, {"limit"}),
    ({"per_block": True}, {"per_block"}),
    ({"layers": (0,)}, {"layers"}),
    ({"num_samples": 2}, {"protocol"}),
    ({"blur": True}, {"protocol"}),
    ({"resolution": 64}, {"protocol"}),
    ({"dataset": "voc-multi"}, {"dataset", "protocol"}),
    # free to differ between runs into one folder
    ({"methods": ("concept_attention", "value_space")}, set()),
    ({"t_values": (0.25, 0.75)}, set()),
    ({"batch_size": 8}, set()),
    ({"out": Path("elsewhere")}, set()),
    ({"data": Path("some/data")}, set()),
    ({"overwrite": True}, set()),
    ({"words": "lemma"}, set()),  # not an ImageNet run: words do not apply
]


@pytest.mark.parametrize(("change", "differing"), CHANGES, ids=[",".join(c) for c, _ in CHANGES])
def test_manifest_differs_exactly_in_the_changed_settings(scene_pipe, change, differing):
    before = manifest_of(BASE, scene_pipe, 500)
    after = manifest_of(dataclasses.replace(BASE, **change), scene_pipe, 500)
    assert {key for key in before.keys() | after.keys() if before.get(key) != after.get(key)} == differing
