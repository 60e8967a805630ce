"""What every tiny test pipeline shares."""

from __future__ import annotations

import torch


def cast(model, dtype: torch.dtype):
    """``model`` in ``dtype``; the no-op float32 cast is skipped (it triggers diffusers' "keep in float32" warning)."""
    return model.to(dtype=dtype) if dtype != torch.float32 else model
