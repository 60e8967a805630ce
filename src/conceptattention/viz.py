"""Pictures of maps: coloured heatmaps, overlays, segmentations with legends (PIL + matplotlib)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from conceptattention.outputs import ConceptMaps


def display_factor(size: tuple[int, int], minimum: int = 256) -> int:
    """Whole enlargement factor so that the shorter side of ``size`` reaches ``minimum`` pixels."""
    return max(1, -(-minimum // max(1, min(size))))


def display_range(maps: torch.Tensor, normalization: str) -> torch.Tensor:
    """Maps scaled to [0, 1] for display.

    Softmax and min-max maps are already in [0, 1] and comparable across concepts, so they
    are shown as they are; unnormalised scores are min-max scaled per map.

    Args:
        maps: (C, height, width) float.
    """
    if normalization != "none":
        return maps.clamp(0, 1)
    flat = maps.flatten(1)
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


def overlay_grid(maps: ConceptMaps, alpha: float = 0.5) -> Image.Image:
    """Rows = batch items; columns = the image (if any) and one overlay (or heatmap) per concept."""
    height, width = maps.display_size
    label_height = 14
    batch = maps.maps.shape[0]
    columns = len(maps.concepts) + (1 if maps.images is not None else 0)
    grid = Image.new("RGB", (columns * width, batch * (height + label_height)), "white")
    draw = ImageDraw.Draw(grid)
    for b in range(batch):
        tiles = maps.overlays(b, alpha) if maps.images is not None else maps.heatmaps(b)
        image = [("image", maps.image_at(b, maps.display_size))] if maps.images is not None else []
        named = image + list(tiles.items())
        top = b * (height + label_height)
        for col, (name, tile) in enumerate(named):
            draw.text((col * width + 2, top), name, fill="black")
            grid.paste(tile, (col * width, top + label_height))
    return grid
