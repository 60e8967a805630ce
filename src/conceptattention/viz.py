"""Pictures of maps: coloured heatmaps, overlays, segmentations with legends (PIL + matplotlib)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from conceptattention.outputs import ConceptMaps


def display_factor(size: tuple[int, int], minimum: int = 256) -> int:
    """Whole enlargement factor so that the shorter side of ``size`` reaches ``minimum`` pixels."""
    return max(1, -(-minimum // max(1, min(size))))


def display_range(maps: torch.Tensor, normalization: str, reference: torch.Tensor | None = None) -> torch.Tensor:
    """Maps scaled to [0, 1] for display.

    Softmax and min-max maps are already in [0, 1] and comparable across concepts, so they
    are shown as they are; unnormalised scores are min-max scaled per map.

    Args:
        maps: (C, height, width) float.
        reference: optional (C, ...) maps whose per-concept minimum and maximum set the range of
            unnormalised scores (default: ``maps`` itself). Video frames pass the whole video's
            token maps, so one concept keeps one scale over time instead of flickering per frame.
    """
    if normalization != "none":
        return maps.clamp(0, 1)
    flat = (maps if reference is None else reference).flatten(1).float()
    low, high = flat.amin(1).view(-1, 1, 1), flat.amax(1).view(-1, 1, 1)
    return (maps - low) / (high - low).clamp(min=1e-12)


def colorize(heat: torch.Tensor, cmap: str = "inferno") -> Image.Image:
    """(height, width) values in [0, 1] -> RGB PIL image through a matplotlib colormap."""
    from matplotlib import colormaps

    rgba = colormaps[cmap](heat.detach().cpu().numpy())  # (height, width, 4)
    return Image.fromarray((rgba[..., :3] * 255).round().astype(np.uint8))


def blend(image: Image.Image, heat: Image.Image, alpha: float = 0.5) -> Image.Image:
    """Heatmap over an image of the same size."""
    return Image.blend(image.convert("RGB"), heat.convert("RGB"), alpha)


def palette(count: int) -> list[tuple[int, int, int]]:
    """Distinct colours for ``count`` segments."""
    from matplotlib import colormaps

    cmap = colormaps["tab20" if count > 10 else "tab10"]
    rgb = [cmap(i % cmap.N)[:3] for i in range(count)]
    return [(int(255 * r), int(255 * g), int(255 * b)) for r, g, b in rgb]


def segmentation_with_legend(labels: torch.Tensor, concepts: Sequence[str]) -> Image.Image:
    """Coloured (height, width) label map with a legend strip on the right."""
    colours = np.array(palette(len(concepts)), dtype=np.uint8)
    seg = Image.fromarray(colours[labels.cpu().numpy()])
    row = 14
    legend_width = 12 + 7 * max(len(c) for c in concepts) + 10
    canvas = Image.new("RGB", (seg.width + legend_width, max(seg.height, row * len(concepts) + 4)), "white")
    canvas.paste(seg, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, (concept, colour) in enumerate(zip(concepts, colours)):
        y = 2 + i * row
        draw.rectangle([seg.width + 4, y, seg.width + 14, y + 10], fill=tuple(int(v) for v in colour))
        draw.text((seg.width + 18, y - 1), concept, fill="black")
    return canvas


def tile_grid(
    rows: Sequence[Sequence[tuple[str, Image.Image]]], tile_size: tuple[int, int], label_height: int = 14
) -> Image.Image:
    """Labelled tiles of ``tile_size = (height, width)``: one row per entry, a name above each tile."""
    height, width = tile_size
    columns = max(len(row) for row in rows)
    grid = Image.new("RGB", (columns * width, len(rows) * (height + label_height)), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        top = r * (height + label_height)
        for col, (name, tile) in enumerate(row):
            draw.text((col * width + 2, top), name, fill="black")
            grid.paste(tile, (col * width, top + label_height))
    return grid


def _grid_row(maps: ConceptMaps, index: int, alpha: float, frame: int | None) -> list[tuple[str, Image.Image]]:
    """The input (image or video frame), if any, then one overlay (or heatmap) per concept."""
    if maps.images is None:
        return list(maps.heatmaps(index, frame=frame).items())
    first = ("video" if maps.is_video else "image", maps.image_at(index, maps.display_size, frame=frame))
    return [first, *maps.overlays(index, alpha, frame=frame).items()]


def overlay_grid(maps: ConceptMaps, alpha: float = 0.5, frame: int | None = None) -> Image.Image:
    """Rows = batch items; columns = the image (if any) and one overlay (or heatmap) per concept.

    Video maps need ``frame``: the grid of that decoded frame.
    """
    rows = [_grid_row(maps, b, alpha, frame) for b in range(maps.maps.shape[0])]
    return tile_grid(rows, maps.display_size)


def overlay_grid_frames(maps: ConceptMaps, index: int = 0, alpha: float = 0.5) -> Iterator[Image.Image]:
    """Video maps: one grid per decoded frame of batch item ``index`` (the input frame, if any, then
    one overlay or heatmap per concept), made one frame at a time."""
    for frame in range(maps.frame_count):
        yield tile_grid([_grid_row(maps, index, alpha, frame)], maps.display_size)
