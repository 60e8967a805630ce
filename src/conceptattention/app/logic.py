"""What the web app does, without the web: inputs -> validated calls of the Python API -> pictures and files.

Every function here is plain Python (no Gradio), so it is unit-tested directly. Maps, overlays,
segmentations and saved files all come from :mod:`conceptattention` (``generate``,
``encode_image``, :class:`~conceptattention.outputs.ConceptMaps`, :mod:`~conceptattention.viz`);
this module only parses the page's inputs, bounds them, and lays the results out.
"""

from __future__ import annotations

import itertools
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, UnidentifiedImageError

from conceptattention import viz
from conceptattention.adapters.base import BlockSelection
from conceptattention.concepts import validate_concepts
from conceptattention.config import ConceptAttentionConfig
from conceptattention.encode import encode_image
from conceptattention.errors import ConceptAttentionError
from conceptattention.generate import generate
from conceptattention.images import load_image
from conceptattention.loading import bundled_model_path
from conceptattention.outputs import ConceptMaps
from conceptattention.plan import model_plan

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
"""Largest accepted upload (20 MiB); the server also refuses larger request bodies."""
MAX_UPLOAD_PIXELS = 40_000_000
"""Largest accepted upload in pixels (40 megapixels), checked from the header before decoding."""
MAX_STEPS = 100
MAX_NUM_SAMPLES = 16
MAX_SIDE = 2048
"""Largest generated side in pixels (models with a position table may allow less; they say so)."""
KEEP_RESULTS = 20
"""Result folders kept in the app's work folder; older ones are removed."""

SOFTMAX_CHOICES = ("auto", "on", "off")
SCORE_SPACES = ("output", "cross_attention", "value")
POOLINGS = ("first", "mean")
COLORMAPS = ("inferno", "viridis", "magma", "plasma", "jet", "turbo", "gray")
STRIP_TILE = 96
"""Side in pixels of one tile of the concept-by-block strip."""


def _mib(size: int) -> str:
    return f"{size / 1024 / 1024:g} MiB"


# -- inputs --------------------------------------------------------------------------------------


def parse_concept_text(text: str | None) -> tuple[str, ...]:
    """Concepts typed in one box: comma-separated and/or one per line; blank items are ignored.

    Validated by :func:`conceptattention.concepts.validate_concepts` (1-64, unique, non-blank).

    Example:
        >>> parse_concept_text("dog, grass\\nsky\\n")
        ('dog', 'grass', 'sky')
    """
    items = [item.strip() for item in re.split(r"[,\n]", text or "")]
    words = [item for item in items if item]
    if not words:
        raise ConceptAttentionError("No concepts: type at least one word, e.g. 'dog, grass, sky' (or one per line)")
    return validate_concepts(words)


@dataclass(frozen=True)
class ModelInfo:
    """What the page offers for the loaded model: its blocks and default sizes."""

    name: str
    architecture: str
    usable_layers: tuple[int, ...]
    default_layers: tuple[int, ...]
    single_layers: tuple[int, ...]
    default_single_layers: tuple[int, ...]
    excluded: dict[int, str]
    size: tuple[int, int]
    steps: int
    pixels_per_token: int


def model_info(pipe: Any) -> ModelInfo:
    """Layer range, default layers, default size and steps of a loaded pipeline (image models only)."""
    model = model_plan(pipe)
    model.require("image", "The web app shows image models", "map videos with `conceptattention generate` / "
                  "`conceptattention encode` or the Python API (`ca.generate`, `ca.encode_video`)")  # fmt: skip
    transformer, backend = model.transformer, model.backend
    name = getattr(getattr(pipe, "config", None), "_name_or_path", None) or type(pipe).__name__
    if Path(str(name)).resolve() == bundled_model_path().resolve():
        name = "the bundled model"
    defaults = model.defaults
    return ModelInfo(
        name=str(name),
        architecture=backend.spec.name,
        usable_layers=tuple(backend.usable_blocks(transformer)),
        default_layers=tuple(backend.default_layers(transformer)),
        single_layers=tuple(range(backend.num_single_blocks(transformer))),
        default_single_layers=tuple(backend.resolve_single_layers(transformer, None)),
        excluded=dict(backend.excluded_blocks(transformer)),
        size=model.size(),
        steps=int(defaults.get("num_inference_steps", 28)),
        pixels_per_token=backend.encoding.pixels_per_token(pipe),
    )


def block_choices(info: ModelInfo) -> list[str]:
    """The multi-select's entries: ``"double i"`` for each usable dual-stream block, then ``"single j"``."""
    return [f"double {i}" for i in info.usable_layers] + [f"single {j}" for j in info.single_layers]


