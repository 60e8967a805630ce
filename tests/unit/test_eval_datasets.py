"""Evaluation dataset loaders, read back from tiny fixtures written in the real on-disk formats."""

from __future__ import annotations

import importlib.util
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conceptattention.eval.datasets import (
    DATASETS,
    VOC_WORDS,
    DatasetError,
    EvalItem,
    ImageNetSegmentation,
    VOCMultiClass,
    VOCSingleClass,
    open_dataset,
)
from conceptattention.eval.fixtures import (
    fixture_image,
    random_mask,
    stripe_labels,
    voc_palette,
    write_imagenet_seg_mat,
    write_voc,
)

# h5py is an optional extra: without it only the ImageNet tests that need to write a .mat file skip.
needs_h5py = pytest.mark.skipif(importlib.util.find_spec("h5py") is None, reason="h5py not installed")

SIZES = [(5, 7), (8, 4), (6, 9)]  # (height, width), none square: catches transposed axes
WNIDS = ["n02105162", "n01440764", "n02105162"]


def _stub_word(wnid: str, mode: str) -> str:
    return f"{mode}:{wnid}"


# ----------------------------------------------------------------------------------------------------
# ImageNet-Segmentation
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def imagenet(tmp_path: Path) -> tuple[Path, list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(0)
    # Random pixels: the .mat stores raw uint8, so equality must be exact.
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]
    masks = [random_mask(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    path = write_imagenet_seg_mat(tmp_path / "gtsegs_ijcv.mat", images, masks, WNIDS)
    return path, images, masks


@needs_h5py
def test_imagenet_round_trip(imagenet) -> None:
    path, images, masks = imagenet
    ds = ImageNetSegmentation(path, word_of=_stub_word)
    assert (len(ds), ds.name, ds.kind, ds.class_names[0]) == (3, "imagenet-seg", "binary", "background")
    for i, item in enumerate(ds):
        assert isinstance(item, EvalItem)
        assert item.image.dtype == np.uint8 and item.labels.dtype == np.int64
        np.testing.assert_array_equal(item.image, images[i])
        np.testing.assert_array_equal(item.labels, masks[i])
        assert item.class_ids == (1,)
        assert item.id == f"{i:05d}_{WNIDS[i]}"
    np.testing.assert_array_equal(ds[-1].image, images[-1])


@needs_h5py
def test_imagenet_accepts_folder_and_ids(imagenet) -> None:
    path, _, _ = imagenet
    ds = ImageNetSegmentation(path.parent, word_of=_stub_word)
    assert ds.ids() == ["00000_n02105162", "00001_n01440764", "00002_n02105162"]


@needs_h5py
@pytest.mark.parametrize("words", ["short", "lemma"])
def test_imagenet_words_via_word_of(imagenet, words) -> None:
    calls = []

    def word_of(wnid: str, mode: str) -> str:
        calls.append((wnid, mode))
        return {"n02105162": "dog", "n01440764": "fish"}[wnid] + ("" if mode == "short" else "_lemma")

    ds = ImageNetSegmentation(imagenet[0], words=words, word_of=word_of)
    suffix = "" if words == "short" else "_lemma"
    assert [item.classes for item in ds] == [(f"dog{suffix}",), (f"fish{suffix}",), (f"dog{suffix}",)]
    assert calls == [("n02105162", words), ("n01440764", words)]  # cached per wnid


@needs_h5py
def test_imagenet_default_words_module(imagenet, monkeypatch) -> None:
    fake = types.ModuleType("conceptattention.data.imagenet_words")
    fake.imagenet_word = lambda wnid, mode="short": f"word-{mode}-{wnid}"
    monkeypatch.setitem(sys.modules, "conceptattention.data.imagenet_words", fake)
    assert ImageNetSegmentation(imagenet[0])[1].classes == ("word-short-n01440764",)


@needs_h5py
def test_imagenet_default_words_fall_back_to_wnid(imagenet, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "conceptattention.data.imagenet_words", None)  # import -> ImportError
    assert ImageNetSegmentation(imagenet[0])[1].classes == ("n01440764",)


@needs_h5py
def test_imagenet_pickle_reopens(imagenet) -> None:
    path, images, _ = imagenet
    ds = ImageNetSegmentation(path, word_of=_stub_word)
    ds[0]  # opens the HDF5 handle, which must not travel in the pickle
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone[2].image, images[2])
    assert clone.ids() == ds.ids()
    ds.close()
    np.testing.assert_array_equal(ds[1].image, images[1])  # reopens after close


@needs_h5py
@pytest.mark.parametrize("i", [3, -4, 100])
def test_imagenet_index_error(imagenet, i) -> None:
    with pytest.raises(IndexError):
        ImageNetSegmentation(imagenet[0], word_of=_stub_word)[i]


def test_imagenet_missing_file(tmp_path) -> None:
    with pytest.raises(DatasetError, match=r"gtsegs_ijcv\.mat not found at .*gtsegs_ijcv\.mat.*calvin-vision.*4,276"):
        ImageNetSegmentation(tmp_path / "gtsegs_ijcv.mat")
    with pytest.raises(DatasetError, match="not found"):
        ImageNetSegmentation(tmp_path)  # a folder without the file


@needs_h5py
def test_imagenet_not_hdf5(tmp_path) -> None:
    path = tmp_path / "gtsegs_ijcv.mat"
    path.write_bytes(b"MATLAB 5.0 MAT-file" + b"\0" * 200)  # an old-style (v5) .mat is not HDF5
    with pytest.raises(DatasetError, match=r"not the expected MATLAB v7\.3 file.*not an HDF5"):
        ImageNetSegmentation(path)


@needs_h5py
def test_imagenet_hdf5_without_value_img(tmp_path) -> None:
    import h5py

    path = tmp_path / "gtsegs_ijcv.mat"
    with h5py.File(path, "w") as f:
        f.create_dataset("other", data=np.zeros(3))
    with pytest.raises(DatasetError, match=r"not the expected MATLAB v7\.3 file.*value/img"):
        ImageNetSegmentation(path)


@needs_h5py
def test_imagenet_without_h5py(imagenet, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(DatasetError, match=r"pip install conceptattention\[eval\]"):
        ImageNetSegmentation(imagenet[0])


# ----------------------------------------------------------------------------------------------------
# PascalVOC
# ----------------------------------------------------------------------------------------------------

# id -> (height, width, label values left to right); 255 lines separate the stripes.
VOC_LAYOUT = {
    "2007_000001": (20, 30, [0, 15]),  # background + person: single-class
    "2007_000002": (30, 22, [0, 3, 15]),  # background + bird + person: multi only
    "2007_000003": (18, 26, [8]),  # cat + void only (no background): multi only
    "2007_000004": (24, 33, [1, 0]),  # plane + background: single-class
}


@pytest.fixture
def voc(tmp_path: Path) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    items = {}
    for k, (image_id, (h, w, values)) in enumerate(VOC_LAYOUT.items()):
        labels = stripe_labels(h, w, values)
        if values == [8]:
            labels[:, :2] = 255  # void along the left edge, as VOC marks boundaries
        items[image_id] = (fixture_image(h, w, seed=k), labels)
    write_voc(tmp_path, items)
    return tmp_path, items


def test_voc_multi_round_trip(voc) -> None:
    root, items = voc
    ds = VOCMultiClass(root)
    assert (len(ds), ds.name, ds.kind) == (4, "voc-multi", "multiclass")
    assert ds.class_names[0] == "background" and ds.class_names[1] == "plane" and len(ds.class_names) == 21
    for item, (image_id, (image, labels)) in zip(ds, items.items()):
        assert item.id == image_id
        assert item.image.shape == image.shape and item.image.dtype == np.uint8
        assert np.abs(item.image.astype(int) - image).max() <= 6  # JPEG
        np.testing.assert_array_equal(item.labels, labels)
        assert item.labels.dtype == np.int64
    assert ds[1].classes == ("bird", "person") and ds[1].class_ids == (3, 15)
    assert ds[2].classes == ("cat",) and ds[3].classes == ("plane",)


def test_voc_single_selects_background_plus_one_class(voc) -> None:
    root, items = voc
    ds = VOCSingleClass(root)
    assert (ds.name, ds.kind, ds.class_names) == ("voc-single", "binary", ("background", "foreground"))
    assert ds.ids() == ["2007_000001", "2007_000004"]
    person = ds[0]
    raw = items["2007_000001"][1]
    expected = np.where(raw == 255, 255, (raw == 15).astype(np.int64))
    np.testing.assert_array_equal(person.labels, expected)
    assert set(np.unique(person.labels)) == {0, 1, 255}
    assert (person.classes, person.class_ids) == (("person",), (1,))
    assert ds[1].classes == ("plane",)
    with pytest.raises(IndexError):
        ds[2]


@pytest.mark.parametrize("sub", ["", "VOCdevkit", "VOCdevkit/VOC2012"])
def test_voc_root_variants(voc, sub) -> None:
    root, _ = voc
    assert VOCMultiClass(root / sub).ids() == list(VOC_LAYOUT)


def test_voc_label_png_is_palette(voc) -> None:
    root, _ = voc
    with Image.open(root / "VOCdevkit/VOC2012/SegmentationClass/2007_000001.png") as im:
        assert im.mode == "P"
        assert im.getpalette()[15 * 3 : 15 * 3 + 3] == [192, 128, 128]  # person's colour


def test_voc_palette_known_colours() -> None:
    palette = voc_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    assert palette[:4].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    assert palette[20].tolist() == [0, 64, 128] and palette[255].tolist() == [224, 224, 192]


def test_voc_words() -> None:
    assert VOC_WORDS[1:4] == ("plane", "bike", "bird") and VOC_WORDS[11] == "table"
    assert (VOC_WORDS[14], VOC_WORDS[16], VOC_WORDS[20]) == ("motorcycle", "pot", "monitor")


def test_voc_pickle(voc) -> None:
    root, _ = voc
    ds = VOCSingleClass(root)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.ids() == ds.ids()
    assert clone[1].id == "2007_000004"


def test_voc_missing_split(tmp_path) -> None:
    with pytest.raises(DatasetError) as e:
        VOCMultiClass(tmp_path)
    message = str(e.value)
    expected = str(tmp_path / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt")
    for phrase in (expected, "VOCtrainval_11-May-2012.tar", "1,449 ids", "host.robots.ox.ac.uk"):
        assert phrase in message


def test_voc_missing_image_and_label(voc) -> None:
    root, _ = voc
    voc2012 = root / "VOCdevkit" / "VOC2012"
    (voc2012 / "JPEGImages" / "2007_000002.jpg").unlink()
    (voc2012 / "SegmentationClass" / "2007_000004.png").unlink()
    ds = VOCMultiClass(root)
    ds[0]  # other items still read
    with pytest.raises(DatasetError, match=r"JPEGImages/2007_000002\.jpg not found"):
        ds[1]
    with pytest.raises(DatasetError, match=r"SegmentationClass/2007_000004\.png not found"):
        ds[3]
    with pytest.raises(DatasetError, match=r"2007_000004\.png not found"):
        VOCSingleClass(root).ids()  # the selection reads every label


def test_voc_split_listing_unknown_id(voc) -> None:
    root, items = voc
    write_voc(root, {}, split_ids=[*items, "2099_999999"])
    with pytest.raises(DatasetError, match="2099_999999"):
        VOCMultiClass(root)[4]


# ----------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------


@needs_h5py
def test_open_dataset(imagenet, voc, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "conceptattention.data.imagenet_words", None)
    assert isinstance(open_dataset("imagenet-seg", imagenet[0]), ImageNetSegmentation)
    assert isinstance(open_dataset("voc-single", voc[0]), VOCSingleClass)
    assert isinstance(open_dataset("voc-multi", voc[0]), VOCMultiClass)
    assert {"imagenet-seg", "voc-single", "voc-multi"} <= set(DATASETS)


def test_open_dataset_unknown_name(tmp_path) -> None:
    with pytest.raises(DatasetError, match=r"unknown dataset 'coco'.*imagenet-seg.*voc-multi.*voc-single"):
        open_dataset("coco", tmp_path)
    assert issubclass(DatasetError, ValueError)


def test_truncated_voc_image_is_named_and_unknown_wordnet_id_is_a_dataset_error(tmp_path):
    from conceptattention.eval.datasets import DatasetError, ImageNetSegmentation, VOCSingleClass
    from conceptattention.eval.fixtures import write_imagenet_seg_mat, write_voc

    labels = np.zeros((20, 24), np.uint8)
    labels[5:15, 6:18] = 12
    write_voc(tmp_path / "voc", {"2007_000001": (np.zeros((20, 24, 3), np.uint8), labels)})
    jpeg = next((tmp_path / "voc").rglob("2007_000001.jpg"))
    jpeg.write_bytes(jpeg.read_bytes()[:40])  # truncated by a broken download
    dataset = VOCSingleClass(tmp_path / "voc")
    with pytest.raises(DatasetError, match=r"2007_000001\.jpg: cannot read this image"):
        dataset[0]
    mat = tmp_path / "gtsegs_ijcv.mat"
    write_imagenet_seg_mat(mat, [np.zeros((8, 8, 3), np.uint8)], [np.ones((8, 8), np.uint8)], ["n99999999"])
    with pytest.raises(DatasetError, match=r"image class 'n99999999' is not an ImageNet WordNet id"):
        ImageNetSegmentation(mat)[0]


def test_confusion_matrix_rejects_class_ids_out_of_range():
    import torch

    from conceptattention.core import confusion_matrix

    with pytest.raises(ValueError, match=r"`pred` holds class ids outside \[0, 2\) \(min 0, max 2\)"):
        confusion_matrix(torch.tensor([0, 2]), torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match=r"`target` holds class ids outside \[0, 2\)"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([-1, 1]), 2)
    ignored = confusion_matrix(torch.tensor([0, 1]), torch.tensor([255, 1]), 2, ignore_index=255)
    assert ignored.tolist() == [[0, 0], [0, 1]]
