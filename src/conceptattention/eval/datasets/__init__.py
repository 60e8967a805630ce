"""Evaluation datasets: one module each, read from files the user downloaded (nothing is fetched here).

- :mod:`.imagenet_seg`: ImageNet-Segmentation (Guillaumin et al. 2014), ``gtsegs_ijcv.mat``, 4,276 images, binary.
- :mod:`.voc`: PascalVOC 2012 segmentation val, single-class subset (930 images, binary) and all 1,449 (21 labels).
- :mod:`.scenes`: the bundled model's held-out synthetic scenes (generated).

Every dataset yields :class:`EvalItem` (:mod:`.base`): an RGB image, a label map at image resolution and
the concept words of the classes present. ``open_dataset(name, path)`` maps the harness's dataset names
to loaders.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, cast

from conceptattention.eval.datasets.base import (
    BINARY_CLASS_NAMES,
    VOID,
    DatasetError,
    EvalDataset,
    EvalItem,
    IndexedDataset,
    check_index,
)
from conceptattention.eval.datasets.imagenet_seg import (
    IMAGENET_SEG_COUNT,
    IMAGENET_SEG_FILE,
    IMAGENET_SEG_URL,
    ImageNetSegmentation,
)
from conceptattention.eval.datasets.scenes import SceneDataset
from conceptattention.eval.datasets.voc import (
    VOC_CLASSES,
    VOC_SINGLE_COUNT,
    VOC_TAR,
    VOC_URL,
    VOC_VAL_COUNT,
    VOC_WORDS,
    VOCMultiClass,
    VOCSingleClass,
)

__all__ = [
    "BINARY_CLASS_NAMES",
    "DATASETS",
    "IMAGENET_SEG_COUNT",
    "IMAGENET_SEG_FILE",
    "IMAGENET_SEG_URL",
    "VOC_CLASSES",
    "VOC_SINGLE_COUNT",
    "VOC_TAR",
    "VOC_URL",
    "VOC_VAL_COUNT",
    "VOC_WORDS",
    "VOID",
    "DatasetError",
    "EvalDataset",
    "EvalItem",
    "ImageNetSegmentation",
    "IndexedDataset",
    "SceneDataset",
    "VOCMultiClass",
    "VOCSingleClass",
    "check_index",
    "open_dataset",
]


def _scenes(path: Any = None, **options: Any) -> EvalDataset:
    return cast(EvalDataset, SceneDataset("test", 500))  # generated: no path needed


DATASETS: dict[str, Callable[..., EvalDataset]] = {
    "imagenet-seg": ImageNetSegmentation,
    "voc-single": VOCSingleClass,
    "voc-multi": VOCMultiClass,
    "scenes": _scenes,
}
"""Dataset name -> factory taking the user's path."""


def open_dataset(name: str, path: str | os.PathLike[str] | None, **options: Any) -> EvalDataset:
    """Open a dataset by harness name ("imagenet-seg", "voc-single", "voc-multi", ...) from the user's files."""
    factory = DATASETS.get(name)
    if factory is None:
        raise DatasetError(f"unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}")
    if path is None and name != "scenes":
        raise DatasetError(f"dataset {name!r} needs `--data PATH` (the downloaded files)")
    return factory(path, **options)
