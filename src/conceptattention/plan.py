"""One plan per call: what a pipeline is and what a call will do, resolved once before any compute.

Every entry point (``trace``, ``generate``, ``encode_image`` / ``encode_video``, the eval harness,
the CLI and the web app) resolves the backend, the model's recorded defaults
(``conceptattention.json``, read once), the modality, the layers and the concept encoder into a
frozen :class:`CallPlan` (or, where no concepts are involved yet, a :class:`ModelPlan`) and
passes it down; nothing below re-reads or re-validates them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from conceptattention.adapters import backend_for
from conceptattention.adapters.base import Backend, BlockSelection, ConceptEncoding
from conceptattention.concepts import ConceptEmbeddings, validate_concepts
from conceptattention.config import BlockChoice, ConceptAttentionConfig
from conceptattention.errors import ConceptAttentionError
from conceptattention.loading import model_defaults

Modality = Literal["image", "video"]


@dataclass(frozen=True)
class ModelPlan:
    """A loaded pipeline's backend and recorded defaults.

    Attributes:
        pipe: the pipeline.
        transformer: its transformer.
        backend: the transformer's backend.
        defaults: the call defaults recorded beside the model (``conceptattention.json``; empty if none).
    """

    pipe: Any
    transformer: torch.nn.Module
    backend: Backend
    defaults: Mapping[str, Any]

    @property
    def modality(self) -> Modality:
        return self.backend.spec.modality

    @property
    def pipeline_name(self) -> str:
        return type(self.pipe).__name__

    def require(self, modality: Modality, context: str, instead: str) -> None:
        """The one modality check: refuse unless the model makes ``modality``.

        Args:
            modality: what the caller needs.
            context: what the caller is, e.g. ``"`encode_image` maps images"``.
            instead: what to do instead, e.g. ``"use `conceptattention.encode_video`"``.
        """
        actual = self.modality
        if actual == modality:
            return
        article = "an" if actual == "image" else "a"
        raise ConceptAttentionError(
            f"{context}, and {self.pipeline_name} is {article} {actual} model ({self.backend.spec.name}); {instead}"
        )

    def resolve_blocks(self, layers: BlockChoice, single_layers: BlockChoice = None) -> BlockSelection:
        """Default or validated blocks of each kind (errors name the valid ranges)."""
        return self.backend.resolve_blocks(self.transformer, layers, single_layers)

    def size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """The (height, width) the model takes: given, else the recorded default, else the pipeline's; validated.

        Raises:
            ConceptAttentionError: a side that is not a positive multiple of the pixels per token, or
                larger than a learned position table covers.
        """
        backend, pipe = self.backend, self.pipe
        pixels = backend.encoding.pixels_per_token(pipe)
        largest = backend.encoding.max_pixels_per_side(pipe)
        default = backend.encoding.default_size(pipe)
        size = (height or self.defaults.get("height", default[0]), width or self.defaults.get("width", default[1]))
        for name, value in zip(("height", "width"), size):
            if isinstance(value, bool) or not isinstance(value, int) or value < pixels or value % pixels:
                lower = max(pixels, (value // pixels) * pixels) if isinstance(value, int) else pixels
                raise ConceptAttentionError(
                    f"`{name}`={value!r} cannot be taken by {self.pipeline_name}: it must be a positive multiple of "
                    f"{pixels} (VAE scale x patch size); try {lower} or {lower + pixels}"
                )
            if largest is not None and value > largest:
                raise ConceptAttentionError(
                    f"`{name}`={value!r} is larger than {self.pipeline_name} can take: its position table covers at "
                    f"most {largest} pixels per side; use {largest} or less (a multiple of {pixels})"
                )
        return size

    def max_sequence_length(self, given: int | None = None) -> int:
        """The prompt token budget: given, else the recorded default, else the backend's."""
        recorded = self.defaults.get("max_sequence_length")
        return int(given or recorded or self.backend.default_max_sequence_length(self.pipe))


def model_plan(pipe: Any) -> ModelPlan:
    """The plan of a loaded pipeline, or a clear error when it is not one this package serves."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise ConceptAttentionError(
            f"{type(pipe).__name__} has no `transformer`; pass a diffusers pipeline of a joint-attention MM-DiT "
            "(see `conceptattention.supported_architectures()`)"
        )
    return ModelPlan(pipe, transformer, backend_for(transformer, pipe), dict(model_defaults(pipe)))


@dataclass(frozen=True)
class CallPlan:
    """One call: the model's plan plus the validated concepts, configuration, layers and concept encoder.

    Attributes:
        model: the pipeline's plan.
        concepts: the validated concept words.
        config: the validated configuration.
        blocks: the selected blocks of each kind (the defaults, or ``config.layers`` / ``config.single_layers``
            validated).
        concept_encoder: the concept encoder (the backend's default, or the validated choice).
    """

    model: ModelPlan
    concepts: tuple[str, ...]
    config: ConceptAttentionConfig
    blocks: BlockSelection
    concept_encoder: str

    def concept_encoding(self) -> ConceptEncoding:
        return ConceptEncoding(
            pooling=self.config.pooling,
            encoder=self.concept_encoder,
            max_sequence_length=self.model.defaults.get("max_sequence_length"),
        )

    def encode_concepts(self) -> ConceptEmbeddings:
        """The concepts through the pipeline's own prompt encoder, as the backend prescribes."""
        return self.model.backend.concepts(self.model.pipe, self.concepts, self.concept_encoding())


def call_plan(pipe: Any, concepts: Sequence[str], config: ConceptAttentionConfig) -> CallPlan:
    """Resolve a call before any compute: concepts, backend, defaults, layers and concept encoder, each once."""
    words = validate_concepts(concepts)
    model = pipe if isinstance(pipe, ModelPlan) else model_plan(pipe)
    blocks = model.resolve_blocks(config.layers, config.single_layers)
    encoder = model.backend.concept_encoder(config.concept_encoder)
    return CallPlan(model, words, config, blocks, encoder)
