"""ConceptMaps views and files; image loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conceptattention import ConceptAttentionError, ConceptMaps
from conceptattention.images import load_image, load_images, resize_for_model, to_model_input


def _maps(images=True):
    maps = torch.zeros(2, 2, 2, 2)
    maps[:, 0, 0, :] = 1.0  # concept 0 on the top row
    maps[:, 1, 1, :] = 1.0  # concept 1 on the bottom row
    imgs = [Image.new("RGB", (8, 4), (200, 10, 10)) for _ in range(2)] if images else None
    return ConceptMaps(maps, ("dog", "sky"), (4, 8), images=imgs, metadata={"normalization": "softmax", "t": 0.5})


def test_views_on_a_hand_made_map():
    m = _maps()
    assert m.grid == (2, 2)
    up = m.upsampled()
    assert up.shape == (2, 2, 4, 8)
    seg = m.segmentation()
    assert seg[0, 0].tolist() == [0] * 8 and seg[0, 3].tolist() == [1] * 8
    mask = m.mask("sky")
    assert mask[0, 3].all() and not mask[0, 0].any()
    assert torch.equal(m.mask(1), mask)
    with pytest.raises(ConceptAttentionError, match=r"Unknown concept 'cat'; the maps hold \['dog', 'sky'\]"):
        m.mask("cat")
    with pytest.raises(ConceptAttentionError, match=r"out of range: there are 2 concepts \(valid: 0-1\)"):
        m.mask(2)


def test_heatmaps_overlays_and_missing_images():
    m = _maps()
    assert m.display_size == (256, 512)  # 4 x 8 enlarged by 64 to reach 256 px
    heat = m.heatmaps(0)
    assert list(heat) == ["dog", "sky"] and heat["dog"].size == (512, 256)
    top, bottom = np.asarray(heat["dog"])[0, 0], np.asarray(heat["dog"])[255, 0]
    assert top.sum() > bottom.sum()  # hot where the map is 1
    over = m.overlays(0, alpha=0.5)["dog"]
    expected = (np.full((256, 512, 3), (200, 10, 10), float) + np.asarray(heat["dog"], float)) / 2
    assert np.abs(np.asarray(over, float) - expected).max() <= 1
    with pytest.raises(ConceptAttentionError, match="carry no images"):
        _maps(images=False).overlays(0)


def test_save_and_load_round_trip(tmp_path):
    m = _maps()
    written = m.save(tmp_path / "out")
    names = {p.name for p in written}
    assert {"maps.npz", "metadata.json", "overlay_grid.png", "b0_segmentation.png", "b1_image.png"} <= names
    assert "b1_heatmap_01_sky.png" in names
    assert all(p.is_file() for p in written)
    grid = Image.open(tmp_path / "out" / "overlay_grid.png")
    assert grid.size == (3 * 512, 2 * (256 + 14))
    assert Image.open(tmp_path / "out" / "b1_image.png").size == (8, 4)  # the image itself at its true size
    back = ConceptMaps.load(tmp_path / "out")
    assert torch.equal(back.maps, m.maps) and back.concepts == m.concepts and back.image_size == (4, 8)
    assert json.loads((tmp_path / "out" / "metadata.json").read_text())["t"] == 0.5
    with pytest.raises(ConceptAttentionError, match=r"maps\.npz not found"):
        ConceptMaps.load(tmp_path)


def test_image_inputs(tmp_path):
    arr = np.random.default_rng(0).integers(0, 255, (6, 5, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(arr).save(path)
    for source in (
        path,
        str(path),
        arr,
        torch.from_numpy(arr),
        torch.from_numpy(arr).permute(2, 0, 1),
        arr.astype(np.float32) / 255,
    ):
        assert np.array_equal(np.asarray(load_image(source)), arr)
    assert load_image(Image.fromarray(arr).convert("L")).mode == "RGB"
    rgba = Image.new("RGBA", (2, 2), (255, 0, 0, 0))
    assert np.asarray(load_image(rgba))[0, 0].tolist() == [255, 255, 255]  # transparent -> white
    assert len(load_images([arr, arr])) == 2 and len(load_images(np.stack([arr, arr]))) == 2
    with pytest.raises(ConceptAttentionError, match="empty list"):
        load_images([])
    with pytest.raises(ConceptAttentionError, match="must be a PIL image, a path"):
        load_image(3.0)


def test_resize_and_model_input():
    image = Image.new("RGB", (10, 20), (255, 0, 127))
    resized = resize_for_model(image, (8, 4))
    assert resized.size == (4, 8)
    x = to_model_input([resized])
    assert x.shape == (1, 3, 8, 4)
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([1.0, -1.0, 127 / 127.5 - 1]))


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :10] = 255  # a white band on the left of the stored pixels
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display", as phones write it
    path = tmp_path / "phone.jpg"
    image.save(path, exif=exif, quality=95)
    shown = np.asarray(load_image(path))
    assert shown.shape == (40, 20, 3)  # displayed portrait, as viewers show it
    assert shown[:10, :, 0].mean() > 200 and shown[-10:, :, 0].mean() < 50  # the band is now on top


def test_high_depth_and_other_modes_convert_to_the_right_rgb(tmp_path):
    ramp16 = np.linspace(0, 65535, 64).reshape(8, 8).astype(np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(ramp16).save(path)
    assert Image.open(path).mode == "I;16"
    got = np.asarray(load_image(path))[..., 0]
    np.testing.assert_array_equal(got, np.round(ramp16 / 65535 * 255).astype(np.uint8))  # not all white
    as_int32 = Image.fromarray(ramp16.astype(np.int32))  # mode I
    np.testing.assert_array_equal(np.asarray(load_image(as_int32))[..., 0], got)
    as_float = Image.fromarray((ramp16 / 65535).astype(np.float32))  # mode F in [0, 1]
    assert np.abs(np.asarray(load_image(as_float))[..., 0].astype(int) - got).max() <= 1
    rgb = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    assert np.abs(np.asarray(load_image(cmyk)).astype(int) - rgb).max() <= 1
    la = Image.fromarray(np.stack([np.full((8, 8), 40, np.uint8), np.zeros((8, 8), np.uint8)], -1), mode="LA")
    assert (np.asarray(load_image(la)) == 255).all()  # fully transparent -> the white background
    palette = Image.fromarray(rgb).convert("P")
    palette.info["transparency"] = 0
    assert load_image(palette).mode == "RGB"


def test_nan_and_infinite_arrays_are_errors():
    for bad in (np.full((4, 4, 3), np.nan, np.float32), np.full((4, 4, 3), np.inf, np.float32)):
        with pytest.raises(ConceptAttentionError, match="NaN or infinite"):
            load_image(bad)
    with pytest.raises(ConceptAttentionError, match="NaN or infinite"):
        load_image(Image.fromarray(np.full((4, 4), np.nan, np.float32)))


def test_save_never_mixes_two_results(tmp_path):
    lemon = ConceptMaps(torch.rand(1, 2, 4, 4), ("lemon", "grass"), (16, 16))
    sky = ConceptMaps(torch.rand(1, 2, 4, 4), ("sky", "grass"), (16, 16))
    out = tmp_path / "out"
    lemon.save(out)
    (out / "notes.txt").write_text("the user's own file")
    with pytest.raises(ConceptAttentionError, match=r"already holds a saved result .*overwrite=True.*--overwrite"):
        sky.save(out)
    assert (out / "heatmap_00_lemon.png").is_file()  # the refused save wrote nothing
    written = sky.save(out, overwrite=True)
    names = {p.name for p in out.iterdir()}
    assert "heatmap_00_lemon.png" not in names and "heatmap_00_sky.png" in names and "notes.txt" in names
    assert names - {"notes.txt"} == {p.name for p in written}
    assert json.loads((out / "metadata.json").read_text())["concepts"] == ["sky", "grass"]
