"""``ConceptMaps``: the result object of every run, with its views and its files."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from conceptattention.core import binary_mask, segment, upsample
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
        layers: the scored blocks; excluded_blocks: blocks that can never be scored, with why.
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
    num_double_blocks: int
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


def clear_result_folder(folder: Path, overwrite: bool) -> None:
    """Refuse a folder holding a saved result, or (``overwrite``) remove that result's files.

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
    names = {n for n in listed if isinstance(n, str) and "/" not in n} if isinstance(listed, list) else set()
    old = {folder / name for name in names} | {p for pattern in RESULT_PATTERNS for p in folder.glob(pattern)}
    for path in old:
        path.unlink(missing_ok=True)


def _safe_name(text: str, limit: int = 48) -> str:
    """A file-name part for a concept: ASCII letters, digits, ``_`` and ``-``, at most ``limit`` characters.

    Files also carry the concept's index, so two concepts that sanitise alike never collide.
    """
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:limit] or "concept"


@dataclass
class ConceptMaps:
    """One saliency map per concept per batch item, and everything needed to use it.

    Attributes:
        maps: (B, C, h, w) float32 on the CPU, on the transformer's token grid.
        concepts: the C concept words, in map order.
        image_size: (height, width) of the image the maps describe.
        images: optional B PIL images (generated, or the resized input) for overlays.
        block_maps: optional (L, B, C, h, w) per-block maps (``per_block=True``).
        metadata: everything used to compute the maps (model, layers, steps, t, seeds, ...).

    Example:
        >>> maps = ConceptMaps(torch.rand(1, 2, 4, 4), ("dog", "sky"), (32, 32))
        >>> maps.upsampled().shape
        torch.Size([1, 2, 32, 32])
        >>> maps.segmentation().shape
        torch.Size([1, 32, 32])
    """

    maps: torch.Tensor
    concepts: tuple[str, ...]
    image_size: tuple[int, int]
    images: list[Any] | None = None
    block_maps: torch.Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) token grid."""
        return int(self.maps.shape[-2]), int(self.maps.shape[-1])

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

    def upsampled(self, size: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, C, height, width) maps, bilinearly upsampled to ``size`` (default: image size)."""
        return upsample(self.maps, size or self.image_size)

    def segmentation(self, size: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, height, width) int64 concept index of the per-pixel argmax."""
        return segment(self.upsampled(size))

    def mask(self, concept: str | int, size: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, height, width) bool foreground of one concept: its map above the map's mean."""
        return binary_mask(self.upsampled(size), self.concept_index(concept))

    @property
    def display_size(self) -> tuple[int, int]:
        """(height, width) of pictures: the image size, enlarged by a whole factor to at least 256 px."""
        from conceptattention import viz

        factor = viz.display_factor(self.image_size)
        return self.image_size[0] * factor, self.image_size[1] * factor

    def heatmaps(self, index: int = 0, cmap: str = "inferno") -> dict[str, Any]:
        """Coloured heatmaps (PIL, ``display_size``) of batch item ``index``, keyed by concept."""
        from conceptattention import viz

        maps = self.upsampled(self.display_size)[index]
        maps = viz.display_range(maps, self.metadata.get("normalization", "softmax"))
        return {c: viz.colorize(m, cmap) for c, m in zip(self.concepts, maps)}

    def overlays(self, index: int = 0, alpha: float = 0.5, cmap: str = "inferno") -> dict[str, Any]:
        """Heatmaps blended over the image of batch item ``index`` (requires ``images``)."""
        from conceptattention import viz

        image = self.image_at(index, self.display_size)
        return {c: viz.blend(image, heat, alpha) for c, heat in self.heatmaps(index, cmap).items()}

    def image_at(self, index: int, size: tuple[int, int] | None = None) -> Any:
        """Image of batch item ``index``, RGB, at ``size`` (default ``image_size``); enlarged without blur."""
        from PIL import Image

        if self.images is None:
            raise ConceptAttentionError("These maps carry no images; pass `images=` to get overlays")
        image = self.images[index].convert("RGB").resize(self.image_size[::-1], Image.Resampling.LANCZOS)
        return image if size is None else image.resize(size[::-1], Image.Resampling.NEAREST)

    def save(self, folder: str | Path, overwrite: bool = False) -> list[Path]:
        """Write PNG heatmaps, an overlay grid, segmentations with legends, ``maps.npz`` and ``metadata.json``.

        A folder that already holds a result is refused unless ``overwrite=True``, which first
        removes that result's files, so two runs never mix.

        Returns:
            The paths written.
        """
        from conceptattention import viz

        out = Path(folder)
        clear_result_folder(out, overwrite)
        out.mkdir(parents=True, exist_ok=True)
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
        arrays = {"maps": self.maps.numpy(), "concepts": np.array(self.concepts)}
        if self.block_maps is not None:
            arrays["block_maps"] = self.block_maps.numpy()
        written.append(out / "maps.npz")
        np.savez_compressed(written[-1], **arrays)  # type: ignore[arg-type]
        written.append(out / "metadata.json")
        files = [p.name for p in written]
        record = {**self.metadata, "concepts": list(self.concepts), "image_size": list(self.image_size), "files": files}
        written[-1].write_text(json.dumps(record, indent=2, default=str))
        return written

    @classmethod
    def load(cls, folder: str | Path) -> ConceptMaps:
        """Read maps and metadata written by :meth:`save` (images are not reloaded)."""
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
        return cls(
            maps=maps,
            concepts=concepts,
            image_size=tuple(record["image_size"]),
            block_maps=block_maps,
            metadata=record,
        )
