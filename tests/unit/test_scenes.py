"""Synthetic scenes: determinism, splits, label map consistent with the pixels and the caption."""

from __future__ import annotations

import numpy as np
import pytest

from conceptattention.data.scenes import (
    _OBJECT_STYLE,
    _STUFF_COLOUR,
    CLASSES,
    OBJECTS,
    STUFF,
    SyntheticScenes,
    make_scene,
)


def test_deterministic_and_splits_disjoint():
    a, b = make_scene("train", 5), make_scene("train", 5)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels) and a.caption == b.caption
    assert not np.array_equal(make_scene("train", 6).image, a.image)
    assert not np.array_equal(make_scene("test", 5).image, a.image)
    assert not np.array_equal(make_scene("val", 5).image, make_scene("test", 5).image)
    with pytest.raises(ValueError, match="`split` must be one of"):
        make_scene("dev", 0)


def test_caption_names_exactly_the_labelled_classes():
    for i in range(100):
        scene = make_scene("test", i)
        present = {CLASSES[k] for k in np.unique(scene.labels)}
        assert set(scene.concepts) == present
        assert len(set(scene.concepts)) == len(scene.concepts)
        assert all(word in scene.caption for word in scene.concepts)
        assert scene.caption.startswith("a photo of ")


def test_label_map_matches_the_drawn_colours():
    colour_of = {**{s: _STUFF_COLOUR[s] for s in STUFF}, **{o: _OBJECT_STYLE[o][1] for o in OBJECTS}}
    palette = np.array(list(dict.fromkeys(colour_of.values())), dtype=float)  # shared colours appear once
    agree = total = 0
    for i in range(50):
        scene = make_scene("train", i)
        nearest = np.linalg.norm(scene.image[..., None, :].astype(float) - palette, axis=-1).argmin(-1)
        expected = np.array([palette.tolist().index(list(colour_of[CLASSES[k]])) for k in range(len(CLASSES))])
        agree += int((nearest == expected[scene.labels]).sum())
        total += scene.labels.size
    assert agree / total > 0.97


def test_every_concept_is_optional_and_layouts_vary():
    scenes = list(SyntheticScenes("train", 300))
    presence = np.array([[c in s.concepts for c in CLASSES] for s in scenes])
    assert presence.any(0).all() and (~presence).any(0).all()
    # no fixed layout: the top-left pixel's class varies across scenes for every stuff class
    corner = [CLASSES[s.labels[0, 0]] for s in scenes]
    assert set(STUFF) <= set(corner)
    object_counts = {sum(c in OBJECTS for c in s.concepts) for s in scenes}
    assert {0, 1, 2, 3} <= object_counts
    assert len(SyntheticScenes("test", 500)) == 500
    with pytest.raises(IndexError):
        SyntheticScenes("test", 3)[3]