def blocks_summary(info: ModelInfo) -> str:
    """The page's line on the model's blocks: the usable joint blocks (and why any is left out), then the
    single-stream ones."""
    parts = []
    if info.usable_layers:
        excluded = "".join(f"; block {i} is left out: {why}" for i, why in info.excluded.items())
        parts.append(f"joint blocks {info.usable_layers[0]}-{info.usable_layers[-1]}{excluded}")
    if info.single_layers:
        last = info.single_layers[-1]
        parts.append(f"single-stream blocks 0-{last}" if last else "single-stream block 0")
    return ", then ".join(parts)


def default_blocks(info: ModelInfo) -> list[str]:
    """The multi-select's default entries: the model's default blocks of each kind."""
    return [f"double {i}" for i in info.default_layers] + [f"single {j}" for j in info.default_single_layers]


def parse_blocks(pipe: Any, selected: Iterable[Any] | None) -> BlockSelection:
    """The multi-select's blocks (``"double 3"``, ``"single 0"``; a bare index is a dual-stream block), checked
    against the model (errors name the valid ranges)."""
    model = model_plan(pipe)
    values = list(selected or [])
    if not values:
        backend, transformer = model.backend, model.transformer
        kinds = [(kind, blocks) for kind, blocks in (("double", backend.usable_blocks(transformer)),
                 ("single", range(backend.num_single_blocks(transformer)))) if blocks]  # fmt: skip
        ranges = " or ".join(
            f"{kind} {blocks[0]}" if len(blocks) == 1 else f"{kind} {blocks[0]}-{blocks[-1]}" for kind, blocks in kinds
        )
        raise ConceptAttentionError(f"No layers selected: choose at least one block ({ranges} for this model)")
    chosen: dict[str, list[int]] = {"double": [], "single": []}
    for value in values:
        kind, _, index = str(value).strip().rpartition(" ")
        kind = kind or "double"
        try:
            if kind not in chosen:
                raise ValueError
            chosen[kind].append(int(index))
        except ValueError:
            raise ConceptAttentionError(
                f"Layer {value!r} is not a block: write a block index, 'double 3' or 'single 0'"
            ) from None
    config = ConceptAttentionConfig(
        layers=tuple(chosen["double"]) or "none", single_layers=tuple(chosen["single"]) or None
    )
    return model.resolve_blocks(config.layers, config.single_layers)


def method_config(
    pipe: Any, layers: Iterable[Any] | None, score_space: str, softmax: str, pooling: str
) -> ConceptAttentionConfig:
    """The shared controls as one validated :class:`ConceptAttentionConfig` (per-block maps on, for the strip)."""
    if softmax not in SOFTMAX_CHOICES:
        raise ConceptAttentionError(f"Softmax must be one of {', '.join(SOFTMAX_CHOICES)}, got {softmax!r}")
    blocks = parse_blocks(pipe, layers)
    return ConceptAttentionConfig(
        layers=blocks.double or "none",
        single_layers=blocks.single or None,
        score_space=score_space,  # type: ignore[arg-type]  # validated by the config
        softmax={"auto": None, "on": True, "off": False}[softmax],
        pooling=pooling,  # type: ignore[arg-type]
        per_block=True,
    )


