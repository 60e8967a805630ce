"""conceptattention: where a multi-modal diffusion transformer puts each word.

ConceptAttention (Helbling et al., ICML 2025) on stock diffusers pipelines.

Example:
    >>> import conceptattention as ca  # doctest: +SKIP
    >>> pipe = ca.load_pipeline("black-forest-labs/FLUX.1-schnell", dtype="bfloat16", device="cuda")  # doctest: +SKIP
    >>> maps = ca.generate(pipe, "a dog on the grass", ["dog", "grass", "sky"], num_inference_steps=4)  # doctest: +SKIP
    >>> maps.save("outputs/dog")  # doctest: +SKIP
"""

from conceptattention.adapters import supported_architectures
from conceptattention.config import ConceptAttentionConfig
from conceptattention.encode import encode_image, encode_video
from conceptattention.errors import ConceptAttentionError, UnsupportedArchitectureError, WeightsNotFoundError
from conceptattention.generate import generate
from conceptattention.loading import load_pipeline
from conceptattention.outputs import ConceptMaps
from conceptattention.tracing import trace

__version__ = "0.1.0"

__all__ = [
    "ConceptAttentionConfig",
    "ConceptAttentionError",
    "ConceptMaps",
    "UnsupportedArchitectureError",
    "WeightsNotFoundError",
    "encode_image",
    "encode_video",
    "generate",
    "load_pipeline",
    "supported_architectures",
    "trace",
]


def __getattr__(name: str):
    if name == "SUPPORTED_ARCHITECTURES":  # imports every backend (and diffusers) on first access
        return supported_architectures()
    raise AttributeError(name)
