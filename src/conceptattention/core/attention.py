"""One-way concept attention: only the C concept query rows are ever computed."""

from __future__ import annotations

import math
from typing import Literal

import torch

ConceptKeys = Literal["both", "image", "concepts"]

# Float32 logits held at once: heads are processed in groups below this many elements, so the
# transient (B, heads, C, C + N) scores stay small next to the block's own activations.
MAX_LOGITS = 2**22


def concept_attention(
    q_c: torch.Tensor,
    k_c: torch.Tensor,
    v_c: torch.Tensor,
    k_x: torch.Tensor,
    v_x: torch.Tensor,
    keys: ConceptKeys = "both",
) -> torch.Tensor:
    """Attention of concept queries over concept and/or image keys.

    Image queries are never formed: the image stream's own attention is the one
    the real forward pass computed, so recomputing it here would be pure waste.

    Args:
        q_c: (B, H, C, D) concept queries.
        k_c: (B, H, C, D) concept keys.
        v_c: (B, H, C, D) concept values.
        k_x: (B, H, N, D) image keys, exactly as used by the real pass (after QK-norm and RoPE).
        v_x: (B, H, N, D) image values.
        keys: ``"both"`` attends over [concepts; image] (the method), ``"image"`` over image keys
            only ("cross only" ablation), ``"concepts"`` over concept keys only ("self only").

    Returns:
        (B, H, C, D) concept attention outputs, in the dtype of ``v_c``.
    """
    per_head = q_c.shape[0] * q_c.shape[2] * (k_c.shape[2] + k_x.shape[2])
    group = max(1, MAX_LOGITS // max(1, per_head))
    if group < q_c.shape[1]:  # heads are independent: attend in groups of heads
        groups = [t.split(group, dim=1) for t in (q_c, k_c, v_c, k_x, v_x)]
        outputs = [concept_attention(q, kc, vc, kx, vx, keys=keys) for q, kc, vc, kx, vx in zip(*groups)]
        return torch.cat(outputs, dim=1)
    scale = 1.0 / math.sqrt(q_c.shape[-1])
    parts: list[tuple[torch.Tensor, torch.Tensor]] = []
    if keys in ("both", "concepts"):
        parts.append((k_c, v_c))
    if keys in ("both", "image"):
        parts.append((k_x, v_x))
    if not parts:
        raise ValueError(f"`keys` must be 'both', 'image' or 'concepts', got {keys!r}")
    # Softmax over the joint key axis, computed from per-part logits so that the image keys and
    # values are never concatenated (which would copy N x D per block).
    logits = torch.cat([q_c @ k.transpose(-1, -2) for k, _ in parts], dim=-1)  # (B, H, C, C + N)
    probs = (logits.float() * scale).softmax(dim=-1).to(v_c.dtype)
    sizes = [k.shape[-2] for k, _ in parts]
    terms = [p @ v for p, (_, v) in zip(probs.split(sizes, dim=-1), parts)]  # each (B, H, C, D)
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]
