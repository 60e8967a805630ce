"""Writers of tiny datasets in the real on-disk formats, for tests and for trying the harness offline.

- :func:`write_imagenet_seg_mat`: a ``gtsegs_ijcv.mat``-style MATLAB v7.3 (HDF5) file.
- :func:`write_voc`: a ``VOCdevkit/VOC2012`` tree with JPEG images, palette PNG labels and ``val.txt``.
- :func:`fixture_image`, :func:`stripe_labels`, :func:`random_mask`: small synthetic arrays to write.

Example:
    >>> from conceptattention.eval.fixtures import fixture_image, stripe_labels, write_voc  # doctest: +SKIP
    >>> items = {"2007_000001": (fixture_image(24, 32), stripe_labels(24, 32, [0, 15]))}  # doctest: +SKIP
    >>> write_voc("/tmp/voc", items)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from conceptattention.eval.datasets import VOID

# The 128-byte MATLAB v7.3 header MATLAB writes into the HDF5 user block: 116 text bytes, 8 bytes of
# subsystem offset, version 0x0200 and the endian indicator "IM". HDF5 finds its own superblock at 512.
_MATLAB_TEXT = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Thu Jan  1 00:00:00 2026 HDF5 schema 1.00 ."
_MATLAB_HEADER = _MATLAB_TEXT.ljust(116, b" ") + b"\0" * 8 + b"\x00\x02" + b"IM"


# ----------------------------------------------------------------------------------------------------
# ImageNet-Segmentation (.mat, v7.3)
# ----------------------------------------------------------------------------------------------------


def _ref_names() -> Iterator[str]:
    """'a', 'b', ..., 'z', 'ba', 'bb', ...: short names like those MATLAB gives datasets in #refs#."""
    n = 0
    while True:
        name, k = "", n
        while True:
            name = chr(ord("a") + k % 26) + name
            k //= 26
            if k == 0:
                break
        yield name
        n += 1


def _check_imagenet_inputs(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], wnids: Sequence[str]) -> None:
    if not len(images) == len(masks) == len(wnids):
        raise ValueError(f"images, masks and wnids differ in length: {len(images)}, {len(masks)}, {len(wnids)}")
    for i, (image, mask) in enumerate(zip(images, masks)):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"images[{i}] must be (height, width, 3) uint8, got {image.shape} {image.dtype}")
        if mask.shape != image.shape[:2]:
            raise ValueError(f"masks[{i}] must be {image.shape[:2]} like its image, got {mask.shape}")


def write_imagenet_seg_mat(
    path: str | os.PathLike[str],
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    wnids: Sequence[str],
) -> Path:
    """Write a ``gtsegs_ijcv.mat``-style MATLAB v7.3 file.

    Layout (as in the real file): a struct group ``value`` with (N, 1) cell arrays of object references
    ``img`` (-> uint8 (3, W, H)), ``gt`` (-> (1, 1) cell of references -> uint8 (W, H) mask) and ``id``
    (-> uint16 character codes of ``f"{wnid}_{i + 1}"``); the referenced data lives in ``#refs#``.

    Args:
        path: the file to write (parent folders are created).
        images: (height, width, 3) uint8 RGB each.
        masks: (height, width) each, nonzero = foreground.
        wnids: WordNet id of each image's class, e.g. "n02105162".

    Returns:
        The path written.
    """
    import h5py  # optional extra, like in the reader

    _check_imagenet_inputs(images, masks, wnids)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(images)
    with h5py.File(path, "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")
        names = _ref_names()

        def put(data: np.ndarray, matlab_class: str, **attrs: Any) -> Any:
            dset = refs.create_dataset(next(names), data=data)
            dset.attrs["MATLAB_class"] = np.bytes_(matlab_class)
            for key, value in attrs.items():
                dset.attrs[key] = value
            return dset.ref

        value = f.create_group("value")
        value.attrs["MATLAB_class"] = np.bytes_("struct")
        cells = {}
        for key in ("img", "gt", "id"):
            cells[key] = value.create_dataset(key, shape=(n, 1), dtype=h5py.ref_dtype)
            cells[key].attrs["MATLAB_class"] = np.bytes_("cell")
        for i, (image, mask, wnid) in enumerate(zip(images, masks, wnids)):
            # MATLAB stores arrays column-major, so HDF5 sees every axis order reversed.
            cells["img"][i, 0] = put(np.ascontiguousarray(image.transpose(2, 1, 0)), "uint8")
            mask_ref = put(np.ascontiguousarray((np.asarray(mask) != 0).T, dtype=np.uint8), "uint8")
            inner = refs.create_dataset(next(names), shape=(1, 1), dtype=h5py.ref_dtype)
            inner.attrs["MATLAB_class"] = np.bytes_("cell")
            inner[0, 0] = mask_ref
            cells["gt"][i, 0] = inner.ref
            # A 1xN MATLAB char row is stored as (N, 1) uint16 UTF-16 code units.
            codes = np.array([ord(c) for c in f"{wnid}_{i + 1}"], dtype=np.uint16).reshape(-1, 1)
            cells["id"][i, 0] = put(codes, "char", MATLAB_int_decode=np.int32(2))
    with open(path, "r+b") as raw:
        raw.write(_MATLAB_HEADER)
    return path


