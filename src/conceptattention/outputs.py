"""``ConceptMaps``: the result object of every run, with its views and its files."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from conceptattention.core import Temporal, binary_mask, segment, temporal_resample, upsample
from conceptattention.errors import ConceptAttentionError


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that shape the result."""
    versions: dict[str, str | None] = {}
    for name in ("conceptattention", "torch", "diffusers", "transformers"):
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@dataclass(frozen=True)
class GenerateDetails:
    """What a traced pipeline call used (``mode="generate"``)."""

    steps: list[int]
    num_steps_run: int
    timesteps: list[float]
    prompt: str | list[str] | None = None
    seed: int | None = None
    call: dict[str, Any] = field(default_factory=dict)  # scalar pipeline arguments (height, steps, ...)

    mode = "generate"


@dataclass(frozen=True)
class EncodeDetails:
    """What an encode call used (``mode="encode"``)."""

    t: float
    num_samples: int
    seed: int | list[int]
    caption: str
    resolution: list[int]
    guidance_scale: float | None
    max_batch: int

    mode = "encode"


@dataclass(frozen=True)
class RunRecord:
    """Everything used to compute a set of maps; serialised to ``metadata.json``.

    Attributes:
        model: hub id or folder of the model (else the transformer class).
        architecture: the backend's ``spec.name``.
        concept_tokens: each concept's sub-tokens, as the tokenizer split it.
        concept_encoder: which prompt encoder encoded the concepts, in words.
        concept_positions: the position policy of concept tokens under the model's text RoPE.
        layers: the scored dual-stream blocks; single_layers: the scored single-stream blocks.
        blocks: every scored block labelled by kind (``"double 9"``, ``"single 0"``), in the order of ``block_maps``.
        num_double_blocks, num_single_blocks: the model's blocks of each kind (single: 0 where not traceable).
        excluded_blocks: dual-stream blocks that can never be scored, with why.
        grid: token grid (h, w) or (F, h, w).
        cfg: which forwards/batch rows the maps describe.
        details: mode-specific record (generate or encode).
    """

    model: str
    architecture: str
    transformer_class: str
    dtype: str
    concepts: list[str]
    concept_tokens: dict[str, list[str]]
    concept_encoder: str
    concept_positions: str
    layers: list[int]
    single_layers: list[int]
    blocks: list[str]
    num_double_blocks: int
    num_single_blocks: int
    excluded_blocks: dict[int, str]
    default_layers: str
    score_space: str
    concept_keys: str
    softmax: bool
    normalization: str
    pooling: str
    grid: list[int]
    cfg: str
    versions: dict[str, str | None]
    details: GenerateDetails | EncodeDetails

    def to_dict(self) -> dict[str, Any]:
        """The JSON view: common fields, ``mode``, then the mode's fields (pipeline arguments inlined)."""
        record = asdict(self)
        details = record.pop("details")
        call = details.pop("call", {})
        return {**record, "mode": self.details.mode, **details, **call}


RESULT_PATTERNS = ("*heatmap_*.png", "*segmentation.png", "*image.png", "overlay_grid.png", "maps.npz", "metadata.json")
# Files of a saved video result, matched only when its metadata.json no longer lists them.
VIDEO_RESULT = re.compile(
    r"(b\d+_)?(overlay_\d{2}_[A-Za-z0-9_-]+|heatmap_\d{2}_[A-Za-z0-9_-]+|overlay_grid|segmentation|video)\.(mp4|gif)"
)
FRAME_FOLDER = "frames"
FRAME_FILE = re.compile(r"\d{4,}\.png")


def _listed_paths(folder: Path, listed: Any) -> set[Path] | None:
    """The files a ``metadata.json`` lists: plain relative paths inside ``folder`` (None: no list)."""
    if not isinstance(listed, list):
        return None
    paths = set()
    for name in listed:
        if not isinstance(name, str) or not name or "\\" in name:
            continue
        relative = PurePosixPath(name)
        if relative.is_absolute() or any(part in ("", ".", "..") for part in relative.parts):
            continue
        paths.add(folder.joinpath(*relative.parts))
    return paths


