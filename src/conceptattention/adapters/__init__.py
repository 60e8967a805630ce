"""Architecture adapters: where the hooks go for each supported MM-DiT.

Each adapter is described by an :class:`~conceptattention.adapters.base.ArchitectureSpec`
and an ``install`` function; :func:`adapter_for` picks one from a transformer's class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from conceptattention.adapters.base import ArchitectureSpec
from conceptattention.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Adapter:
    """An architecture's facts, install function, processor class (to detect double attach) and encode-mode steps."""

    spec: ArchitectureSpec
    install: Callable
    processor_class: type
    encode_inputs: Callable
    encode_forward: Callable


def _flux() -> Adapter:
    from conceptattention.adapters import flux

    return Adapter(
        flux.FLUX_SPEC,
        flux.install_flux,
        flux.FluxConceptAttnProcessor,
        flux.flux_encode_inputs,
        flux.flux_encode_forward,
    )


# Transformer class name -> adapter factory (imports are deferred so core stays diffusers-free).
_ADAPTERS: dict[str, Callable[[], Adapter]] = {"FluxTransformer2DModel": _flux}

SUPPORTED_ARCHITECTURES = ("FluxTransformer2DModel (FluxPipeline: FLUX.1-schnell, FLUX.1-dev)",)


def adapter_for(transformer: torch.nn.Module | None, owner: object = None) -> Adapter:
    """The adapter for a transformer, or a clear error listing what is supported."""
    for cls in type(transformer).__mro__:
        factory = _ADAPTERS.get(cls.__name__)
        if factory is not None:
            return factory()
    what = type(owner).__name__ if owner is not None else type(transformer).__name__
    raise UnsupportedArchitectureError(
        f"{what} with transformer {type(transformer).__name__} is not supported. Supported: "
        + "; ".join(SUPPORTED_ARCHITECTURES)
    )
