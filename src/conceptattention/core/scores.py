"""Per-block concept saliency scores in the three spaces the method compares."""

from __future__ import annotations

import math
from typing import Literal

import torch

ScoreSpace = Literal["output", "cross_attention", "value"]

# Image tokens upcast to float32 at a time: a half-precision (B, N, H * D) tensor is never copied
# whole (at 1024 px, B = 5 draws, that copy would be 250 MB per block).
CHUNK_TOKENS = 1024


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> (B, S, H * D)."""
    return x.transpose(1, 2).flatten(2)


def _float_product(rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``rows.float() @ tokens.float().transpose(-1, -2)``, upcasting ``tokens`` (..., N, K) in chunks of N.

    Args:
        rows: (..., R, K) a few rows (concepts).
        tokens: (..., N, K) many rows (image tokens).

    Returns:
        (..., R, N) float32.
    """
    rows = rows.float()
    if tokens.dtype == torch.float32:
        return rows @ tokens.transpose(-1, -2)
    parts = [rows @ part.float().transpose(-1, -2) for part in tokens.split(CHUNK_TOKENS, dim=-2)]
    return torch.cat(parts, dim=-1)


def output_space_scores(o_c: torch.Tensor, o_x: torch.Tensor) -> torch.Tensor:
    """Dot products of attention outputs: the ConceptAttention saliency.

    Both inputs are taken *before* the output projections: image and text streams
    project with different matrices, so scoring after them compares two spaces.

    Args:
        o_c: (B, C, H * D) concept attention outputs, heads concatenated.
        o_x: (B, N, H * D) image attention outputs from the real pass, heads concatenated.

    Returns:
        (B, C, N) float32 scores.
    """
    return _float_product(o_c, o_x)


def value_space_scores(v_c: torch.Tensor, v_x: torch.Tensor) -> torch.Tensor:
    """Dot products of value vectors (ablation).

    Args:
        v_c: (B, H, C, D) concept values.
        v_x: (B, H, N, D) image values.

    Returns:
        (B, C, N) float32 scores.
    """
    return _float_product(_merge_heads(v_c), _merge_heads(v_x))


def cross_attention_scores(q_x: torch.Tensor, k_c: torch.Tensor, softmax: bool = True) -> torch.Tensor:
    """Image-query / concept-key attention, averaged over heads (the cross-attention baseline).

    Args:
        q_x: (B, H, N, D) image queries as used by the real pass (after QK-norm and RoPE).
        k_c: (B, H, C, D) concept keys.
        softmax: softmax over concepts per head (the baseline); off gives raw scaled logits.

    Returns:
        (B, C, N) float32, mean over heads.
    """
    logits = _float_product(k_c, q_x) / math.sqrt(q_x.shape[-1])  # (B, H, C, N)
    if softmax:
        logits = logits.softmax(dim=-2)  # over concepts
    return logits.mean(dim=1)  # (B, C, N)


def block_saliency(
    space: ScoreSpace,
    *,
    o_c: torch.Tensor,
    o_x: torch.Tensor,
    q_x: torch.Tensor,
    k_c: torch.Tensor,
    v_c: torch.Tensor,
    v_x: torch.Tensor,
    softmax: bool,
) -> torch.Tensor:
    """Normalised saliency of one block at one timestep, ready to be accumulated.

    Args:
        space: which score to compute.
        o_c: (B, C, H * D) concept attention outputs, heads concatenated.
        o_x: (B, N, H * D) image attention outputs of the real pass, heads concatenated.
        q_x: (B, H, N, D) image queries; k_c: (B, H, C, D) concept keys.
        v_c: (B, H, C, D) concept values; v_x: (B, H, N, D) image values.
        softmax: apply the softmax over concepts (exactly once, whatever the space).

    Returns:
        (B, C, N) float32.
    """
    if space == "cross_attention":
        # The softmax over concepts is part of this baseline's definition: apply it per head only.
        return cross_attention_scores(q_x, k_c, softmax=softmax)
    if space == "output":
        scores = output_space_scores(o_c, o_x)
    elif space == "value":
        scores = value_space_scores(v_c, v_x)
    else:
        raise ValueError(f"`score_space` must be 'output', 'cross_attention' or 'value', got {space!r}")
    return scores.softmax(dim=1) if softmax else scores
