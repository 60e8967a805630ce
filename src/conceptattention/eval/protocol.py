"""How one image is turned into maps and per-image statistics (the paper's protocol, made explicit)."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from conceptattention.adapters.base import BlockSelection
from conceptattention.config import ConceptAttentionConfig
from conceptattention.core import (
    SegmentationCounts,
    binary_map_ap,
    binary_mask,
    finalize_maps,
    gaussian_blur3x3,
    segment,
    upsample,
)
from conceptattention.core.metrics import average_precision
from conceptattention.encode import encode_image
from conceptattention.eval.datasets.base import VOID

IMAGENET_BACKGROUNDS = ("background", "floor", "tree", "person", "grass", "face")
VOC_BACKGROUNDS = ("background", "floor", "grass", "tree", "sky")


@dataclass(frozen=True, kw_only=True)
class EvalProtocol:
    """Evaluation protocol of a dataset.

    Attributes:
        background_concepts: concepts added to each image's classes; in multi-class
            evaluation they all map to label 0 (background).
        caption: template with ``{classes}`` (the image's class words joined as "a, b and c").
        t: noise level of the encoded image.
        num_samples: noise draws averaged per image.
        blur: 3x3 Gaussian blur (sigma 1) on the token-grid maps.
        resolution: model input (height, width); None: the model's default.
        gt_size: (height, width) at which maps and labels are compared; None: the label's own size.
        image_via_gt_size: resize the image to ``gt_size`` before the model resolution (the
            Chefer et al. pipeline the paper followed).
    """

    background_concepts: tuple[str, ...] = ()
    caption: str = "a {classes}"
    t: float = 0.5
    num_samples: int = 1
    blur: bool = False
    resolution: tuple[int, int] | None = None
    gt_size: tuple[int, int] | None = None
    image_via_gt_size: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PAPER_PROTOCOL = EvalProtocol(num_samples=5, blur=True, gt_size=(224, 224), image_via_gt_size=True)
"""The paper's real-image configuration (method.md section 7): 5 noise draws, blur, GT at 224 px."""

PROTOCOLS: dict[str, EvalProtocol] = {
    "imagenet-seg": replace(PAPER_PROTOCOL, background_concepts=IMAGENET_BACKGROUNDS),
    "voc-single": replace(PAPER_PROTOCOL, background_concepts=VOC_BACKGROUNDS),
    "voc-multi": replace(PAPER_PROTOCOL, background_concepts=VOC_BACKGROUNDS),
    # Synthetic scenes: the caption lists the scene's concepts; labels compared at native size.
    "scenes": EvalProtocol(caption="a photo of {classes}"),
}
"""Dataset name -> its protocol."""

METHODS: dict[str, ConceptAttentionConfig] = {
    "concept_attention": ConceptAttentionConfig(),
    "concept_attention_no_softmax": ConceptAttentionConfig(softmax=False),
    "concept_keys_image": ConceptAttentionConfig(concept_keys="image"),
    "concept_keys_concepts": ConceptAttentionConfig(concept_keys="concepts"),
    "cross_attention": ConceptAttentionConfig(score_space="cross_attention"),
    "value_space": ConceptAttentionConfig(score_space="value"),
}
"""Method name (``--method``) -> the variant it evaluates."""


def join_words(words: Sequence[str]) -> str:
    """``["a"]`` -> ``"a"``; ``["a", "b", "c"]`` -> ``"a, b and c"``."""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def item_seed(seed: int, item_id: str) -> int:
    """Per-image noise seed: independent of batching, sharding and resume order."""
    return (seed * 1_000_003 + zlib.crc32(item_id.encode())) % 2**31


def concepts_for(item, protocol: EvalProtocol) -> tuple[str, ...]:
    """The image's class words, then the background concepts that are not already among them."""
    extra = tuple(c for c in protocol.background_concepts if c not in item.classes)
    return (*item.classes, *extra)


def _resize_labels(labels: np.ndarray, size: tuple[int, int] | None) -> torch.Tensor:
    if size is None or labels.shape == tuple(size):
        return torch.from_numpy(labels.astype(np.int64))
    resized = Image.fromarray(labels.astype(np.uint8)).resize(size[::-1], Image.Resampling.NEAREST)
    return torch.from_numpy(np.asarray(resized).astype(np.int64))


def _prepare_image(image: np.ndarray, protocol: EvalProtocol) -> Image.Image:
    picture = Image.fromarray(image)
    if protocol.image_via_gt_size and protocol.gt_size is not None:
        picture = picture.resize(protocol.gt_size[::-1], Image.Resampling.LANCZOS)
    return picture


@dataclass
class ItemStats:
    """Sufficient statistics of one image for one method (summable over a dataset)."""

    confusion: list[list[int]] = field(default_factory=list)  # sparse [target, pred, count]
    confusion_argmax: list[list[int]] = field(default_factory=list)  # binary: argmax variant
    ap: float | None = None


def _counts(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[list[int]]:
    counts = SegmentationCounts(num_classes, ignore_index=VOID)
    counts.update(pred, labels)
    return counts.sparse()


def binary_stats(maps: torch.Tensor, labels: torch.Tensor) -> ItemStats:
    """maps: (C, height, width) with the target concept first; labels: (height, width) 0/1/255.

    The target map is min-max scaled (the soft map of AP) and binarised at its mean; the argmax
    variant takes the pixels where the target wins over every other concept.
    """
    soft = finalize_maps(maps[None, :1].flatten(2), "minmax").view(1, 1, *maps.shape[1:])
    valid = labels != VOID
    return ItemStats(
        confusion=_counts(binary_mask(soft, 0)[0].long(), labels, 2),
        confusion_argmax=_counts((segment(maps[None])[0] == 0).long(), labels, 2),
        ap=binary_map_ap(soft[0, 0][valid], labels[valid].bool()),
    )


def multiclass_stats(
    maps: torch.Tensor, labels: torch.Tensor, class_ids: Sequence[int], num_own: int, num_classes: int
) -> ItemStats:
    """maps: (C, height, width); class_ids: label of each concept (backgrounds -> 0); AP over the own classes."""
    ids = torch.tensor(list(class_ids))
    valid = labels != VOID
    aps = [
        average_precision(maps[i][valid], labels[valid] == ids[i])
        for i in range(num_own)
        if (labels[valid] == ids[i]).any()
    ]
    return ItemStats(
        confusion=_counts(ids[segment(maps[None])[0]], labels, num_classes),
        ap=float(np.mean(aps)) if aps else None,
    )


def blocks_used(pipe: Any, config: ConceptAttentionConfig) -> BlockSelection:
    """The blocks of each kind ``config`` selects on this pipeline's transformer (``pipe``: a pipeline or the
    run's :class:`~conceptattention.plan.ModelPlan`)."""
    from conceptattention.plan import ModelPlan, model_plan

    model = pipe if isinstance(pipe, ModelPlan) else model_plan(pipe)
    return model.resolve_blocks(config.layers, config.single_layers)


def evaluate_batch(
    pipe: Any,
    items: Sequence[Any],
    *,
    dataset_kind: Literal["binary", "multiclass"],
    num_classes: int,
    protocol: EvalProtocol,
    config: ConceptAttentionConfig,
    seed: int = 0,
    **encode_kwargs: Any,
) -> list[tuple[ItemStats, list[ItemStats]]]:
    """Statistics for items that share one concept list: (overall, per selected block) per item."""
    concepts = concepts_for(items[0], protocol)
    height, width = protocol.resolution or (None, None)
    maps = encode_image(
        pipe,
        [_prepare_image(item.image, protocol) for item in items],
        concepts,
        caption=protocol.caption.format(classes=join_words(items[0].classes)),
        config=config,
        t=protocol.t,
        num_samples=protocol.num_samples,
        seed=[item_seed(seed, item.id) for item in items],
        height=height,
        width=width,
        **encode_kwargs,
    )
    results = []
    for b, item in enumerate(items):
        labels = _resize_labels(item.labels, protocol.gt_size)
        grids = [maps.maps[b]] + ([] if maps.block_maps is None else list(maps.block_maps[:, b]))
        stats = []
        for grid in grids:  # (C, h, w)
            grid = gaussian_blur3x3(grid[None])[0] if protocol.blur else grid
            up = upsample(grid[None], (labels.shape[0], labels.shape[1]))[0]
            if dataset_kind == "binary":
                stats.append(binary_stats(up, labels))
            else:
                class_ids = (*item.class_ids, *([0] * (len(concepts) - len(item.classes))))
                stats.append(multiclass_stats(up, labels, class_ids, len(item.classes), num_classes))
        results.append((stats[0], stats[1:]))
    return results
