"""The one configuration object of a ConceptAttention run, validated once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from conceptattention.core import ConceptKeys, ScoreSpace
from conceptattention.errors import ConceptAttentionError

Pooling = Literal["first", "mean"]

_SCORE_SPACES = ("output", "cross_attention", "value")
_CONCEPT_KEYS = ("both", "image", "concepts")
_POOLINGS = ("first", "mean")


def _index_tuple(name: str, value: Sequence[int] | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConceptAttentionError(f"`{name}` must be a list of non-negative integers or None, got {value!r}")
    items = list(value)
    if not items:
        raise ConceptAttentionError(f"`{name}` is empty: give at least one index, or None for the default")
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise ConceptAttentionError(f"`{name}` must contain non-negative integers (indices), but contains {item!r}")
    return tuple(sorted(set(items)))


@dataclass(frozen=True)
class ConceptAttentionConfig:
    """What to compute and where.

    Args:
        layers: double-stream (joint) block indices to score, e.g. ``(9, ..., 18)``. ``None``
            uses the backend's default (Flux.1: the last 10 double-stream blocks; SD3: the later
            half of the joint blocks without the pre-only last one).
        steps: denoising step indices to score in generate/trace mode (``0`` is the first,
            noisiest step). ``None`` uses every step. Ignored by ``encode_image``.
        score_space: ``"output"`` (ConceptAttention), ``"cross_attention"`` (image queries
            against concept keys, softmax over concepts, mean over heads) or ``"value"``.
        concept_keys: keys the concept queries attend to: ``"both"`` (concepts and image,
            default), ``"image"`` or ``"concepts"``. It shapes the concept residual stream in
            every score space (the value-space score itself is ``v_c . v_x``).
        softmax: softmax over concepts per block and timestep. ``None`` (default) means on
            when more than one concept is given; with one concept the map is min-max scaled.
        pooling: one vector per concept from its own sub-tokens: ``"first"`` sub-token
            (the paper's choice) or ``"mean"`` over the concept's non-special sub-tokens.
        per_block: also keep one map per selected block (for per-block sweeps).
        concept_encoder: which of the model's prompt encoders encodes the concepts; ``None``
            uses the backend's default (Flux.1: ``"t5"``; SD3: ``"t5"``, or ``"clip"``).

    Example:
        >>> ConceptAttentionConfig(layers=[15, 16, 17, 18], score_space="output").layers
        (15, 16, 17, 18)
    """

    layers: tuple[int, ...] | None = None
    steps: tuple[int, ...] | None = None
    score_space: ScoreSpace = "output"
    concept_keys: ConceptKeys = "both"
    softmax: bool | None = None
    pooling: Pooling = "first"
    per_block: bool = False
    concept_encoder: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _index_tuple("layers", self.layers))
        object.__setattr__(self, "steps", _index_tuple("steps", self.steps))
        for name, value, allowed in (
            ("score_space", self.score_space, _SCORE_SPACES),
            ("concept_keys", self.concept_keys, _CONCEPT_KEYS),
            ("pooling", self.pooling, _POOLINGS),
        ):
            if value not in allowed:
                raise ConceptAttentionError(f"`{name}` must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        if self.concept_encoder is not None and not isinstance(self.concept_encoder, str):
            raise ConceptAttentionError(f"`concept_encoder` must be a string or None, got {self.concept_encoder!r}")
        if self.softmax is not None and not isinstance(self.softmax, bool):
            raise ConceptAttentionError(f"`softmax` must be True, False or None (auto), got {self.softmax!r}")

    def use_softmax(self, num_concepts: int) -> bool:
        """Whether the softmax over concepts is applied for ``num_concepts`` concepts."""
        return num_concepts > 1 if self.softmax is None else self.softmax

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable view."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