def _video_result_files(folder: Path) -> set[Path]:
    """Video files and frame PNGs named as :meth:`ConceptMaps.save` names them (used without a file list)."""
    found = {p for p in folder.iterdir() if VIDEO_RESULT.fullmatch(p.name)}
    frames = folder / FRAME_FOLDER
    if frames.is_dir():
        for sub in frames.iterdir():
            if sub.is_dir() and VIDEO_RESULT.fullmatch(sub.name + ".mp4"):
                found |= {p for p in sub.iterdir() if FRAME_FILE.fullmatch(p.name)}
    return found


def clear_result_folder(folder: Path, overwrite: bool) -> None:
    """Refuse a folder holding a saved result, or (``overwrite``) remove that result's files.

    The files removed are those its ``metadata.json`` lists (frame PNGs in subfolders included;
    subfolders left empty are removed too) plus the image result's name patterns; when the list
    is missing or unreadable, video files and frame PNGs named as ``save`` names them as well.
    Nothing else in the folder is touched.

    Raises:
        ConceptAttentionError: the folder holds a result and ``overwrite`` is False.
    """
    metadata = folder / "metadata.json"
    if not (metadata.is_file() or (folder / "maps.npz").is_file()):
        return
    if not overwrite:
        raise ConceptAttentionError(
            f"{folder} already holds a saved result ({metadata.name}); choose another folder, or overwrite it "
            "(`save(folder, overwrite=True)`, CLI `--overwrite`)"
        )
    try:
        listed = json.loads(metadata.read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        listed = None
    names = _listed_paths(folder, listed)
    old = {p for pattern in RESULT_PATTERNS for p in folder.glob(pattern)}
    old |= _video_result_files(folder) if names is None else names
    for path in old:
        if path.is_file() or path.is_symlink():
            path.unlink()
    parents = {parent for path in old for parent in path.parents if folder in parent.parents}
    for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        if parent.is_dir() and not parent.is_symlink() and not any(parent.iterdir()):
            parent.rmdir()


def _safe_name(text: str, limit: int = 48) -> str:
    """A file-name part for a concept: ASCII letters, digits, ``_`` and ``-``, at most ``limit`` characters.

    Files also carry the concept's index, so two concepts that sanitise alike never collide.
    """
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:limit] or "concept"


DEFAULT_FPS = 8.0  # frame rate of saved videos whose maps carry no ``fps``


