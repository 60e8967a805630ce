"""PascalVOC 2012 segmentation val: single-class subset (930 images, binary) and all 1,449 images (21 labels)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from conceptattention.eval.datasets.base import (
    BINARY_CLASS_NAMES,
    VOID,
    DatasetError,
    EvalItem,
    IndexedDataset,
    check_index,
)

VOC_TAR = "VOCtrainval_11-May-2012.tar"
VOC_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
VOC_VAL_COUNT = 1449
VOC_SINGLE_COUNT = 930

VOC_CLASSES: tuple[str, ...] = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
"""VOC label value -> official class name (0-20)."""

_VOC_SHORT = {
    "aeroplane": "plane",
    "bicycle": "bike",
    "diningtable": "table",
    "motorbike": "motorcycle",
    "pottedplant": "pot",
    "tvmonitor": "monitor",
}
VOC_WORDS: tuple[str, ...] = tuple(_VOC_SHORT.get(name, name) for name in VOC_CLASSES)
"""VOC label value -> concept word given to the model (single words a text encoder knows)."""


def _voc_dir(root: Path) -> Path:
    """The ``VOC2012`` folder, given it, ``VOCdevkit`` or the folder holding ``VOCdevkit``."""
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "ImageSets" / "Segmentation" / "val.txt").is_file():
            return candidate
    expected = root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt"
    raise DatasetError(
        f"PascalVOC 2012 not found: no ImageSets/Segmentation/val.txt under {root} (expected e.g. {expected}, "
        f"listing {VOC_VAL_COUNT:,} ids). Download {VOC_TAR} (about 2 GB) from {VOC_URL} and extract it; "
        "pass the folder holding VOCdevkit/, VOCdevkit/ or VOCdevkit/VOC2012/"
    )


class _VOCBase(IndexedDataset):
    """Shared reading of the VOC 2012 segmentation val split."""

    name: str
    kind: Literal["binary", "multiclass"]
    class_names: tuple[str, ...]

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = _voc_dir(Path(root).expanduser())
        split = self.root / "ImageSets" / "Segmentation" / "val.txt"
        self._val_ids = [line.strip() for line in split.read_text().splitlines() if line.strip()]
        if not self._val_ids:
            raise DatasetError(f"{split} lists no image ids; the one in {VOC_TAR} lists {VOC_VAL_COUNT:,}")

    def _path(self, folder: str, image_id: str, suffix: str) -> Path:
        path = self.root / folder / f"{image_id}{suffix}"
        if not path.is_file():
            raise DatasetError(
                f"{path} not found, though {image_id} is listed in ImageSets/Segmentation/val.txt: "
                f"the extraction of {VOC_TAR} looks incomplete"
            )
        return path

    def _read_labels(self, image_id: str) -> np.ndarray:
        """(height, width) int64 label values 0-20 and 255, as stored in the palette PNG."""
        path = self._path("SegmentationClass", image_id, ".png")
        with _opened(path) as im:
            # Palette indices are the labels; an RGB-converted file would give colours instead.
            if im.mode not in ("P", "L"):
                raise DatasetError(f"{path} is a {im.mode} image; expected a palette PNG whose indices are labels")
            return np.asarray(im, dtype=np.int64)

    def _read_item_arrays(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(height, width, 3) uint8 image and (height, width) int64 labels."""
        labels = self._read_labels(image_id)
        with _opened(self._path("JPEGImages", image_id, ".jpg")) as im:
            image = np.asarray(im.convert("RGB"), dtype=np.uint8)
        if image.shape[:2] != labels.shape:
            raise DatasetError(f"{image_id}: image is {image.shape[:2]} but its label is {labels.shape}")
        return image, labels


@contextlib.contextmanager
def _opened(path: Path):
    """A fully decoded image file, or a DatasetError naming it (truncated or corrupt files included)."""
    try:
        with Image.open(path) as image:
            image.load()
            yield image
    except (OSError, SyntaxError, ValueError) as error:
        raise DatasetError(f"{path}: cannot read this image ({error}); extract it again from the archive") from None


def _present_classes(labels: np.ndarray) -> tuple[int, ...]:
    """Foreground label values present (1-20), ascending; background and void excluded."""
    return tuple(int(v) for v in np.unique(labels) if v not in (0, VOID))


class VOCMultiClass(_VOCBase):
    """PascalVOC 2012 segmentation val, all 1,449 images; labels 0-20 as in the PNGs, 255 = void.

    Args:
        root: the folder holding ``VOCdevkit/``, ``VOCdevkit/`` itself, or ``VOCdevkit/VOC2012/``.
    """

    name = "voc-multi"
    kind: Literal["binary", "multiclass"] = "multiclass"
    class_names = VOC_WORDS

    def __len__(self) -> int:
        return len(self._val_ids)

    def ids(self) -> list[str]:
        """VOC image ids of val.txt, in file order."""
        return list(self._val_ids)

    def __getitem__(self, i: int) -> EvalItem:
        image_id = self._val_ids[check_index(i, len(self._val_ids))]
        image, labels = self._read_item_arrays(image_id)
        present = _present_classes(labels)
        return EvalItem(image_id, image, labels, tuple(VOC_WORDS[c] for c in present), present)


class VOCSingleClass(_VOCBase):
    """PascalVOC 2012 val images showing background plus exactly one class (930 on the real data), binary.

    Labels: 1 where the class is, 0 background, 255 void kept. Selecting the subset reads every label PNG
    once (on first use); the selection is kept in memory only.

    Args:
        root: the folder holding ``VOCdevkit/``, ``VOCdevkit/`` itself, or ``VOCdevkit/VOC2012/``.
    """

    name = "voc-single"
    kind: Literal["binary", "multiclass"] = "binary"
    class_names = BINARY_CLASS_NAMES

    def __init__(self, root: str | os.PathLike[str]) -> None:
        super().__init__(root)
        self._selection: list[tuple[str, int]] | None = None

    @property
    def _selected(self) -> list[tuple[str, int]]:
        """(image id, its single class value) of the subset, in val.txt order."""
        if self._selection is None:
            self._selection = []
            for image_id in self._val_ids:
                values = set(np.unique(self._read_labels(image_id)).tolist()) - {VOID}
                # Background must be present too: an image filled by one object (plus void) is no segmentation task.
                if len(values) == 2 and 0 in values:
                    self._selection.append((image_id, max(values)))
        return self._selection

    def __len__(self) -> int:
        return len(self._selected)

    def ids(self) -> list[str]:
        """VOC image ids of the subset, in val.txt order (the first call reads every label PNG)."""
        return [image_id for image_id, _ in self._selected]

    def __getitem__(self, i: int) -> EvalItem:
        image_id, class_id = self._selected[check_index(i, len(self._selected))]
        image, labels = self._read_item_arrays(image_id)
        binary = np.where(labels == VOID, VOID, (labels == class_id).astype(np.int64))
        return EvalItem(image_id, image, binary, (VOC_WORDS[class_id],), (1,))
