"""Architecture backends: where the hooks go for each supported MM-DiT.

Each backend module defines ``BACKEND``, an instance of a
:class:`~conceptattention.adapters.base.Backend` subclass whose ``spec`` lists the
transformer classes it serves. The registry below is built from those specs: adding a
backend is adding its module name to ``BACKEND_MODULES``. Modules are imported on first
use, so importing the package (or ``conceptattention.core``) does not import diffusers.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import Any

import torch

from conceptattention.adapters.base import Backend
from conceptattention.errors import UnsupportedArchitectureError

BACKEND_MODULES = (
    "conceptattention.adapters.flux",
    "conceptattention.adapters.sd3",
    "conceptattention.adapters.chroma",
    "conceptattention.adapters.qwenimage",
    "conceptattention.adapters.flux2",
    "conceptattention.adapters.cogvideox",
    "conceptattention.adapters.hunyuanvideo",
    "conceptattention.adapters.longcat",
    "conceptattention.adapters.zimage",
    "conceptattention.adapters.lumina2",
)

# Transformers whose text enters only through cross-attention (or that have no text queries at all):
# ConceptAttention needs a joint-attention MM-DiT, where text tokens are queries in the same attention.
CROSS_ATTENTION_ONLY = {
    "WanTransformer3DModel": "Wan 2.1/2.2",
    "WanVACETransformer3DModel": "Wan VACE",
    "SkyReelsV2Transformer3DModel": "SkyReels-V2",
    "SanaTransformer2DModel": "Sana",
    "SanaVideoTransformer3DModel": "Sana-Video",
    "PixArtTransformer2DModel": "PixArt-alpha/Sigma",
    "Transformer2DModel": "PixArt / DiT",
    "HunyuanDiT2DModel": "HunyuanDiT",
    "LuminaNextDiT2DModel": "Lumina-Next",
    "LTXVideoTransformer3DModel": "LTX-Video",
    "LTX2VideoTransformer3DModel": "LTX-2",
    "CosmosTransformer3DModel": "Cosmos",
    "LatteTransformer3DModel": "Latte",
    "AllegroTransformer3DModel": "Allegro",
    "UNet2DConditionModel": "a UNet (SD 1.x/2.x/XL; use DAAM for cross-attention maps)",
}


@cache
def registry() -> dict[str, Backend]:
    """Transformer class name -> backend, built from every backend's spec."""
    table: dict[str, Backend] = {}
    for module_name in BACKEND_MODULES:
        backend: Backend = importlib.import_module(module_name).BACKEND
        for class_name in backend.spec.transformer_classes:
            table[class_name] = backend
    return table


def supported_architectures() -> tuple[str, ...]:
    """One line per supported backend: transformer class and pipelines."""
    return tuple(dict.fromkeys(f"{b.spec.name}: {b.spec.describe()}" for b in registry().values()))


def backend_for(transformer: torch.nn.Module | None, owner: object = None) -> Backend:
    """The backend for a transformer, or a clear error listing what is supported."""
    table = registry()
    for cls in type(transformer).__mro__:
        backend = table.get(cls.__name__)
        if backend is not None:
            return backend
    name = type(transformer).__name__
    what = type(owner).__name__ if owner is not None else name
    supported = "; ".join(supported_architectures())
    for cls in type(transformer).__mro__:
        if cls.__name__ in CROSS_ATTENTION_ONLY:
            raise UnsupportedArchitectureError(
                f"{what} uses {name} ({CROSS_ATTENTION_ONLY[cls.__name__]}), whose text enters through "
                "cross-attention only. ConceptAttention needs a joint-attention MM-DiT, where text tokens are "
                f"queries in the same attention as the image. Supported: {supported}"
            )
    raise UnsupportedArchitectureError(f"{what} with transformer {name} is not supported. Supported: {supported}")


def __getattr__(name: str) -> Any:
    if name == "SUPPORTED_ARCHITECTURES":  # computed on first access: it imports the backends
        return supported_architectures()
    raise AttributeError(name)
