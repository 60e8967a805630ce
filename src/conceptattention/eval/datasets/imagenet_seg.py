"""ImageNet-Segmentation (Guillaumin et al. 2014): ``gtsegs_ijcv.mat``, 4,276 images, binary masks."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np

from conceptattention.eval.datasets.base import BINARY_CLASS_NAMES, DatasetError, EvalItem, IndexedDataset, check_index

IMAGENET_SEG_FILE = "gtsegs_ijcv.mat"
IMAGENET_SEG_URL = "http://calvin-vision.net/bigstuff/proj-imagenet/data/gtsegs_ijcv.mat"
IMAGENET_SEG_COUNT = 4276


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


class ImageNetSegmentation(IndexedDataset):
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
        i = check_index(i, self._len)
        wnid = _wnid_of(self._image_id(i))
        image, labels = self._image(i), self._mask(i)
        if image.shape[:2] != labels.shape:
            raise self._not_matlab(f"image {i} is {image.shape[:2]} but its mask is {labels.shape}")
        return EvalItem(f"{i:05d}_{wnid}", image, labels, (self._word(wnid),), (1,))
