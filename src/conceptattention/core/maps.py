"""From accumulated token scores to maps, masks and segmentations."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Normalization = Literal["softmax", "minmax", "none"]
Temporal = Literal["nearest", "linear"]


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
    ``N = frames * height * width``. Images have ``frames == 1``; ``video`` keeps the frame axis of
    a video model's maps even when it has one token frame.
    """

    height: int
    width: int
    frames: int = 1
    video: bool = False

    @property
    def num_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def shape(self) -> tuple[int, ...]:
        """``(h, w)`` for images, ``(F, h, w)`` for videos: the trailing shape of the maps."""
        if self.frames == 1 and not self.video:
            return self.height, self.width
        return self.frames, self.height, self.width

    def __str__(self) -> str:
        return "x".join(str(n) for n in self.shape)


def tokens_to_grid(scores: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
    """(B, C, N) token scores -> (B, C, h, w), or (B, C, F, h, w) for videos."""
    if scores.shape[-1] != grid.num_tokens:
        raise ValueError(f"{scores.shape[-1]} image tokens do not fill a {grid} grid")
    return scores.unflatten(-1, grid.shape)


def upsample(
    maps: torch.Tensor, size: tuple[int, int], frames: int | None = None, temporal: Temporal = "nearest"
) -> torch.Tensor:
    """Bilinear upsampling of maps to ``size = (height, width)``; video maps also resampled in time.

    Args:
        maps: (B, C, h, w) image maps, or (B, C, F, h, w) video maps on ``F`` token frames.
        size: (height, width) in pixels.
        frames: video maps only: the decoded frame count to resample to (default: keep ``F``).
        temporal: ``"nearest"`` or ``"linear"``, see :func:`temporal_resample`.

    Returns:
        (B, C, height, width), or (B, C, frames, height, width) float32. Video maps are bilinear
        per frame exactly as images are; the temporal and spatial steps are both linear in the
        maps and commute, so the temporal one runs first, on the small token grid.
    """
    if maps.ndim == 4:
        if frames is not None:
            raise ValueError("image maps (B, C, h, w) have no frames to resample")
        return F.interpolate(maps.float(), size=size, mode="bilinear", align_corners=False)
    if maps.ndim != 5:
        raise ValueError(f"maps must be (B, C, h, w) or (B, C, F, h, w), got shape {tuple(maps.shape)}")
    if frames is not None:
        maps = temporal_resample(maps, frames, temporal)
    b, c, f, h, w = maps.shape
    flat = F.interpolate(maps.float().reshape(b, c * f, h, w), size=size, mode="bilinear", align_corners=False)
    return flat.view(b, c, f, *size)


def temporal_index(num_token_frames: int, num_frames: int) -> torch.Tensor:
    """For each decoded frame, the token frame that covers it ("nearest" temporal rule).

    With ``F = num_token_frames`` and ``n = num_frames``:

    - ``F == 1``: every frame takes token frame 0;
    - causal grouping, when ``n - 1`` is a multiple ``r`` (at least 1) of ``F - 1``: frame ``j``
      takes token frame ``ceil(j / r)``. This is how a causal video VAE lays out time (CogVideoX:
      latent frame 0 decodes to frame 0, latent frame ``k >= 1`` to frames ``4k-3 .. 4k``, r = 4;
      CogVideoX 1.5 with two latent frames per token frame, r = 8);
    - otherwise proportional nearest: ``floor(j * (F - 1) / (n - 1) + 1/2)`` (halves go to the
      later token frame), so first and last frames match first and last token frames.

    Returns:
        (n,) int64 token-frame indices in ``[0, F)``.

    Example:
        >>> temporal_index(13, 49)[[0, 1, 4, 5, 48]].tolist()
        [0, 1, 1, 2, 12]
    """
    if num_token_frames < 1 or num_frames < 1:
        raise ValueError(f"frame counts must be positive, got {num_token_frames} token frames, {num_frames} frames")
    j = torch.arange(num_frames)
    steps, span = num_token_frames - 1, num_frames - 1
    if steps == 0 or span == 0:
        return torch.zeros(num_frames, dtype=torch.int64)
    if span % steps == 0:
        ratio = span // steps
        return (j + ratio - 1) // ratio
    return (2 * j * steps + span) // (2 * span)


def temporal_resample(
    maps: torch.Tensor, num_frames: int, mode: Temporal = "nearest", frames: Sequence[int] | None = None
) -> torch.Tensor:
    """Maps on ``F`` token frames -> maps on ``num_frames`` decoded frames.

    Args:
        maps: (..., F, h, w) float; the frame axis is the third from last.
        num_frames: decoded frame count ``n``.
        mode: ``"nearest"``: each frame takes the token frame that covers it (:func:`temporal_index`);
            ``"linear"``: linear interpolation at position ``j * (F - 1) / (n - 1)`` (align_corners=True:
            first frame = first token frame, last = last).
        frames: only these decoded frame indices (default: all ``n``), so long videos can be
            processed frame by frame.

    Returns:
        (..., len(frames) or n, h, w) float32.
    """
    count = maps.shape[-3]
    wanted = torch.arange(num_frames) if frames is None else torch.as_tensor(list(frames), dtype=torch.int64)
    if wanted.numel() and (int(wanted.min()) < 0 or int(wanted.max()) >= num_frames):
        raise ValueError(f"frame indices must be in [0, {num_frames}), got {wanted.tolist()}")
    maps = maps.float()
    if mode == "nearest":
        return maps.index_select(-3, temporal_index(count, num_frames)[wanted].to(maps.device))
    if mode != "linear":
        raise ValueError(f"temporal mode must be 'nearest' or 'linear', got {mode!r}")
    position = wanted.double() * (count - 1) / max(num_frames - 1, 1)
    low = position.floor().long().clamp(max=count - 1)
    high = (low + 1).clamp(max=count - 1)
    weight = (position - low).float().to(maps.device).view(-1, 1, 1)
    before, after = maps.index_select(-3, low.to(maps.device)), maps.index_select(-3, high.to(maps.device))
    return before * (1 - weight) + after * weight


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
    """Per-pixel argmax over concepts: (B, C, h, w) -> (B, h, w) int64 concept indices.

    Video maps (B, C, F, h, w) give (B, F, h, w).
    """
    return maps.argmax(dim=1)


def binary_mask(maps: torch.Tensor, concept: int) -> torch.Tensor:
    """Foreground mask of one concept: its map above the map's own mean (Chefer et al. 2021).

    Args:
        maps: (B, C, h, w) float, or (B, C, F, h, w) video maps: each frame is thresholded at
            that frame's own mean.
        concept: index of the target concept.

    Returns:
        (B, h, w) bool, or (B, F, h, w).
    """
    target = maps[:, concept]
    return target > target.mean(dim=(-2, -1), keepdim=True)
