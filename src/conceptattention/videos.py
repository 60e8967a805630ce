"""Reading user videos into lists of RGB PIL frames, and writing video files, with clear errors.

MP4 (and WebM, AVI, MOV) files go through imageio's ffmpeg plugin, from the optional extra
``pip install "conceptattention[video]"`` (its imageio-ffmpeg wheel bundles an ffmpeg binary);
GIF and animated WebP go through Pillow and need nothing more. imageio is imported inside the
functions that use it, so importing the package never needs it.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageSequence, UnidentifiedImageError

from conceptattention.errors import ConceptAttentionError
from conceptattention.images import ImageInput, load_image, resize_for_model

logger = logging.getLogger(__name__)

VideoInput = str | Path | Sequence[ImageInput] | np.ndarray | torch.Tensor | Image.Image
INSTALL_HINT = 'pip install "conceptattention[video]"'
PILLOW_SUFFIXES = frozenset({".gif", ".webp", ".apng"})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
MP4_QUALITY = 8  # imageio's 0-10 scale; for libx264 this is CRF 10, visually lossless
_fallback_warned = False


def _single_image_error(what: str, got: str) -> ConceptAttentionError:
    return ConceptAttentionError(
        f"{what} is a single image ({got}), not a video; pass a video file, a list of frames or a "
        "(frames, height, width, 3) array (one image as a one-frame video: `[image]`)"
    )


def load_video(video: VideoInput, what: str = "`video`") -> list[Image.Image]:
    """One video as a list of RGB PIL frames of one size.

    Args:
        video: a file path (MP4, WebM, AVI, MOV through imageio's ffmpeg plugin; GIF and animated
            WebP through Pillow), an animated PIL image, a list of frames (each anything
            :func:`conceptattention.images.load_image` accepts), or a numpy array / tensor
            (frames, height, width, 3) or (frames, 3, height, width), uint8 in [0, 255] or float in [0, 1].
        what: how error messages name the argument.

    Raises:
        ConceptAttentionError: missing or unreadable file, no frames, frames of different sizes,
            a single image, an unsupported shape, dtype or range.
    """
    if isinstance(video, (str, Path)):
        frames = _read_file(Path(video), what)
    elif isinstance(video, Image.Image):
        if getattr(video, "n_frames", 1) <= 1:
            raise _single_image_error(what, f"a PIL image of {video.width}x{video.height}")
        frames = [
            load_image(frame.copy(), f"{what} frame {i}") for i, frame in enumerate(ImageSequence.Iterator(video))
        ]
    elif isinstance(video, (np.ndarray, torch.Tensor)):
        frames = _from_array(video.detach().cpu().numpy() if isinstance(video, torch.Tensor) else video, what)
    elif isinstance(video, (list, tuple)):
        frames = [load_image(frame, f"{what}[{i}]") for i, frame in enumerate(video)]
    else:
        raise ConceptAttentionError(
            f"{what} must be a video file path, a list of frames, a numpy array or a tensor, got {type(video).__name__}"
        )
    if not frames:
        raise ConceptAttentionError(f"{what} has no frames; give at least one frame")
    for i, frame in enumerate(frames):
        if frame.size != frames[0].size:
            raise ConceptAttentionError(
                f"{what}: frame {i} is {frame.width}x{frame.height} but frame 0 is {frames[0].width}x"
                f"{frames[0].height}; all frames must have one size (resize them first, e.g. with "
                "`conceptattention.videos.resize_frames`)"
            )
    return frames


def _from_array(array: np.ndarray, what: str) -> list[Image.Image]:
    if array.ndim in (2, 3):
        raise _single_image_error(what, f"an array of shape {tuple(array.shape)}")
    if array.ndim != 4 or not (array.shape[-1] in (1, 3, 4) or array.shape[1] in (1, 3, 4)):
        batch = " (a batch of videos? pass one video at a time)" if array.ndim == 5 else ""
        raise ConceptAttentionError(
            f"{what} has shape {tuple(array.shape)}{batch}; expected (frames, height, width, 3) or "
            "(frames, 3, height, width)"
        )
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise ConceptAttentionError(f"{what} has dtype {array.dtype}; pass uint8 in [0, 255] or float in [0, 1]")
    return [load_image(frame, f"{what} frame {i}") for i, frame in enumerate(array)]


def _read_file(path: Path, what: str) -> list[Image.Image]:
    if not path.is_file():
        raise ConceptAttentionError(f"{what}: file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        raise _single_image_error(what, f"the {suffix} file {str(path)!r}")
    if suffix in PILLOW_SUFFIXES:
        try:
            with Image.open(path) as opened:
                frames = [
                    load_image(frame.copy(), f"{what} frame {i}")
                    for i, frame in enumerate(ImageSequence.Iterator(opened))
                ]
        except (UnidentifiedImageError, OSError, EOFError) as error:
            raise ConceptAttentionError(f"{what}: cannot read {str(path)!r} as a video ({error})") from None
        return frames
    try:
        import imageio.v2 as imageio
    except ImportError:
        raise ConceptAttentionError(
            f"{what}: reading {suffix or 'this'} files needs imageio and its ffmpeg plugin: `{INSTALL_HINT}` "
            "(GIF and animated WebP need nothing more)"
        ) from None
    try:
        reader: Any = imageio.get_reader(str(path), format="FFMPEG")
        try:
            return [Image.fromarray(np.asarray(frame, dtype=np.uint8)).convert("RGB") for frame in reader]
        finally:
            reader.close()
    except ConceptAttentionError:
        raise
    except Exception as error:  # imageio/ffmpeg raise OSError, RuntimeError, ... for broken files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConceptAttentionError(
            f"{what}: cannot read {str(path)!r} as a video ({reason}); pass an MP4, WebM, AVI, MOV or GIF file "
            "that a video player opens, or a list of frames"
        ) from None


def resize_frames(frames: Sequence[Image.Image], size: tuple[int, int]) -> list[Image.Image]:
    """Every frame resized to ``size = (height, width)`` with Lanczos (as ``images.resize_for_model``)."""
    return [resize_for_model(frame, size) for frame in frames]


def to_model_video(videos: Sequence[Sequence[Image.Image]]) -> torch.Tensor:
    """B videos of RGB PIL frames (one frame count, one size) -> (B, 3, F, height, width) float32 in [-1, 1].

    The video twin of ``images.to_model_input``.
    """
    if not videos or any(len(video) == 0 for video in videos):
        raise ConceptAttentionError("to_model_video needs at least one video of at least one frame")
    counts = {len(video) for video in videos}
    sizes = {frame.size for video in videos for frame in video}
    if len(counts) > 1 or len(sizes) > 1:
        raise ConceptAttentionError(
            f"videos must share one frame count and one frame size, got counts {sorted(counts)} and sizes "
            f"{sorted(sizes)}; resample or resize them first"
        )
    arrays = np.stack([np.stack([np.asarray(frame.convert("RGB"), dtype=np.float32) for frame in v]) for v in videos])
    return torch.from_numpy(arrays).permute(0, 4, 1, 2, 3) / 127.5 - 1.0  # (B, F, H, W, 3) -> (B, 3, F, H, W)


@functools.lru_cache(maxsize=1)
def mp4_writer_available() -> bool:
    """Whether MP4 files can be written: imageio's ffmpeg plugin is installed and encodes H.264.

    Checked once per process by writing a two-frame 16x16 MP4 to a temporary folder.
    """
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        return False
    try:
        with tempfile.TemporaryDirectory() as folder:
            probe = Path(folder) / "probe.mp4"
            writer = imageio.get_writer(str(probe), **_mp4_options(8.0))
            for value in (0, 255):
                writer.append_data(np.full((16, 16, 3), value, np.uint8))
            writer.close()
            return probe.is_file() and probe.stat().st_size > 0
    except Exception as error:  # a broken ffmpeg binary, no libx264, no write access to the temp folder
        logger.debug("MP4 writer probe failed: %s", _first_line(error))
        return False


def _mp4_options(fps: float) -> dict[str, Any]:
    # macro_block_size=1: imageio would otherwise resize frames silently to multiples of 16.
    return {
        "format": "FFMPEG",
        "mode": "I",
        "fps": fps,
        "codec": "libx264",
        "pixelformat": "yuv420p",
        "quality": MP4_QUALITY,
        "macro_block_size": 1,
        "ffmpeg_log_level": "error",
    }


def _rgb_array(frame: Image.Image | np.ndarray) -> np.ndarray:
    array = np.asarray(frame.convert("RGB") if isinstance(frame, Image.Image) else frame)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise ConceptAttentionError(
            f"video frames to write must be PIL images or uint8 (height, width, 3) arrays, got {array.dtype} "
            f"{tuple(array.shape)}"
        )
    return array


def _even(array: np.ndarray) -> np.ndarray:
    """Pad an odd height or width by one replicated row / column (yuv420p needs even sides)."""
    height, width = array.shape[:2]
    if height % 2 == 0 and width % 2 == 0:
        return array
    return np.pad(array, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")


def write_video(path: str | Path, frames: Iterable[Image.Image | np.ndarray], fps: float) -> Path:
    """Write frames (PIL images or uint8 (height, width, 3) arrays, all one size) as a video file.

    ``.gif`` paths are written as GIFs with Pillow. Other paths (``.mp4``) are H.264 MP4 (libx264,
    yuv420p, CRF 10) through imageio's ffmpeg plugin; yuv420p needs even sides, so an odd height or
    width is padded by one replicated row or column (nothing is cropped or rescaled). Frames are
    consumed one at a time, so a generator keeps memory flat.

    When no MP4 writer is available (the ``video`` extra is not installed, or ffmpeg fails its
    one-time probe or on the first frame), the same name with ``.gif`` is written instead and a
    warning naming ``pip install "conceptattention[video]"`` is logged once. A list of frames also
    falls back when ffmpeg fails later; a generator cannot be replayed, so that is an error. GIFs
    hold at most 256 colours per frame, and Pillow merges identical consecutive frames into one
    (their durations add up).

    Returns:
        The path written (``.gif`` on the fallback).

    Raises:
        ConceptAttentionError: no frames, frames of different sizes, a bad fps, or a failure while writing.
    """
    path = Path(path)
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise ConceptAttentionError(f"fps must be a positive number, got {fps!r}")
    iterator = iter(frames)
    first = next(iterator, None)
    if first is None:
        raise ConceptAttentionError(f"no frames to write to {path}")
    if path.suffix.lower() == ".gif":
        return _write_gif(path, itertools.chain([first], iterator), fps)
    if not mp4_writer_available():
        reason = "imageio / imageio-ffmpeg is not installed or cannot encode H.264"
        replay: Iterator[Image.Image | np.ndarray] = itertools.chain([first], iterator)
    else:
        try:
            _write_mp4(path, first, iterator, fps)
            return path
        except _Mp4Failure as failure:
            reason = f"ffmpeg failed: {failure.reason}"
            if not failure.started:
                replay = itertools.chain([first], iterator)
            elif isinstance(frames, Sequence):
                replay = iter(frames)
            else:
                raise ConceptAttentionError(f"writing {path} failed ({failure.reason})") from None
    _warn_fallback(reason)
    return _write_gif(path.with_suffix(".gif"), replay, fps)


def _warn_fallback(reason: str) -> None:
    global _fallback_warned
    if not _fallback_warned:
        _fallback_warned = True
        logger.warning("writing GIF instead of MP4 video files (%s); for MP4: `%s`", reason, INSTALL_HINT)


class _Mp4Failure(Exception):
    """ffmpeg failed; ``started``: frames after the first were consumed (a generator cannot be replayed)."""

    def __init__(self, reason: str, started: bool) -> None:
        super().__init__(reason)
        self.reason, self.started = reason, started


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _write_mp4(
    path: Path, first: Image.Image | np.ndarray, rest: Iterator[Image.Image | np.ndarray], fps: float
) -> None:
    """Write the MP4, or raise :class:`_Mp4Failure` with no file left behind.

    imageio's writer does not always report a dead ffmpeg (small frames fit in the pipe, and
    ``close`` stays silent), so the file is checked once written.
    """
    import imageio.v2 as imageio

    array = _rgb_array(first)
    shape, consumed, writer = array.shape, 1, None
    try:
        writer = imageio.get_writer(str(path), **_mp4_options(float(fps)))
        writer.append_data(_even(array))
        for frame in rest:
            consumed += 1
            array = _rgb_array(frame)
            if array.shape != shape:
                raise ConceptAttentionError(
                    f"frame {consumed - 1} to write to {path} has shape {array.shape}, frame 0 {shape}; "
                    "all frames need one size"
                )
            writer.append_data(_even(array))
        writer.close()
    except ConceptAttentionError:
        _discard(writer, path)
        raise
    except Exception as error:  # imageio raises OSError, RuntimeError, StopIteration, ... when ffmpeg dies
        _discard(writer, path)
        raise _Mp4Failure(_first_line(error), consumed > 1) from None
    if not path.is_file() or path.stat().st_size == 0:
        path.unlink(missing_ok=True)
        raise _Mp4Failure("ffmpeg wrote no file", consumed > 1)


def _discard(writer: Any, path: Path) -> None:
    try:
        if writer is not None:
            writer.close()
    except Exception:  # closing a writer whose ffmpeg died raises again; the file goes either way
        pass
    path.unlink(missing_ok=True)


def _write_gif(path: Path, frames: Iterator[Image.Image | np.ndarray], fps: float) -> Path:
    images = (Image.fromarray(_rgb_array(frame)) for frame in frames)
    first = next(images)
    size = first.size

    def checked() -> Iterator[Image.Image]:
        for index, image in enumerate(images, start=1):
            if image.size != size:
                raise ConceptAttentionError(
                    f"frame {index} to write to {path} is {image.width}x{image.height}, frame 0 {size[0]}x{size[1]}; "
                    "all frames need one size"
                )
            yield image

    try:
        first.save(path, save_all=True, append_images=checked(), duration=round(1000 / fps), loop=0)
    except ConceptAttentionError:
        path.unlink(missing_ok=True)
        raise
    return path


FFMPEG_SUFFIXES = frozenset({".mp4", ".m4v", ".webm", ".avi", ".mov", ".mkv"})


def is_video_file(path: str | Path) -> bool:
    """Whether a file is a video: a video container suffix, or a GIF / WebP / APNG with more than one frame.

    Unknown suffixes count as images (the image reader then explains what it cannot read).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in FFMPEG_SUFFIXES:
        return True
    if suffix not in PILLOW_SUFFIXES or not path.is_file():
        return False
    try:
        with Image.open(path) as opened:
            return int(getattr(opened, "n_frames", 1)) > 1
    except (UnidentifiedImageError, OSError):
        return False
