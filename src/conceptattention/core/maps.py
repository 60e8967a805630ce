"""From accumulated token scores to maps, masks and segmentations."""

from __future__ import annotations

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


def tokens_to_grid(scores: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, C, N) token scores -> (B, C, h, w), tokens in row-major order."""
    h, w = grid
    if scores.shape[-1] != h * w:
        raise ValueError(f"{scores.shape[-1]} image tokens do not fill a {h}x{w} grid")
    return scores.unflatten(-1, (h, w))  # (B, C, h, w)


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