def check_upload(path: str | Path | None) -> Image.Image:
    """An uploaded file as an RGB image, refusing before decoding what is too large or unreadable.

    Limits: :data:`MAX_UPLOAD_BYTES` bytes and :data:`MAX_UPLOAD_PIXELS` pixels (read from the
    header). Decoding, EXIF orientation and mode conversion are :func:`conceptattention.images.load_image`'s.
    """
    if path is None or str(path) == "":
        raise ConceptAttentionError("No image: upload one (PNG, JPEG, WebP, ...) or pick an example scene")
    file = Path(path)
    if not file.is_file():
        raise ConceptAttentionError("The uploaded image is gone from the server; upload it again")
    size = file.stat().st_size
    if size > MAX_UPLOAD_BYTES:
        raise ConceptAttentionError(
            f"The uploaded file is {_mib(size)}, more than the limit of {_mib(MAX_UPLOAD_BYTES)}; "
            "upload a smaller image"
        )
    limit = f"the limit of {MAX_UPLOAD_PIXELS / 1e6:g} megapixels"
    try:
        with Image.open(file) as opened:
            width, height = opened.size
    except Image.DecompressionBombError:
        raise ConceptAttentionError(
            f"The uploaded image has more pixels than {limit}; upload a smaller image"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise ConceptAttentionError(
            "The uploaded file cannot be read as an image; upload a PNG, JPEG, WebP, BMP or TIFF file"
        ) from None
    if width * height > MAX_UPLOAD_PIXELS:
        raise ConceptAttentionError(
            f"The uploaded image is {width}x{height} ({width * height / 1e6:.1f} megapixels), more than {limit}; "
            "upload a smaller image"
        )
    try:
        return load_image(file, "The uploaded image")
    except Image.DecompressionBombError:
        raise ConceptAttentionError(
            f"The uploaded image has more pixels than {limit}; upload a smaller image"
        ) from None
    except ConceptAttentionError as error:
        raise ConceptAttentionError(str(error).replace(str(file), file.name)) from None


def _whole(value: Any, name: str, low: int, high: int) -> int:
    """An integer field of the page in [low, high], or a message naming the field and the range."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConceptAttentionError(f"{name} must be a whole number from {low} to {high}, got {value!r}") from None
    if not number.is_integer() or not low <= number <= high:
        raise ConceptAttentionError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    return int(number)


def check_seed(seed: Any) -> int:
    return _whole(seed, "Seed", 0, 2**63 - 1)


# -- runs ----------------------------------------------------------------------------------------


def run_generate(
    pipe: Any,
    prompt: str,
    concepts: str,
    steps: Any,
    seed: Any,
    height: Any,
    width: Any,
    config: ConceptAttentionConfig,
) -> ConceptMaps:
    """Generate one image from ``prompt`` and map each concept (:func:`conceptattention.generate`)."""
    words = parse_concept_text(concepts)
    if not (prompt or "").strip():
        raise ConceptAttentionError("The prompt is empty: describe the image to generate")
    steps = _whole(steps, "Steps", 1, MAX_STEPS)
    seed = check_seed(seed)
    size = (_whole(height, "Height", 1, MAX_SIDE), _whole(width, "Width", 1, MAX_SIDE))
    height, width = model_plan(pipe).size(*size)
    return generate(
        pipe,
        prompt.strip(),
        list(words),
        config=config,
        seed=seed,
        num_inference_steps=steps,
        height=height,
        width=width,
    )


def run_explain(
    pipe: Any,
    image_path: str | Path | None,
    caption: str,
    concepts: str,
    t: Any,
    num_samples: Any,
    seed: Any,
    config: ConceptAttentionConfig,
) -> ConceptMaps:
    """Maps of an uploaded image (:func:`conceptattention.encode_image`)."""
    words = parse_concept_text(concepts)
    try:
        t = float(t)
    except (TypeError, ValueError):
        raise ConceptAttentionError(f"t must be a number in (0, 1), got {t!r}") from None
    if not 0.0 < t < 1.0:
        raise ConceptAttentionError(f"t must be in (0, 1) (exclusive), got {t!r}; the paper uses 0.5")
    samples = _whole(num_samples, "Noise samples", 1, MAX_NUM_SAMPLES)
    seed = check_seed(seed)
    image = check_upload(image_path)
    return encode_image(
        pipe, image, list(words), caption=(caption or "").strip(), config=config, t=t, num_samples=samples, seed=seed
    )


# -- pictures ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class View:
    """What the page shows of one result (batch item 0)."""

    image: Image.Image | None
    overlays: list[tuple[Image.Image, str]]
    segmentation: Image.Image
    block_strip: Image.Image | None


def check_opacity(opacity: Any) -> float:
    try:
        alpha = float(opacity)
    except (TypeError, ValueError):
        raise ConceptAttentionError(f"Opacity must be a number in [0, 1], got {opacity!r}") from None
    if not 0.0 <= alpha <= 1.0:
        raise ConceptAttentionError(f"Opacity must be in [0, 1], got {opacity!r}")
    return alpha


def check_colormap(cmap: str) -> str:
    if cmap not in COLORMAPS:
        raise ConceptAttentionError(f"Colormap must be one of {', '.join(COLORMAPS)}, got {cmap!r}")
    return cmap


def _tiles(maps: ConceptMaps, alpha: float, cmap: str) -> dict[str, Image.Image]:
    """One picture per concept: the overlay on the image when there is one, else the heatmap."""
    return maps.overlays(0, alpha, cmap) if maps.images is not None else maps.heatmaps(0, cmap)


def block_strip(maps: ConceptMaps, alpha: float = 0.5, cmap: str = "inferno") -> Image.Image | None:
    """Concept-by-block grid of the per-block maps: rows = concepts, columns = blocks (``None`` without them).

    Each tile is :meth:`ConceptMaps.overlays` of that block's maps (same normalisation as the
    combined map), shrunk to :data:`STRIP_TILE` pixels.
    """
    if maps.block_maps is None:
        return None
    layers = list(maps.metadata.get("blocks") or maps.metadata.get("layers") or range(maps.block_maps.shape[0]))
    names = list(maps.concepts)
    label_width = 8 + 7 * max(len(n) for n in names)
    header = 16
    tile = STRIP_TILE
    strip = Image.new("RGB", (label_width + tile * len(layers), header + tile * len(names)), "white")
    draw = ImageDraw.Draw(strip)
    for column, (layer, block) in enumerate(zip(layers, maps.block_maps)):
        draw.text((label_width + column * tile + 4, 2), layer if isinstance(layer, str) else f"block {layer}",
                  fill="black")  # fmt: skip
        tiles = _tiles(replace(maps, maps=block, block_maps=None), alpha, cmap)
        for row, name in enumerate(names):
            strip.paste(
                tiles[name].resize((tile, tile), Image.Resampling.BILINEAR),
                (label_width + column * tile, header + row * tile),
            )
    for row, name in enumerate(names):
        draw.text((4, header + row * tile + tile // 2 - 6), name, fill="black")
    return strip


def render(maps: ConceptMaps, opacity: Any = 0.5, cmap: str = "inferno") -> View:
    """The page's pictures of a result: image, one overlay per concept, segmentation with legend, block strip."""
    alpha, cmap = check_opacity(opacity), check_colormap(cmap)
    size = maps.display_size
    image = maps.image_at(0, size) if maps.images is not None else None
    overlays = [(picture, concept) for concept, picture in _tiles(maps, alpha, cmap).items()]
    segmentation = viz.segmentation_with_legend(maps.segmentation(size)[0], maps.concepts)
    return View(image=image, overlays=overlays, segmentation=segmentation, block_strip=block_strip(maps, alpha, cmap))


