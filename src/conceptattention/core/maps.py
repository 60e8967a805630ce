"""From accumulated token scores to maps, masks and segmentations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Normalization = Literal["softmax", "minmax", "none"]


def finalize_maps(mean_scores: torch.Tensor, normalization: Normalization) -> torch.Tensor:
    """Final normalisation of averaged saliency.

    ``"softmax"`` and ``"none"`` leave the mean as is (softmax, when used, was applied per
    block and timestep before averaging). ``"minmax"`` rescales each map to [0, 1] over its
    tokens; it is used when a single concept makes a softmax over concepts meaningless.

    Args:
        mean_scores: (B, C, N) float averaged saliency.
        normalization: one of ``"softmax"``, ``"minmax"``, ``"none"``.

    Returns:
        (B, C, N) float32.
    """
    if normalization != "minmax":
        return mean_scores.float()
    low = mean_scores.amin(dim=-1, keepdim=True)
    high = mean_scores.amax(dim=-1, keepdim=True)
    return ((mean_scores - low) / (high - low).clamp(min=torch.finfo(torch.float32).tiny)).float()


@dataclass(frozen=True)
class TokenGrid:
    """Layout of the image (or video) tokens of one forward: ``frames`` x ``height`` x ``width``.

    Tokens are flattened frame-major, then row-major (every diffusers MM-DiT does this), so
    ``N = frames * height * width``. Images have ``frames == 1``.
    """

    height: int
    width: int
    frames: int = 1

    @property
    def num_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def shape(self) -> tuple[int, ...]:
        """``(h, w)`` for images, ``(F, h, w)`` for videos: the trailing shape of the maps."""
        return (self.height, self.width) if self.frames == 1 else (self.frames, self.height, self.width)

    def __str__(self) -> str:
        return "x".join(str(n) for n in self.shape)


def tokens_to_grid(scores: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
    """(B, C, N) token scores -> (B, C, h, w), or (B, C, F, h, w) for videos."""
    if scores.shape[-1] != grid.num_tokens:
        raise ValueError(f"{scores.shape[-1]} image tokens do not fill a {grid} grid")
    return scores.unflatten(-1, grid.shape)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of (B, C, h, w) maps to ``size = (height, width)``."""
    return F.interpolate(maps.float(), size=size, mode="bilinear", align_corners=False)


def gaussian_blur3x3(maps: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """3x3 Gaussian blur per map (replicate padding), as in the paper's evaluation.

    Args:
        maps: (B, C, h, w) float.
        sigma: standard deviation of the kernel in pixels.
    """
    offsets = torch.tensor([-1.0, 0.0, 1.0], device=maps.device)
    kernel1d = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel1d = kernel1d / kernel1d.sum()
    kernel = (kernel1d[:, None] * kernel1d[None, :]).view(1, 1, 3, 3)
    b, c, h, w = maps.shape
    padded = F.pad(maps.float().reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    return F.conv2d(padded, kernel).view(b, c, h, w)


def segment(maps: torch.Tensor) -> torch.Tensor:
    """Per-pixel argmax over concepts: (B, C, h, w) -> (B, h, w) int64 concept indices."""
    return maps.argmax(dim=1)


def binary_mask(maps: torch.Tensor, concept: int) -> torch.Tensor:
    """Foreground mask of one concept: its map above the map's own mean (Chefer et al. 2021).

    Args:
        maps: (B, C, h, w) float.
        concept: index of the target concept.

    Returns:
        (B, h, w) bool.
    """
    target = maps[:, concept]
    return target > target.mean(dim=(-2, -1), keepdim=True)
