"""The one configuration object of a ConceptAttention run, validated once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from conceptattention.core import ConceptKeys, ScoreSpace
from conceptattention.errors import ConceptAttentionError

Pooling = Literal["first", "mean"]
BlockChoice = tuple[int, ...] | Literal["all", "none"] | None
"""Blocks of one kind: indices, ``"all"`` (every usable one), ``"none"``, or None (the backend's default)."""

_SCORE_SPACES = ("output", "cross_attention", "value")
_CONCEPT_KEYS = ("both", "image", "concepts")
_POOLINGS = ("first", "mean")


_BLOCK_WORDS = ("all", "none")


def _block_choice(name: str, value: Any) -> BlockChoice:
    """Indices (sorted, unique), ``"all"``, ``"none"`` or None, validated."""
    if isinstance(value, str):
        if value not in _BLOCK_WORDS:
            raise ConceptAttentionError(
                f"`{name}` must be a list of block indices, 'all', 'none' or None (the default), got {value!r}"
            )
        return value  # type: ignore[return-value]
    return _index_tuple(name, value, empty="give at least one index, 'none', or None for the default")


def _index_tuple(
    name: str, value: Sequence[int] | None, empty: str = "give at least one index, or None for the default"
) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConceptAttentionError(f"`{name}` must be a list of non-negative integers or None, got {value!r}")
    items = list(value)
    if not items:
        raise ConceptAttentionError(f"`{name}` is empty: {empty}")
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise ConceptAttentionError(f"`{name}` must contain non-negative integers (indices), but contains {item!r}")
    return tuple(sorted(set(items)))


@dataclass(frozen=True)
class ConceptAttentionConfig:
    """What to compute and where.

    Args:
        layers: double-stream (joint) block indices to score, e.g. ``(9, ..., 18)``, ``"all"``
            (every usable one) or ``"none"``. ``None`` uses the backend's default (Flux.1: the last
            10 double-stream blocks; SD3: the later half of the joint blocks without the pre-only
            last one).
        single_layers: single-stream block indices to score (Flux.1: 0-37 of the 38 blocks after
            the double-stream ones), ``"all"`` or ``"none"``. ``None`` uses the backend's default:
            none in every dual-stream model (the paper scores double-stream blocks only). The concept
            stream runs through every block up to the last selected one of either kind.
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

    layers: BlockChoice = None
    single_layers: BlockChoice = None
    steps: tuple[int, ...] | None = None
    score_space: ScoreSpace = "output"
    concept_keys: ConceptKeys = "both"
    softmax: bool | None = None
    pooling: Pooling = "first"
    per_block: bool = False
    concept_encoder: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _block_choice("layers", self.layers))
        object.__setattr__(self, "single_layers", _block_choice("single_layers", self.single_layers))
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