# -- files ---------------------------------------------------------------------------------------

_counter = itertools.count()


def save_zip(maps: ConceptMaps, workdir: str | Path, keep: int = KEEP_RESULTS) -> Path:
    """``maps.save`` into a new folder under ``workdir``, zipped; only the newest ``keep`` results stay."""
    root = Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    mode = str(maps.metadata.get("mode", "result"))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = root / f"run-{time.time_ns()}-{next(_counter):04d}"
    folder = run / f"conceptattention-{mode}-{stamp}"
    maps.save(folder)
    archive = Path(shutil.make_archive(str(folder), "zip", root_dir=folder))
    shutil.rmtree(folder)
    old = sorted(root.glob("run-*"), key=lambda p: p.name)[:-keep] if keep > 0 else []
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return archive


def new_workdir() -> Path:
    """A private folder for the app's result archives."""
    return Path(tempfile.mkdtemp(prefix="conceptattention-app-"))


# -- examples ------------------------------------------------------------------------------------

EXAMPLE_SCENES = (0, 1, 2, 3, 4, 5)
GENERATE_EXAMPLES = (
    ("a photo of lemon, brick and grass", "lemon, brick, grass"),
    ("a photo of apple and plum on sand", "apple, plum, sand"),
    ("a photo of leaf, cheese and water", "leaf, cheese, water"),
)


@dataclass(frozen=True)
class SceneExample:
    path: Path
    caption: str
    concepts: str


def scene_examples(folder: str | Path, indices: Sequence[int] = EXAMPLE_SCENES) -> list[SceneExample]:
    """Held-out test scenes of the bundled model's data, written as PNGs (native size) under ``folder``."""
    from conceptattention.data.scenes import make_scene

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    examples = []
    for index in indices:
        scene = make_scene("test", index)
        path = root / f"scene_{index:03d}.png"
        Image.fromarray(scene.image).save(path)
        examples.append(SceneExample(path=path, caption=scene.caption, concepts=", ".join(scene.concepts)))
    return examples


def summary(maps: ConceptMaps, seconds: float) -> str:
    """One line under the outputs: what was computed, with which layers, in how long."""
    meta = maps.metadata
    layers = f"{meta.get('layers', [])}"
    if meta.get("single_layers"):
        layers += f", single-stream blocks {meta['single_layers']}"
    if meta.get("mode") == "encode":
        what = f"t={meta.get('t')}, {meta.get('num_samples')} noise sample(s)"
    else:
        what = f"{meta.get('num_steps_run')} denoising steps"
    return (
        f"Done in {seconds:.2f} s: {len(maps.concepts)} concept(s), {what}, layers {layers}, "
        f"score space {meta.get('score_space')}, softmax {'on' if meta.get('softmax') else 'off'}"
    )
