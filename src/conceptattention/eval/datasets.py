"""Evaluation datasets read from files the user downloaded (nothing is fetched here).

- ImageNet-Segmentation (Guillaumin et al. 2014): ``gtsegs_ijcv.mat``, 4,276 images, binary masks.
- PascalVOC 2012 segmentation val: single-class subset (930 images, binary) and all 1,449 images (21 labels).

Every dataset yields :class:`EvalItem`: an RGB image, a label map at image resolution and the concept
words of the classes present. ``open_dataset(name, path)`` maps the harness's dataset names to loaders.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, cast

import numpy as np
from PIL import Image

from conceptattention.errors import ConceptAttentionError

VOID = 255
"""Label value of pixels ignored by the metrics (VOC object boundaries and 'difficult' regions)."""

IMAGENET_SEG_FILE = "gtsegs_ijcv.mat"
IMAGENET_SEG_URL = "http://calvin-vision.net/bigstuff/proj-imagenet/data/gtsegs_ijcv.mat"
IMAGENET_SEG_COUNT = 4276

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


def _check_index(i: int, n: int) -> int:
    """Sequence-style index: negative counts from the end; out of range raises IndexError (ends iteration)."""
    j = i + n if i < 0 else i
    if not 0 <= j < n:
        raise IndexError(f"index {i} out of range for a dataset of {n} images")
    return j


class _Sequence:
    """Iteration via __getitem__/__len__ shared by the datasets."""

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> EvalItem:
        raise NotImplementedError

    def __iter__(self) -> Iterator[EvalItem]:
        return (self[i] for i in range(len(self)))


# ----------------------------------------------------------------------------------------------------
# ImageNet-Segmentation
# ----------------------------------------------------------------------------------------------------


def _import_h5py() -> Any:
    try:
        import h5py
    except ImportError as e:
        raise DatasetError(
            "reading ImageNet-Segmentation (a MATLAB v7.3 / HDF5 file) needs h5py: "
            "pip install conceptattention[eval]  (or: pip install h5py)"
        ) from e
    return h5py


def _default_word_of(wnid: str, mode: Literal["short", "lemma"]) -> str:
    """WordNet id -> class word via the project's ImageNet word list; the raw wnid when that module is absent."""
    try:
        from conceptattention.data.imagenet_words import imagenet_word
    except ImportError:
        return wnid
    return imagenet_word(wnid, mode=mode)


def _wnid_of(image_id: str) -> str:
    """'n02105162_7406' -> 'n02105162' (the ImageNet file-name convention: <wnid>_<number>)."""
    return image_id.split("_", 1)[0]