# ----------------------------------------------------------------------------------------------------
# PascalVOC 2012
# ----------------------------------------------------------------------------------------------------


def voc_palette(n: int = 256) -> np.ndarray:
    """The standard PASCAL VOC colour map: (n, 3) uint8.

    Colour of index i: its bits, taken three at a time (r, g, b), fill each channel from the most
    significant bit down, e.g. 1 -> (128, 0, 0), 15 -> (192, 128, 128), 255 -> (224, 224, 192).
    """
    palette = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        rgb, c = [0, 0, 0], i
        for bit in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((c >> channel) & 1) << bit
            c >>= 3
        palette[i] = rgb
    return palette


def write_voc(
    root: str | os.PathLike[str],
    items: dict[str, tuple[np.ndarray, np.ndarray]],
    split_ids: Sequence[str] | None = None,
) -> Path:
    """Write a ``VOCdevkit/VOC2012`` tree under ``root``.

    Writes ``JPEGImages/<id>.jpg`` (quality 95, no chroma subsampling), ``SegmentationClass/<id>.png``
    (palette PNG with the VOC colour map; pixel index = label) and ``ImageSets/Segmentation/val.txt``.

    Args:
        root: the folder to hold ``VOCdevkit/``.
        items: image id -> ((height, width, 3) uint8 RGB image, (height, width) labels 0-20 or 255).
        split_ids: ids listed in val.txt (default: all of ``items``, in order); may name ids without files.

    Returns:
        The ``VOCdevkit/VOC2012`` folder.
    """
    voc = Path(root) / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True, exist_ok=True)
    palette = voc_palette().ravel().tolist()
    for image_id, (image, labels) in items.items():
        labels = np.asarray(labels)
        if image.shape[:2] != labels.shape or labels.min() < 0 or labels.max() > VOID:
            raise ValueError(f"{image_id}: labels must be {image.shape[:2]} with values 0-255, got {labels.shape}")
        Image.fromarray(image, "RGB").save(voc / "JPEGImages" / f"{image_id}.jpg", quality=95, subsampling=0)
        label_image = Image.fromarray(labels.astype(np.uint8), "L").convert("P")
        label_image.putpalette(palette)
        label_image.save(voc / "SegmentationClass" / f"{image_id}.png")
    ids = list(items) if split_ids is None else list(split_ids)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("".join(f"{i}\n" for i in ids))
    return voc


# ----------------------------------------------------------------------------------------------------
# Arrays to write
# ----------------------------------------------------------------------------------------------------


def fixture_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(height, width, 3) uint8: smooth colour gradients (JPEG keeps them within a few levels)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    base, slope_y, slope_x = rng.uniform(40, 120, 3), rng.uniform(-3, 3, 3), rng.uniform(-3, 3, 3)
    image = base + y[..., None] * slope_y + x[..., None] * slope_x
    return np.clip(image, 0, 255).astype(np.uint8)


def random_mask(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(height, width) int64 0/1: a random rectangle of foreground, never empty nor full."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((height, width), dtype=np.int64)
    top, left = rng.integers(0, height // 2 + 1), rng.integers(0, width // 2 + 1)
    bottom, right = rng.integers(top + 1, height + 1), rng.integers(left + 1, width + 1)
    mask[top:bottom, left:right] = 1
    if mask.all():
        mask[0, 0] = 0
    return mask


def stripe_labels(height: int, width: int, values: Sequence[int], void_width: int = 1) -> np.ndarray:
    """(height, width) int64: vertical stripes holding ``values`` left to right, void (255) lines between.

    VOC draws void along object boundaries; the lines mimic that. Needs ``width >= len(values) * (void_width + 1)``.
    """
    if width < len(values) * (void_width + 1):
        raise ValueError(f"width {width} is too small for {len(values)} stripes with void lines of {void_width}")
    edges = np.linspace(0, width, len(values) + 1).round().astype(int)
    labels = np.empty((height, width), dtype=np.int64)
    for value, start, stop in zip(values, edges[:-1], edges[1:]):
        labels[:, start:stop] = value
    for edge in edges[1:-1]:
        labels[:, edge - void_width : edge] = VOID
    return labels
