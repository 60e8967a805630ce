"""Segmentation benchmark on the synthetic scenes (multi-class argmax over each scene's concepts)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from conceptattention.config import ConceptAttentionConfig
from conceptattention.core import SegmentationCounts, average_precision
from conceptattention.data.scenes import CLASSES, Scene
from conceptattention.encode import encode_image


@dataclass
class SceneScores:
    """Running totals of one method over scenes: dataset-level confusion matrix and per-image AP."""

    counts: SegmentationCounts = field(default_factory=lambda: SegmentationCounts(len(CLASSES)))
    aps: list[float] = field(default_factory=list)

    def add(self, scene: Scene, maps: torch.Tensor) -> None:
        """Add one scene.

        Args:
            scene: the scene with its label map.
            maps: (C, height, width) soft maps of ``scene.concepts``, at label resolution.
        """
        class_ids = torch.tensor([CLASSES.index(c) for c in scene.concepts])
        pred = class_ids[maps.argmax(0)]
        labels = torch.from_numpy(scene.labels)
        self.counts.update(pred, labels)
        per_concept = [average_precision(maps[i], labels == class_ids[i]) for i in range(len(class_ids))]
        self.aps.append(float(np.nanmean(per_concept)))

    def summary(self) -> dict[str, Any]:
        ious = self.counts.ious()
        return {
            "acc": round(self.counts.accuracy(), 4),
            "miou": round(self.counts.miou(), 4),
            "map": round(float(np.nanmean(self.aps)), 4),
            "iou_per_concept": {c: (None if np.isnan(v) else round(float(v), 4)) for c, v in zip(CLASSES, ious)},
        }


def scene_maps(
    pipe: Any, scene: Scene, config: ConceptAttentionConfig, *, caption: str | None = None, **encode_kwargs: Any
):
    """ConceptMaps of one scene with its own concepts as vocabulary (caption: the scene's by default)."""
    size = scene.labels.shape
    return encode_image(
        pipe,
        scene.image,
        scene.concepts,
        caption=scene.caption if caption is None else caption,
        config=config,
        height=size[0],
        width=size[1],
        **encode_kwargs,
    )


def evaluate_method(
    pipe: Any,
    scenes: Iterable[Scene],
    config: ConceptAttentionConfig,
    *,
    progress: Callable[[Iterable], Iterable] = lambda x: x,
    **encode_kwargs: Any,
) -> tuple[SceneScores, list[SceneScores]]:
    """Scores of one method, and per selected block when ``config.per_block`` is set."""
    total = SceneScores()
    per_block: list[SceneScores] = []
    for scene in progress(scenes):
        maps = scene_maps(pipe, scene, config, **encode_kwargs)
        size = scene.labels.shape
        total.add(scene, maps.upsampled(size)[0])
        if maps.block_maps is not None:
            if not per_block:
                per_block = [SceneScores() for _ in range(maps.block_maps.shape[0])]
            for scores, block in zip(per_block, maps.block_maps):
                upsampled = torch.nn.functional.interpolate(block, size=size, mode="bilinear", align_corners=False)
                scores.add(scene, upsampled[0])
    return total, per_block


class LayoutPrior:
    """Location-only reference: per-pixel class frequency over training scenes, argmax over present classes."""

    def __init__(self, scenes: Sequence[Scene]) -> None:
        first = scenes[0].labels
        counts = np.zeros((len(CLASSES), *first.shape), dtype=np.float64)
        for scene in scenes:
            np.add.at(counts, (scene.labels, *np.indices(scene.labels.shape)), 1.0)
        self.frequency = torch.from_numpy(counts / len(scenes)).float()  # (K, height, width)

    def maps(self, scene: Scene) -> torch.Tensor:
        """(C, height, width) prior of the scene's concepts."""
        return self.frequency[[CLASSES.index(c) for c in scene.concepts]]