class ImageNetSegmentation(_Sequence):
    """ImageNet-Segmentation (Guillaumin et al. 2014): 4,276 images with binary foreground masks.

    Reads ``gtsegs_ijcv.mat`` (MATLAB v7.3, i.e. HDF5). Under group ``value``, each of ``img``, ``gt``
    and ``id`` is a (N, 1) dataset of object references (MATLAB cell arrays):

    - ``img[i, 0]`` -> uint8 (3, W, H): MATLAB is column-major, so axes come reversed; (2, 1, 0) gives (H, W, 3).
    - ``gt[i, 0]`` -> a (1, 1) cell of references whose ``[0, 0]`` -> the mask, (W, H), values 0/1.
    - ``id[i, 0]`` -> uint16 UTF-16 code units of e.g. ``"n02105162_7406"``; the wnid precedes the underscore.

    The file is opened on first use and reopened after unpickling or in a forked worker: HDF5 handles
    cannot be pickled and are not safe to share across processes.

    Args:
        path: the ``.mat`` file, or the folder holding ``gtsegs_ijcv.mat``.
        words: how ``word_of`` names a wnid: "short" (one common word) or "lemma" (WordNet's first lemma).
        word_of: ``word_of(wnid, words) -> str``; default: ``conceptattention.data.imagenet_words.imagenet_word``
            (the raw wnid if that module is unavailable). Must be picklable to use the dataset in workers.
    """

    name = "imagenet-seg"
    kind: Literal["binary", "multiclass"] = "binary"
    class_names = BINARY_CLASS_NAMES

    def __init__(
        self,
        path: str | os.PathLike[str],
        words: Literal["short", "lemma"] = "short",
        word_of: Callable[[str, str], str] | None = None,
    ) -> None:
        path = Path(path).expanduser()
        self.path = path / IMAGENET_SEG_FILE if path.is_dir() else path
        self.words = words
        self._word_of = word_of
        self._file: Any = None
        self._pid: int | None = None
        self._ids: list[str] | None = None
        self._words: dict[str, str] = {}
        self._len = self._validate()

    def _validate(self) -> int:
        """Check that the file exists and has the expected layout; returns the number of images."""
        if not self.path.is_file():
            raise DatasetError(
                f"{IMAGENET_SEG_FILE} not found at {self.path}: download it from {IMAGENET_SEG_URL} "
                f"({IMAGENET_SEG_COUNT:,} images)"
            )
        h5py = _import_h5py()
        if not h5py.is_hdf5(self.path):
            raise self._not_matlab("it is not an HDF5 file")
        with h5py.File(self.path, "r") as f:
            missing = [k for k in ("value/img", "value/gt", "value/id") if k not in f]
            if missing:
                raise self._not_matlab(f"it lacks {', '.join(missing)}")
            lengths = {k: f[k].shape[0] for k in ("value/img", "value/gt", "value/id")}
        if len(set(lengths.values())) != 1:
            raise self._not_matlab(f"value/img, value/gt and value/id differ in length: {lengths}")
        return lengths["value/img"]

    def _not_matlab(self, why: str) -> DatasetError:
        return DatasetError(
            f"{self.path} is not the expected MATLAB v7.3 file ({why}); expected {IMAGENET_SEG_FILE} from "
            f"{IMAGENET_SEG_URL} with value/img, value/gt and value/id for {IMAGENET_SEG_COUNT:,} images"
        )

    # -- file handle: lazy, per process, never pickled --

    @property
    def _h5(self) -> Any:
        if self._file is None or self._pid != os.getpid():
            self._file = _import_h5py().File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def close(self) -> None:
        """Close the HDF5 file (it is reopened on the next access)."""
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"] = None
        state["_pid"] = None
        return state

    # -- reading --

    def _deref(self, ref: Any, what: str) -> Any:
        """Dataset an object reference points to; a null reference means a damaged file."""
        if not ref:
            raise self._not_matlab(f"{what} is a null reference")
        return self._h5[ref]

    def _image_id(self, i: int) -> str:
        codes = np.asarray(self._deref(self._h5["value/id"][i, 0], f"value/id[{i}]")[()])
        return "".join(map(chr, codes.ravel()))

    def _image(self, i: int) -> np.ndarray:
        data = np.asarray(self._deref(self._h5["value/img"][i, 0], f"value/img[{i}]")[()])
        if data.ndim == 2:  # a grayscale image would be stored as (W, H); give it three channels
            data = np.repeat(data[None], 3, axis=0)
        return np.ascontiguousarray(data.transpose(2, 1, 0), dtype=np.uint8)

    def _mask(self, i: int) -> np.ndarray:
        cell = self._deref(self._h5["value/gt"][i, 0], f"value/gt[{i}]")
        mask = np.asarray(self._deref(cell[0, 0], f"value/gt[{i}]{{1}}")[()]).T
        # Binarize rather than trust the stored dtype/values: the contract is 0 background, 1 foreground.
        return np.ascontiguousarray(mask != 0, dtype=np.int64)

    def _word(self, wnid: str) -> str:
        if wnid not in self._words:
            word_of = self._word_of or _default_word_of
            try:
                self._words[wnid] = word_of(wnid, self.words)
            except KeyError as error:
                raise DatasetError(
                    f"{self.path}: image class {wnid!r} is not an ImageNet WordNet id ({error.args[0]}); the file "
                    "is not the ImageNet-Segmentation gtsegs_ijcv.mat, or it is damaged"
                ) from None
        return self._words[wnid]

    def __len__(self) -> int:
        return self._len

    def ids(self) -> list[str]:
        """``f"{i:05d}_{wnid}"`` for every image; reads only the id strings (cached)."""
        if self._ids is None:
            self._ids = [f"{i:05d}_{_wnid_of(self._image_id(i))}" for i in range(self._len)]
        return list(self._ids)

    def __getitem__(self, i: int) -> EvalItem:
        i = _check_index(i, self._len)
        wnid = _wnid_of(self._image_id(i))
        image, labels = self._image(i), self._mask(i)
        if image.shape[:2] != labels.shape:
            raise self._not_matlab(f"image {i} is {image.shape[:2]} but its mask is {labels.shape}")
        return EvalItem(f"{i:05d}_{wnid}", image, labels, (self._word(wnid),), (1,))


# ----------------------------------------------------------------------------------------------------
# PascalVOC 2012
# ----------------------------------------------------------------------------------------------------


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


class _VOCBase(_Sequence):
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
        image_id = self._val_ids[_check_index(i, len(self._val_ids))]
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
        image_id, class_id = self._selected[_check_index(i, len(self._selected))]
        image, labels = self._read_item_arrays(image_id)
        binary = np.where(labels == VOID, VOID, (labels == class_id).astype(np.int64))
        return EvalItem(image_id, image, binary, (VOC_WORDS[class_id],), (1,))


# ----------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------


class SceneDataset:
    """The held-out synthetic scenes (generated, no files): multi-class, each scene's concepts as vocabulary.

    ``classes`` keep the caption's order, so the protocol's caption template reproduces the
    scene's own caption.
    """

    name = "scenes"
    kind: Literal["binary", "multiclass"] = "multiclass"

    def __init__(self, split: str = "test", count: int = 500) -> None:
        from conceptattention.data.scenes import CLASSES

        self.class_names = CLASSES
        self.split, self.count = split, count

    def __len__(self) -> int:
        return self.count

    def ids(self) -> list[str]:
        return [f"{self.split}-{i:05d}" for i in range(self.count)]

    def __getitem__(self, index: int) -> EvalItem:
        from conceptattention.data.scenes import make_scene

        if not -self.count <= index < self.count:
            raise IndexError(f"scene {index} out of range 0-{self.count - 1}")
        index %= self.count
        scene = make_scene(self.split, index)
        return EvalItem(
            id=f"{self.split}-{index:05d}",
            image=scene.image,
            labels=scene.labels,
            classes=scene.concepts,
            class_ids=tuple(self.class_names.index(c) for c in scene.concepts),
        )


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
