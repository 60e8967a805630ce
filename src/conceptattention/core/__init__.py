"""The method itself: tensor math shared by every architecture adapter.

This package imports torch only (no diffusers, PIL or matplotlib), so that the
definition of ConceptAttention lives in one place and can be tested in isolation.

Dimension letters used throughout the project:

- ``B`` batch, ``C`` concepts, ``N`` image tokens, ``T`` prompt (text) tokens,
- ``H`` attention heads, ``D`` head dimension, ``L`` selected blocks,
- ``h x w`` token grid, ``height x width`` image pixels (always in that order).
"""

from conceptattention.core.accumulate import ScoreAccumulator
from conceptattention.core.attention import ConceptKeys, concept_attention
from conceptattention.core.maps import (
    Normalization,
    Temporal,
    TokenGrid,
    binary_mask,
    finalize_maps,
    gaussian_blur3x3,
    segment,
    temporal_index,
    temporal_resample,
    tokens_to_grid,
    upsample,
)
from conceptattention.core.metrics import (
    SegmentationCounts,
    average_precision,
    binary_map_ap,
    confusion_matrix,
    iou_per_class,
    mean_iou,
    miou_paper_compat,
    pixel_accuracy,
)
from conceptattention.core.scores import (
    ScoreSpace,
    block_saliency,
    cross_attention_scores,
    output_space_scores,
    value_space_scores,
)

__all__ = [
    "ConceptKeys",
    "Normalization",
    "ScoreAccumulator",
    "ScoreSpace",
    "SegmentationCounts",
    "Temporal",
    "TokenGrid",
    "average_precision",
    "binary_map_ap",
    "binary_mask",
    "block_saliency",
    "concept_attention",
    "confusion_matrix",
    "cross_attention_scores",
    "finalize_maps",
    "gaussian_blur3x3",
    "iou_per_class",
    "mean_iou",
    "miou_paper_compat",
    "output_space_scores",
    "pixel_accuracy",
    "segment",
    "temporal_index",
    "temporal_resample",
    "tokens_to_grid",
    "upsample",
    "value_space_scores",
]
