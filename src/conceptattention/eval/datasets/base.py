"""What every evaluation dataset shares: the item type, the dataset protocol, the error, index rules."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from conceptattention.errors import ConceptAttentionError

VOID = 255
"""Label value of pixels ignored by the metrics (VOC object boundaries and 'difficult' regions)."""

BINARY_CLASS_NAMES: tuple[str, ...] = ("background", "foreground")
"""class_names of binary datasets; the foreground's word differs per image and is in ``EvalItem.classes``."""


class DatasetError(ConceptAttentionError):
    """A dataset file is missing or malformed; the message names the path and where to download it."""


@dataclass(frozen=True, eq=False)  # eq=False: `==` on numpy fields is elementwise, never a usable bool
class EvalItem:
    """One evaluation image with its ground truth.

    Attributes:
        id: unique and stable within the dataset (ImageNet-Seg ``f"{i:05d}_{wnid}"``, VOC image id).
        image: (height, width, 3) uint8 RGB.
        labels: (height, width) int64. Binary datasets: 0 background, 1 foreground; VOC multi-class:
            0-20; 255 (:data:`VOID`) = ignored.
        classes: concept words of the foreground classes present, in label-value order (binary: exactly one).
        class_ids: their label values (binary: ``(1,)``).
    """

    id: str
    image: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    class_ids: tuple[int, ...]


class EvalDataset(Protocol):
    """What the harness needs from a dataset."""

    name: str
    kind: Literal["binary", "multiclass"]
    class_names: tuple[str, ...]

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> EvalItem: ...

    def ids(self) -> list[str]: ...


def check_index(i: int, n: int) -> int:
    """Sequence-style index: negative counts from the end; out of range raises IndexError (ends iteration)."""
    j = i + n if i < 0 else i
    if not 0 <= j < n:
        raise IndexError(f"index {i} out of range for a dataset of {n} images")
    return j


class IndexedDataset:
    """Iteration via __getitem__/__len__ shared by the datasets."""

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> EvalItem:
        raise NotImplementedError

    def __iter__(self) -> Iterator[EvalItem]:
        return (self[i] for i in range(len(self)))