@dataclass
class ConceptMaps:
    """One saliency map per concept per batch item, and everything needed to use it.

    Attributes:
        maps: (B, C, h, w) float32 on the CPU, on the transformer's token grid; video maps are
            (B, C, F, h, w) on ``F`` token frames (fewer than the decoded frames).
        concepts: the C concept words, in map order.
        image_size: (height, width) of the image (or of each video frame) the maps describe.
        images: optional B PIL images (generated, or the resized input) for overlays; for video
            maps, B lists of PIL frames (``output.frames`` of a diffusers video pipeline).
        block_maps: optional (L, B, C, h, w) per-block maps (``per_block=True``); (L, B, C, F, h, w) for videos.
        metadata: everything used to compute the maps (model, layers, steps, t, seeds, ...).
        num_frames: video maps: the decoded video's frame count (None: image maps; for 5-D
            maps, None means one frame per token frame).
        fps: video maps: frame rate of the decoded video (saved files use 8 when None).

    Video maps map ``F`` token frames to ``num_frames`` decoded frames by
    :func:`conceptattention.core.temporal_resample` (``temporal="nearest"`` by default: the
    causal VAE grouping ``ceil(j / r)`` when ``num_frames - 1 = r (F - 1)``, else proportional
    nearest; ``"linear"``: align-corners linear interpolation).

    Example:
        >>> maps = ConceptMaps(torch.rand(1, 2, 4, 4), ("dog", "sky"), (32, 32))
        >>> maps.upsampled().shape
        torch.Size([1, 2, 32, 32])
        >>> maps.segmentation().shape
        torch.Size([1, 32, 32])
        >>> video = ConceptMaps(torch.rand(1, 2, 3, 4, 4), ("dog", "sky"), (32, 32), num_frames=9)
        >>> video.upsampled().shape
        torch.Size([1, 2, 9, 32, 32])
    """

    maps: torch.Tensor
    concepts: tuple[str, ...]
    image_size: tuple[int, int]
    images: list[Any] | None = None
    block_maps: torch.Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    num_frames: int | None = None
    fps: float | None = None

    @property
    def is_video(self) -> bool:
        """Whether these are video maps (B, C, F, h, w)."""
        return self.maps.ndim == 5

    @property
    def grid(self) -> tuple[int, ...]:
        """(h, w) token grid, or (F, h, w) for video maps."""
        return tuple(int(n) for n in self.maps.shape[2:])

    @property
    def frame_count(self) -> int:
        """Video maps: decoded frames (``num_frames``, default the token frames ``F``)."""
        if not self.is_video:
            raise ConceptAttentionError("these are image maps (B, C, h, w): they have no frames")
        return int(self.num_frames) if self.num_frames is not None else int(self.maps.shape[2])

    def concept_index(self, concept: str | int) -> int:
        """Index of a concept given by name or index, with a clear error otherwise."""
        if isinstance(concept, int) and not isinstance(concept, bool):
            if not 0 <= concept < len(self.concepts):
                raise ConceptAttentionError(
                    f"concept index {concept} is out of range: there are {len(self.concepts)} concepts "
                    f"(valid: 0-{len(self.concepts) - 1})"
                )
            return concept
        if concept not in self.concepts:
            raise ConceptAttentionError(f"Unknown concept {concept!r}; the maps hold {list(self.concepts)}")
        return self.concepts.index(concept)

    def _frames_arg(self, frames: int | None) -> int | None:
        """The decoded frame count to resample video maps to (None for image maps)."""
        if not self.is_video:
            if frames is not None:
                raise ConceptAttentionError("`frames` is for video maps; these are image maps (B, C, h, w)")
            return None
        if frames is None:
            return self.frame_count
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise ConceptAttentionError(f"`frames` must be a positive frame count, got {frames!r}")
        return frames

    def _frame_arg(self, frame: int | None) -> int | None:
        """Check a decoded frame index: required for video maps, refused for image maps."""
        if not self.is_video:
            if frame is not None:
                raise ConceptAttentionError("`frame` is for video maps; these are image maps (B, C, h, w)")
            return None
        count = self.frame_count
        if frame is None:
            raise ConceptAttentionError(
                f"these are video maps ({count} frames): pass `frame=` (0-{count - 1}), or use "
                "`overlay_frames` / `heatmap_frames` for a whole video"
            )
        if isinstance(frame, bool) or not isinstance(frame, int) or not 0 <= frame < count:
            raise ConceptAttentionError(
                f"frame {frame!r} is out of range: the video has {count} frames (0-{count - 1})"
            )
        return frame

    def _frame_maps(
        self,
        frame: int,
        size: tuple[int, int] | None = None,
        temporal: Temporal = "nearest",
        index: int | None = None,
        concept: int | None = None,
    ) -> torch.Tensor:
        """Video maps of one decoded frame: (B, C, height, width), or one batch item / concept (size-1 axes)."""
        maps = self.maps if index is None else self.maps[index : index + 1]
        maps = maps if concept is None else maps[:, concept : concept + 1]
        one = temporal_resample(maps, self.frame_count, temporal, [frame])[:, :, 0]
        return upsample(one, size or self.image_size)

    def upsampled(
        self, size: tuple[int, int] | None = None, frames: int | None = None, temporal: Temporal = "nearest"
    ) -> torch.Tensor:
        """(B, C, height, width) maps, bilinearly upsampled to ``size`` (default: image size).

        Video maps: (B, C, frames, height, width): bilinear per frame, and resampled in time from
        the F token frames to ``frames`` decoded frames (default ``num_frames``) by ``temporal``:
        ``"nearest"`` (the token frame covering each decoded frame: ``ceil(j / r)`` when
        ``frames - 1 = r (F - 1)``, a causal VAE's grouping, else ``round(j (F - 1) / (frames - 1))``)
        or ``"linear"`` (align-corners interpolation).
        """
        count = self._frames_arg(frames)
        if count is None:
            return upsample(self.maps, size or self.image_size)
        return upsample(self.maps, size or self.image_size, count, temporal)

    def segmentation(
        self, size: tuple[int, int] | None = None, frames: int | None = None, temporal: Temporal = "nearest"
    ) -> torch.Tensor:
        """(B, height, width) int64 concept index of the per-pixel argmax; (B, frames, height, width) for videos."""
        count = self._frames_arg(frames)
        if count is None:
            return segment(self.upsampled(size))
        size = size or self.image_size
        out = torch.empty(self.maps.shape[0], count, *size, dtype=torch.int64)
        for j in range(count):  # one frame at a time: never all concepts of all frames at once
            one = temporal_resample(self.maps, count, temporal, [j])[:, :, 0]
            out[:, j] = segment(upsample(one, size))
        return out

    def mask(
        self,
        concept: str | int,
        size: tuple[int, int] | None = None,
        frames: int | None = None,
        temporal: Temporal = "nearest",
    ) -> torch.Tensor:
        """(B, height, width) bool foreground of one concept: its map above the map's mean.

        Video maps: (B, frames, height, width); each frame is thresholded at that frame's own mean.
        """
        index = self.concept_index(concept)
        count = self._frames_arg(frames)
        if count is None:
            return binary_mask(self.upsampled(size), index)
        return binary_mask(upsample(self.maps[:, index : index + 1], size or self.image_size, count, temporal), 0)

    @property
    def display_size(self) -> tuple[int, int]:
        """(height, width) of pictures: the image size, enlarged by a whole factor to at least 256 px."""
        from conceptattention import viz

        factor = viz.display_factor(self.image_size)
        return self.image_size[0] * factor, self.image_size[1] * factor

    def heatmaps(
        self, index: int = 0, cmap: str = "inferno", frame: int | None = None, temporal: Temporal = "nearest"
    ) -> dict[str, Any]:
        """Coloured heatmaps (PIL, ``display_size``) of batch item ``index``, keyed by concept.

        Video maps need ``frame`` (a decoded frame index). Unnormalised video maps are scaled per
        concept over the whole video, so colours are comparable across frames.
        """
        from conceptattention import viz

        frame = self._frame_arg(frame)
        if frame is None:
            maps = self.upsampled(self.display_size)[index]
            maps = viz.display_range(maps, self.metadata.get("normalization", "softmax"))
        else:
            maps = self._frame_maps(frame, self.display_size, temporal, index=index)[0]
            maps = viz.display_range(maps, self.metadata.get("normalization", "softmax"), reference=self.maps[index])
        return {c: viz.colorize(m, cmap) for c, m in zip(self.concepts, maps)}

    def overlays(
        self,
        index: int = 0,
        alpha: float = 0.5,
        cmap: str = "inferno",
        frame: int | None = None,
        temporal: Temporal = "nearest",
    ) -> dict[str, Any]:
        """Heatmaps blended over the image of batch item ``index`` (requires ``images``); video maps need ``frame``."""
        from conceptattention import viz

        image = self.image_at(index, self.display_size, frame=frame)
        return {c: viz.blend(image, heat, alpha) for c, heat in self.heatmaps(index, cmap, frame, temporal).items()}

    def image_at(self, index: int, size: tuple[int, int] | None = None, frame: int | None = None) -> Any:
        """Image of batch item ``index``, RGB, at ``size`` (default ``image_size``); enlarged without blur.

        Video maps need ``frame``: that decoded frame of the attached video.
        """
        from PIL import Image

        if self.images is None:
            raise ConceptAttentionError("These maps carry no images; pass `images=` to get overlays")
        frame = self._frame_arg(frame)
        image = self.images[index] if frame is None else self._video(index)[frame]
        image = image.convert("RGB").resize(self.image_size[::-1], Image.Resampling.LANCZOS)
        return image if size is None else image.resize(size[::-1], Image.Resampling.NEAREST)

    def _video(self, index: int) -> list[Any]:
        """The attached frames of video ``index``, checked against ``num_frames``."""
        if self.images is None:
            raise ConceptAttentionError("These maps carry no video frames; pass `images=` (B lists of frames)")
        frames = self.images[index]
        if not isinstance(frames, (list, tuple)):
            raise ConceptAttentionError(
                f"video maps need `images` as B lists of PIL frames; item {index} is a {type(frames).__name__}"
            )
        if len(frames) != self.frame_count:
            raise ConceptAttentionError(
                f"video {index} has {len(frames)} frames but the maps describe {self.frame_count} "
                "(`num_frames`); attach the decoded frames the maps were computed for"
            )
        return list(frames)

    def heatmap_frames(
        self, concept: str | int, index: int = 0, cmap: str = "inferno", temporal: Temporal = "nearest"
    ) -> Iterator[Any]:
        """Video maps: one concept's heatmap (PIL, ``display_size``) for every decoded frame, made one at a time."""
        from conceptattention import viz

        i = self.concept_index(concept)
        count = self.frame_count
        normalization = self.metadata.get("normalization", "softmax")
        reference = self.maps[index, i : i + 1]

        def frames() -> Iterator[Any]:
            for j in range(count):
                heat = self._frame_maps(j, self.display_size, temporal, index=index, concept=i)[0]
                yield viz.colorize(viz.display_range(heat, normalization, reference=reference)[0], cmap)

        return frames()

    def overlay_frames(
        self,
        concept: str | int,
        index: int = 0,
        alpha: float = 0.5,
        cmap: str = "inferno",
        temporal: Temporal = "nearest",
    ) -> Iterator[Any]:
        """Video maps: one concept's heatmap blended over every frame of video ``index`` (requires ``images``)."""
        from conceptattention import viz

        video = self._video(index)
        heats = self.heatmap_frames(concept, index, cmap, temporal)
        return (
            viz.blend(self.image_at(index, self.display_size, j), h, alpha) for j, h in zip(range(len(video)), heats)
        )

    def save(self, folder: str | Path, overwrite: bool = False, frames: bool = False) -> list[Path]:
        """Write PNG heatmaps, an overlay grid, segmentations with legends, ``maps.npz`` and ``metadata.json``.

        Video maps write, per batch item ``b`` (``prefix = f"b{b}_"`` when B > 1), made and written
        one frame at a time at ``fps`` (8 when None):

        - ``{prefix}overlay_{i:02d}_{concept}.mp4``: concept i's heatmap over the video
          (``{prefix}heatmap_{i:02d}_{concept}.mp4`` when no frames are attached);
        - ``{prefix}overlay_grid.mp4``: the input video (if attached) and every concept side by side;
        - ``{prefix}segmentation.mp4``: the argmax segmentation with a legend;
        - ``{prefix}video.mp4``: the attached video at ``image_size``;
        - with ``frames=True``, each of these also as PNGs: ``frames/{file name without .mp4}/{j:04d}.png``;

        then ``maps.npz`` and ``metadata.json`` (with ``num_frames`` and ``fps``). Without an MP4
        writer (``pip install "conceptattention[video]"``), ``.gif`` files replace the ``.mp4`` files.
        ``frames`` is ignored for image maps.

        A folder that already holds a result is refused unless ``overwrite=True``, which first
        removes that result's files, so two runs never mix.

        Returns:
            The paths written.
        """
        from conceptattention import viz

        out = Path(folder)
        clear_result_folder(out, overwrite)
        out.mkdir(parents=True, exist_ok=True)
        if self.is_video:
            return self._save_video(out, frames)
        written: list[Path] = []
        batch = self.maps.shape[0]
        segmentation = self.segmentation(self.display_size)
        for b in range(batch):
            prefix = f"b{b}_" if batch > 1 else ""
            for i, (concept, heat) in enumerate(self.heatmaps(b).items()):
                written.append(out / f"{prefix}heatmap_{i:02d}_{_safe_name(concept)}.png")
                heat.save(written[-1])
            written.append(out / f"{prefix}segmentation.png")
            viz.segmentation_with_legend(segmentation[b], self.concepts).save(written[-1])
            if self.images is not None:
                written.append(out / f"{prefix}image.png")
                self.image_at(b).save(written[-1])  # at its true size
        written.append(out / "overlay_grid.png")
        viz.overlay_grid(self).save(written[-1])
        self._save_arrays(out, written, {})
        return written

    def _save_arrays(self, out: Path, written: list[Path], extra: dict[str, Any]) -> None:
        """``maps.npz`` and ``metadata.json`` (its ``files``: every path written, relative to ``out``)."""
        arrays = {"maps": self.maps.numpy(), "concepts": np.array(self.concepts)}
        if self.block_maps is not None:
            arrays["block_maps"] = self.block_maps.numpy()
        written.append(out / "maps.npz")
        np.savez_compressed(written[-1], **arrays)  # type: ignore[arg-type]
        written.append(out / "metadata.json")
        files = [p.relative_to(out).as_posix() for p in written]
        record = {
            **self.metadata,
            "concepts": list(self.concepts),
            "image_size": list(self.image_size),
            **extra,
            "files": files,
        }
        written[-1].write_text(json.dumps(record, indent=2, default=str))

    def _save_video(self, out: Path, frames: bool) -> list[Path]:
        """The video files of :meth:`save`."""
        from conceptattention import viz
        from conceptattention.videos import write_video

        count, size, fps = self.frame_count, self.display_size, self.fps or DEFAULT_FPS
        if self.images is not None:
            for b in range(self.maps.shape[0]):
                self._video(b)  # a wrong frame count fails before any file is written
        written: list[Path] = []

        def emit(name: str, stream: Iterable[Any]) -> None:
            if frames:
                stream = _tee_png(stream, out / FRAME_FOLDER / name, written)
            written.append(write_video(out / f"{name}.mp4", stream, fps))

        batch = self.maps.shape[0]
        for b in range(batch):
            prefix = f"b{b}_" if batch > 1 else ""
            for i, concept in enumerate(self.concepts):
                if self.images is not None:
                    emit(f"{prefix}overlay_{i:02d}_{_safe_name(concept)}", self.overlay_frames(i, b))
                else:
                    emit(f"{prefix}heatmap_{i:02d}_{_safe_name(concept)}", self.heatmap_frames(i, b))
            emit(f"{prefix}overlay_grid", viz.overlay_grid_frames(self, b))
            segmentation = (segment(self._frame_maps(j, size, index=b))[0] for j in range(count))
            emit(f"{prefix}segmentation", (viz.segmentation_with_legend(s, self.concepts) for s in segmentation))
            if self.images is not None:
                emit(f"{prefix}video", (self.image_at(b, frame=j) for j in range(count)))  # at its true size
        self._save_arrays(out, written, {"num_frames": count, "fps": self.fps})
        return written

    @classmethod
    def load(cls, folder: str | Path) -> ConceptMaps:
        """Read maps and metadata written by :meth:`save` (images are not reloaded; video maps keep
        ``num_frames`` and ``fps``)."""
        folder = Path(folder)
        npz_path, json_path = folder / "maps.npz", folder / "metadata.json"
        for path in (npz_path, json_path):
            if not path.is_file():
                raise ConceptAttentionError(f"{path} not found: expected a folder written by `ConceptMaps.save`")
        with np.load(npz_path, allow_pickle=False) as arrays:
            maps = torch.from_numpy(arrays["maps"])
            concepts = tuple(str(c) for c in arrays["concepts"])
            block_maps = torch.from_numpy(arrays["block_maps"]) if "block_maps" in arrays else None
        record = json.loads(json_path.read_text())
        video = maps.ndim == 5
        return cls(
            maps=maps,
            concepts=concepts,
            image_size=tuple(record["image_size"]),
            block_maps=block_maps,
            metadata=record,
            num_frames=record.get("num_frames") if video else None,
            fps=record.get("fps") if video else None,
        )


def _tee_png(frames: Iterable[Any], folder: Path, written: list[Path]) -> Iterator[Any]:
    """Pass frames through, saving each as ``folder/{j:04d}.png`` on the way."""
    folder.mkdir(parents=True, exist_ok=True)
    for j, frame in enumerate(frames):
        written.append(folder / f"{j:04d}.png")
        frame.save(written[-1])
        yield frame
