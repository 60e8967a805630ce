"""Video maps and video files: temporal rules, per-frame views, save/load, reading and writing videos."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conceptattention import ConceptAttentionError, ConceptMaps, videos, viz
from conceptattention.core import temporal_index, temporal_resample, upsample
from conceptattention.videos import load_video, resize_frames, to_model_video, write_video

COLOURS = [(230, 20, 20), (20, 200, 40), (30, 40, 220), (240, 240, 30), (200, 30, 200)]
H264_TOLERANCE = 12  # per channel, for flat colours through lossy H.264 (CRF 10) and yuv420p


def _colour_frames(size=(32, 48), count=4):
    """Flat distinct colours; the last frame is a white left half, black right half."""
    height, width = size
    frames = [np.full((height, width, 3), COLOURS[j % len(COLOURS)], np.uint8) for j in range(count - 1)]
    pattern = np.zeros((height, width, 3), np.uint8)
    pattern[:, : width // 2] = 255
    return [*frames, pattern]


needs_mp4 = pytest.mark.skipif(not videos.mp4_writer_available(), reason='needs "conceptattention[video]"')


@pytest.fixture
def no_mp4(monkeypatch):
    monkeypatch.setattr(videos, "mp4_writer_available", lambda: False)
    monkeypatch.setattr(videos, "_fallback_warned", False)


# --- writing and reading video files ---------------------------------------------------------------


@needs_mp4
def test_mp4_round_trip(tmp_path):
    frames = _colour_frames()
    path = write_video(tmp_path / "clip.mp4", (f for f in frames), fps=5)  # a generator is enough
    assert path == tmp_path / "clip.mp4" and path.is_file()
    back = load_video(path)
    assert len(back) == 4 and back[0].size == (48, 32)
    for j in range(3):
        got = np.asarray(back[j], int)[8:24, 8:40].reshape(-1, 3)
        assert np.abs(got - COLOURS[j]).max() <= H264_TOLERANCE, j
    last = np.asarray(back[3], int)
    assert last[:, :20].min() >= 255 - H264_TOLERANCE and last[:, 28:].max() <= H264_TOLERANCE


@needs_mp4
def test_mp4_odd_sides_are_padded_by_one_replicated_pixel(tmp_path):
    frame = np.zeros((15, 21, 3), np.uint8)
    frame[:, -1] = 255  # a white last column, a black last row but for that column
    back = load_video(write_video(tmp_path / "odd.mp4", [frame, frame], fps=2))
    assert len(back) == 2 and back[0].size == (22, 16)
    pixels = np.asarray(back[0], int)
    assert pixels[4:12, -2:].min() >= 255 - 2 * H264_TOLERANCE  # the padding column repeats the white one
    assert pixels[-1, :16].max() <= 2 * H264_TOLERANCE  # the padding row repeats the black one


def test_gif_fallback_when_no_mp4_writer(tmp_path, no_mp4, caplog):
    frames = _colour_frames()
    with caplog.at_level(logging.WARNING, logger="conceptattention.videos"):
        path = write_video(tmp_path / "clip.mp4", frames, fps=5)
        again = write_video(tmp_path / "other.mp4", frames, fps=5)
    assert path == tmp_path / "clip.gif" and again == tmp_path / "other.gif"
    assert not (tmp_path / "clip.mp4").exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and 'pip install "conceptattention[video]"' in warnings[0]  # once
    with Image.open(path) as gif:
        assert gif.info["duration"] == 200  # 5 fps
    back = load_video(path)
    assert len(back) == 4 and back[0].size == (48, 32)
    for j in range(3):
        assert np.abs(np.asarray(back[j], int)[10, 10] - COLOURS[j]).max() <= 4, j  # palette rounding only
    assert np.asarray(back[3])[0, 0].tolist() == [255, 255, 255] and np.asarray(back[3])[0, -1].tolist() == [0, 0, 0]


@needs_mp4
def test_gif_fallback_when_ffmpeg_fails(tmp_path, monkeypatch, caplog):
    options = videos._mp4_options
    monkeypatch.setattr(videos, "_mp4_options", lambda fps: {**options(fps), "codec": "no_such_codec"})
    assert videos.mp4_writer_available.__wrapped__() is False  # the one-time probe sees a broken encoder
    monkeypatch.setattr(videos, "mp4_writer_available", lambda: True)  # suppose the probe had passed
    monkeypatch.setattr(videos, "_fallback_warned", False)
    with caplog.at_level(logging.WARNING, logger="conceptattention.videos"):
        path = write_video(tmp_path / "clip.mp4", _colour_frames(), fps=5)  # a list can be replayed as a GIF
    assert path == tmp_path / "clip.gif" and not (tmp_path / "clip.mp4").exists() and len(load_video(path)) == 4
    assert "ffmpeg failed: ffmpeg wrote no file" in caplog.text and "conceptattention[video]" in caplog.text
    with pytest.raises(ConceptAttentionError, match=r"writing .*gen\.mp4 failed \(ffmpeg wrote no file\)"):
        write_video(tmp_path / "gen.mp4", (f for f in _colour_frames()), fps=5)  # a generator cannot be replayed
    assert not list(tmp_path.glob("gen.*"))


def test_write_video_errors(tmp_path):
    with pytest.raises(ConceptAttentionError, match="no frames to write"):
        write_video(tmp_path / "a.gif", [], fps=5)
    with pytest.raises(ConceptAttentionError, match="fps must be a positive number"):
        write_video(tmp_path / "a.gif", _colour_frames(), fps=0)
    mixed = [np.zeros((4, 6, 3), np.uint8), np.zeros((4, 8, 3), np.uint8)]
    with pytest.raises(ConceptAttentionError, match=r"frame 1 .* is 8x4, frame 0 6x4"):
        write_video(tmp_path / "a.gif", mixed, fps=5)
    assert not (tmp_path / "a.gif").exists()


# --- reading user videos -------------------------------------------------------------------------


def test_load_video_inputs_agree():
    frames = np.stack(_colour_frames((6, 8), 3))  # (F, H, W, 3) uint8
    expected = [f.tolist() for f in frames]
    for source in (
        frames,
        torch.from_numpy(frames).permute(0, 3, 1, 2),  # (F, 3, H, W)
        frames.astype(np.float32) / 255,
        list(frames),
        [Image.fromarray(f) for f in frames],
    ):
        got = load_video(source)
        assert [np.asarray(f).tolist() for f in got] == expected


def test_load_video_errors(tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video" * 50)
    (tmp_path / "broken.gif").write_bytes(b"GIF89a" + b"\0" * 5)
    Image.new("RGB", (4, 4)).save(tmp_path / "still.png")
    cases = [
        (tmp_path / "missing.mp4", r"file '.*missing\.mp4' does not exist"),
        (broken, r"cannot read '.*broken\.mp4' as a video .*pass an MP4, WebM, AVI, MOV or GIF file"),
        (tmp_path / "broken.gif", r"cannot read '.*broken\.gif' as a video"),
        (tmp_path / "still.png", r"is a single image \(the \.png file .*\), not a video; pass a video file"),
        ([], "has no frames; give at least one frame"),
        ([np.zeros((4, 8, 3), np.uint8), np.zeros((6, 8, 3), np.uint8)], "frame 1 is 8x6 but frame 0 is 8x4"),
        (np.zeros((4, 8, 3), np.uint8), r"single image \(an array of shape \(4, 8, 3\)\).*`\[image\]`"),
        (Image.new("RGB", (8, 4)), r"single image \(a PIL image of 8x4\)"),
        (np.zeros((2, 3, 4, 8, 3), np.uint8), r"a batch of videos\? pass one video at a time"),
        (np.zeros((3, 5, 4, 8), np.uint8), r"shape \(3, 5, 4, 8\); expected \(frames, height, width, 3\)"),
        (np.full((2, 4, 4, 3), 2.0, np.float32), r"`video` frame 0 is a float array with values outside \[0, 1\]"),
        (3.0, "must be a video file path, a list of frames"),
    ]
    for source, message in cases:
        with pytest.raises(ConceptAttentionError, match=message):
            load_video(source)


def test_resize_frames_and_model_video():
    frames = [Image.new("RGB", (10, 20), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    resized = resize_frames(frames, (8, 4))
    assert [f.size for f in resized] == [(4, 8), (4, 8)]
    x = to_model_video([resized])
    assert x.shape == (1, 3, 2, 8, 4) and x.dtype == torch.float32
    torch.testing.assert_close(x[0, :, 0, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    torch.testing.assert_close(x[0, :, 1, 3, 2], torch.tensor([-1.0, -1.0, 1.0]))
    with pytest.raises(ConceptAttentionError, match=r"one frame count and one frame size, got counts \[1, 2\]"):
        to_model_video([resized, resized[:1]])


def test_importing_the_package_never_imports_imageio():
    code = "import sys, conceptattention, conceptattention.videos; print('imageio' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# --- temporal rules ------------------------------------------------------------------------------


def test_nearest_temporal_rule_causal_grouping_and_proportional():
    index = temporal_index(13, 49).tolist()  # CogVideoX: 49 frames, 13 latent frames, 4 frames per latent frame
    assert len(index) == 49 and index[0] == 0
    assert index[1:5] == [1, 1, 1, 1] and index[5:9] == [2, 2, 2, 2] and index[45:49] == [12, 12, 12, 12]
    assert temporal_index(11, 81).tolist()[:10] == [0] + [1] * 8 + [2]  # two latent frames per token frame
    assert temporal_index(2, 5).tolist() == [0, 1, 1, 1, 1]
    assert temporal_index(4, 8).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # 7 is no multiple of 3: j * 3 / 7 rounded
    assert temporal_index(4, 3).tolist() == [0, 2, 3]  # 1.5 rounds up
    assert temporal_index(1, 4).tolist() == [0, 0, 0, 0] and temporal_index(5, 5).tolist() == [0, 1, 2, 3, 4]


def test_linear_temporal_rule():
    maps = torch.tensor([0.0, 10.0, 20.0]).view(1, 1, 3, 1, 1)
    torch.testing.assert_close(temporal_resample(maps, 5, "linear").flatten(), torch.tensor([0.0, 5, 10, 15, 20]))
    torch.testing.assert_close(
        temporal_resample(maps, 4, "linear").flatten(), torch.tensor([0.0, 20 / 3, 40 / 3, 20.0])
    )
    torch.testing.assert_close(temporal_resample(maps, 5, "linear", frames=[3]).flatten(), torch.tensor([15.0]))
    torch.testing.assert_close(temporal_resample(maps, 5, "nearest").flatten(), torch.tensor([0.0, 10, 10, 20, 20]))
    with pytest.raises(ValueError, match="'nearest' or 'linear'"):
        temporal_resample(maps, 5, "cubic")  # type: ignore[arg-type]


def test_video_upsampled_is_per_frame_bilinear_then_temporal():
    maps = torch.rand(2, 3, 4, 2, 3, generator=torch.Generator().manual_seed(0))
    video = ConceptMaps(maps, ("a", "b", "c"), (8, 12), num_frames=10)
    assert video.is_video and video.grid == (4, 2, 3) and video.frame_count == 10
    up = video.upsampled()
    assert up.shape == (2, 3, 10, 8, 12)
    for j, k in enumerate(temporal_index(4, 10).tolist()):  # 9 = 3 * 3: causal groups of 3
        torch.testing.assert_close(up[:, :, j], upsample(maps[:, :, k], (8, 12)), rtol=0, atol=1e-6)
    linear = video.upsampled((4, 6), frames=7, temporal="linear")  # 7 frames: token frame t at frame 2t
    assert linear.shape == (2, 3, 7, 4, 6)
    torch.testing.assert_close(linear[:, :, 1], (upsample(maps[:, :, 0], (4, 6)) + upsample(maps[:, :, 1], (4, 6))) / 2)
    torch.testing.assert_close(linear[:, :, 6], upsample(maps[:, :, 3], (4, 6)))
    assert ConceptMaps(maps, ("a", "b", "c"), (8, 12)).frame_count == 4  # no num_frames: one per token frame
    image = ConceptMaps(maps[:, :, 0], ("a", "b", "c"), (8, 12))
    assert not image.is_video and image.grid == (2, 3)
    with pytest.raises(ConceptAttentionError, match="`frames` is for video maps"):
        image.upsampled(frames=3)


def _two_frame_maps():
    """B=1, C=2 ("dog", "sky"), F=2 token frames of 2x2, 3 decoded frames (frame 0 <- token 0; 1, 2 <- token 1)."""
    dog = torch.tensor([[[0.9, 0.1], [0.9, 0.1]], [[0.02, 0.04], [0.02, 0.04]]])  # left, then faintly right
    maps = torch.stack([dog, 1 - dog])[None]  # (1, 2, 2, 2, 2)
    return ConceptMaps(maps, ("dog", "sky"), (2, 2), num_frames=3, metadata={"normalization": "softmax"})


def test_segmentation_and_mask_per_frame():
    video = _two_frame_maps()
    seg = video.segmentation()
    assert seg.shape == (1, 3, 2, 2)
    assert seg[0, 0].tolist() == [[0, 1], [0, 1]] and seg[0, 1].tolist() == seg[0, 2].tolist() == [[1, 1], [1, 1]]
    mask = video.mask("dog")
    assert mask.shape == (1, 3, 2, 2)
    assert mask[0, 0].tolist() == [[True, False], [True, False]]
    # each frame against its own mean (0.03): the faint right column is the dog there (a whole-video mean would
    # leave these frames empty)
    assert mask[0, 1].tolist() == mask[0, 2].tolist() == [[False, True], [False, True]]
    assert torch.equal(video.mask(1)[0, 0], ~mask[0, 0])
    assert video.mask("dog", frames=2, temporal="linear").shape == (1, 2, 2, 2)


def test_per_frame_heatmaps_and_frame_errors():
    video = _two_frame_maps()
    heat = video.heatmaps(0, frame=0)
    assert list(heat) == ["dog", "sky"] and heat["dog"].size == (256, 256)
    left, right = np.asarray(heat["dog"], int)[128, 0], np.asarray(heat["dog"], int)[128, 255]
    assert left.sum() > right.sum()
    streamed = list(video.heatmap_frames("dog"))
    assert len(streamed) == 3
    for j in range(3):
        assert np.array_equal(np.asarray(streamed[j]), np.asarray(video.heatmaps(0, frame=j)["dog"]))
    with pytest.raises(ConceptAttentionError, match=r"video maps \(3 frames\): pass `frame=` \(0-2\)"):
        video.heatmaps(0)
    with pytest.raises(ConceptAttentionError, match=r"frame 3 is out of range: the video has 3 frames"):
        video.heatmaps(0, frame=3)
    with pytest.raises(ConceptAttentionError, match="carry no video frames"):
        video.overlay_frames("dog")
    image = ConceptMaps(torch.rand(1, 2, 2, 2), ("dog", "sky"), (4, 4))
    with pytest.raises(ConceptAttentionError, match="`frame` is for video maps"):
        image.heatmaps(0, frame=0)
    with pytest.raises(ConceptAttentionError, match="have no frames"):
        _ = image.frame_count


def test_unnormalised_video_heatmaps_share_one_scale_over_time():
    maps = torch.tensor([1.0, 3.0]).view(1, 1, 2, 1, 1).expand(1, 1, 2, 2, 2).clone()  # flat frames of 1 then 3
    video = ConceptMaps(maps, ("dog",), (2, 2), metadata={"normalization": "none"})
    first, last = (np.asarray(video.heatmaps(0, frame=j)["dog"], int) for j in (0, 1))
    assert first.sum() < last.sum()  # per-frame scaling would make both the same colour


# --- saving and loading video results --------------------------------------------------------------


def _video_maps(batch=1):
    """B videos, C=2, F=3 token frames of 2x3, 5 decoded frames of 16x24, frames attached."""
    maps = torch.zeros(batch, 2, 3, 2, 3)
    maps[:, 0, :, :, 0] = 1.0  # dog on the left column
    maps[:, 1, :, :, 1:] = 1.0  # sky elsewhere
    maps[:, 0, 2], maps[:, 1, 2] = maps[:, 1, 2].clone(), maps[:, 0, 2].clone()  # swapped in the last token frame
    frames = [[Image.new("RGB", (24, 16), COLOURS[j]) for j in range(5)] for _ in range(batch)]
    return ConceptMaps(
        maps, ("dog", "sky"), (16, 24), images=frames, metadata={"normalization": "softmax"}, num_frames=5, fps=4.0
    )


@needs_mp4
def test_save_video_files_and_load_round_trip(tmp_path):
    video = _video_maps()
    out = tmp_path / "out"
    written = video.save(out)
    names = {p.name for p in written}
    expected = {"overlay_00_dog.mp4", "overlay_01_sky.mp4", "overlay_grid.mp4", "segmentation.mp4", "video.mp4"}
    assert names == expected | {"maps.npz", "metadata.json"} == {p.name for p in out.iterdir()}
    overlay = load_video(out / "overlay_00_dog.mp4")
    assert len(overlay) == 5 and overlay[0].size == (384, 256)  # display size: 16 x 24 enlarged 16 times
    for j in (0, 4):
        want = np.asarray(video.overlays(0, frame=j)["dog"], float)
        assert np.abs(np.asarray(overlay[j], float) - want).mean() < 4, j
    grid = load_video(out / "overlay_grid.mp4")
    assert len(grid) == 5 and grid[0].size == (3 * 384, 256 + 14)  # video, dog, sky
    tile = np.asarray(grid[2], int)[14 + 20 : 14 + 236, 20:364].reshape(-1, 3)
    assert np.abs(tile - COLOURS[2]).max() <= H264_TOLERANCE  # the input video is the first tile
    original = load_video(out / "video.mp4")
    assert len(original) == 5 and original[0].size == (24, 16)
    assert np.abs(np.asarray(original[3], int)[4:12, 4:20] - COLOURS[3]).max() <= H264_TOLERANCE
    record = json.loads((out / "metadata.json").read_text())
    assert record["num_frames"] == 5 and record["fps"] == 4.0 and record["image_size"] == [16, 24]
    assert record["files"] == [p.relative_to(out).as_posix() for p in written]
    back = ConceptMaps.load(out)
    assert torch.equal(back.maps, video.maps) and back.num_frames == 5 and back.fps == 4.0 and back.is_video
    assert back.grid == (3, 2, 3) and back.segmentation().shape == (1, 5, 16, 24)


def test_save_frames_pngs_and_overwrite_removes_exactly_the_old_video_result(tmp_path, no_mp4):
    video = _video_maps(batch=2)
    out = tmp_path / "out"
    written = video.save(out, frames=True)
    files = {p.relative_to(out).as_posix() for p in written}
    assert "b1_overlay_01_sky.gif" in files and "b0_video.gif" in files and "b1_overlay_grid.gif" in files
    folders = {p.parent.name for p in written if p.suffix == ".png"}
    assert folders == {f"b{b}_{n}" for b in (0, 1) for n in ("overlay_00_dog", "overlay_01_sky", "overlay_grid")} | {
        f"b{b}_{n}" for b in (0, 1) for n in ("segmentation", "video")
    }
    pngs = sorted((out / "frames" / "b1_overlay_00_dog").iterdir())
    assert [p.name for p in pngs] == [f"{j:04d}.png" for j in range(5)]
    for j, png in enumerate(pngs):  # lossless: exactly the overlay of that frame
        assert np.array_equal(np.asarray(Image.open(png)), np.asarray(video.overlays(1, frame=j)["dog"]))
    seg = np.asarray(Image.open(out / "frames" / "b0_segmentation" / "0004.png"))
    assert seg.shape[:2] == (256, 384 + 12 + 7 * 3 + 10)  # segmentation at display size, legend strip on the right
    dog, sky = viz.palette(2)
    first = np.asarray(Image.open(out / "frames" / "b0_segmentation" / "0000.png"))
    assert first[128, 10].tolist() == list(dog) and first[128, 300].tolist() == list(sky)
    assert seg[128, 10].tolist() == list(sky) and seg[128, 300].tolist() == list(dog)  # swapped in the last token frame
    assert len(load_video(out / "b0_overlay_00_dog.gif")) == 5
    assert len(load_video(out / "b0_video.gif")) == 5 and load_video(out / "b0_video.gif")[0].size == (24, 16)

    (out / "notes.txt").write_text("the user's own file")
    (out / "frames" / "mine.txt").write_text("also the user's")
    with pytest.raises(ConceptAttentionError, match="already holds a saved result"):
        video.save(out)
    image = ConceptMaps(torch.rand(1, 2, 4, 4), ("cat", "grass"), (16, 16))
    new = image.save(out, overwrite=True)
    left = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert left == {p.name for p in new} | {"notes.txt", "frames/mine.txt"}
    assert sorted(p.name for p in (out / "frames").iterdir()) == ["mine.txt"]  # emptied frame folders removed


def test_overwrite_without_a_file_list_removes_only_video_result_names(tmp_path, no_mp4):
    out = tmp_path / "out"
    _video_maps().save(out, frames=True)
    (out / "metadata.json").write_text("not json")
    (out / "my_video.mp4").write_bytes(b"keep")
    (out / "frames" / "b0_overlay_00_dog").mkdir()
    (out / "frames" / "b0_overlay_00_dog" / "keep.txt").write_text("keep")
    new = ConceptMaps(torch.rand(1, 1, 2, 2), ("cat",), (8, 8)).save(out, overwrite=True)
    left = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert left == {p.name for p in new} | {"my_video.mp4", "frames/b0_overlay_00_dog/keep.txt"}


def test_overwrite_never_follows_listed_paths_outside_the_folder(tmp_path):
    out = tmp_path / "out"
    ConceptMaps(torch.rand(1, 1, 2, 2), ("cat",), (8, 8)).save(out)
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    record = json.loads((out / "metadata.json").read_text())
    record["files"] += ["../outside.txt", str(outside), "frames/../../outside.txt"]
    (out / "metadata.json").write_text(json.dumps(record))
    ConceptMaps(torch.rand(1, 1, 2, 2), ("dog",), (8, 8)).save(out, overwrite=True)
    assert outside.read_text() == "keep"
