"""What every architecture adapter shares: the run state, argument access, attach/detach.

An adapter installs attention processors and block hooks on a stock diffusers
transformer. It never copies model code and never subclasses the model. Concept
data travels through a :class:`TraceState` owned by the session, never through
extra return values of the processors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from conceptattention.config import ConceptAttentionConfig
from conceptattention.core import ScoreAccumulator
from conceptattention.errors import ConceptAttentionError


class StopForward(Exception):
    """Raised after the last used block when the rest of the forward pass is not needed."""


def argument(args: tuple, kwargs: Mapping[str, Any], name: str, position: int) -> Any:
    """Read a call argument given either by keyword or by position (as under checkpointing)."""
    if name in kwargs:
        return kwargs[name]
    return args[position] if position < len(args) else None


@dataclass
class TraceState:
    """Everything one session carries between hooks and processors.

    Attributes:
        config: the validated configuration.
        layers: selected double-stream block indices (sorted).
        concept_states: (C, D_text) pooled concept states before the context embedder.
        accumulator: running sums of saliency over (step, block).
        softmax: whether the softmax over concepts is applied.
        stop_after_last_block: abort the forward after the last selected block (encode mode).
        active: the concept stream runs in the current forward.
        concept_hidden: (B, C, D_model) concept residual stream of the current forward.
        concept_temb: (B, D_model) concept conditioning of the current forward.
        block_cache: per-block values handed from the pre-hook to the processor to the post-hook.
    """

    config: ConceptAttentionConfig
    layers: tuple[int, ...]
    concept_states: torch.Tensor
    accumulator: ScoreAccumulator
    softmax: bool
    stop_after_last_block: bool = False
    active: bool = False
    forward_inputs: dict[str, Any] = field(default_factory=dict)
    concept_hidden: torch.Tensor | None = None
    concept_temb: torch.Tensor | None = None
    block_cache: dict[str, Any] = field(default_factory=dict)

    @property
    def last_block(self) -> int:
        return self.layers[-1]

    def runs_block(self, index: int) -> bool:
        """The concept stream passes through every double block up to the last selected one."""
        return self.active and index <= self.last_block


@dataclass(frozen=True)
class ArchitectureSpec:
    """Per-architecture facts, as data.

    Attributes:
        name: human-readable architecture name.
        transformer_class: the diffusers transformer class name it applies to.
        double_blocks: attribute of the transformer holding the dual-stream (joint) blocks.
        concept_tokenizer: pipeline attribute of the tokenizer used for concepts.
        concept_encoder: pipeline attribute of the text encoder used for concepts.
        default_num_layers: how many of the last double blocks are used by default.
        joint_order: order of the joint sequence in attention, e.g. ``("text", "image")``.
        layout: attention tensor layout, ``"BSHD"`` or ``"BHSD"``.
        latent_patch: latent pixels per token side (Flux packs 2x2 latent patches).
    """

    name: str
    transformer_class: str
    double_blocks: str
    concept_tokenizer: str
    concept_encoder: str
    default_num_layers: int
    joint_order: tuple[str, str]
    layout: str
    latent_patch: int

    def pixels_per_token(self, pipe: Any) -> int:
        """Image pixels per token side: the VAE's scale factor times the latent patch."""
        return int(getattr(pipe, "vae_scale_factor", 1)) * self.latent_patch

    def num_double_blocks(self, transformer: torch.nn.Module) -> int:
        return len(getattr(transformer, self.double_blocks))

    def resolve_layers(self, transformer: torch.nn.Module, layers: tuple[int, ...] | None) -> tuple[int, ...]:
        """Default or validated block indices."""
        count = self.num_double_blocks(transformer)
        if layers is None:
            return tuple(range(max(0, count - self.default_num_layers), count))
        bad = [i for i in layers if i >= count]
        if bad:
            raise ConceptAttentionError(
                f"`layers` contains {bad[0]}, but {type(transformer).__name__} has {count} double-stream blocks "
                f"(valid indices: 0-{count - 1})"
            )
        return layers


class Attachment:
    """Install processors and hooks on a transformer, and undo all of it exactly.

    Every step pushes its undo onto an ``ExitStack``: a failure half-way through the
    attach unwinds what was done, and ``detach`` restores the original processor
    objects (``is``-identical) with no hook handles left.
    """

    def __init__(self, transformer: Any, marker: type) -> None:
        self.transformer = transformer
        self._marker = marker
        self._stack: contextlib.ExitStack | None = None

    def attach(self, install: Callable[[contextlib.ExitStack], None]) -> None:
        if self._stack is not None:
            raise ConceptAttentionError("This trace is already attached; exit it before entering it again.")
        processors = dict(self.transformer.attn_processors)
        if any(isinstance(p, self._marker) for p in processors.values()):
            raise ConceptAttentionError(
                "ConceptAttention is already attached to this transformer (nested or concurrent `trace`); "
                "exit the other trace first."
            )
        stack = contextlib.ExitStack()
        # Pass a copy: set_attn_processor pops the entries of the dict it is given.
        stack.callback(lambda: self.transformer.set_attn_processor(dict(processors)))
        try:
            install(stack)
        except BaseException:
            stack.close()
            raise
        self._stack = stack

    def detach(self) -> None:
        if self._stack is None:
            raise ConceptAttentionError("This trace is not attached; nothing to detach.")
        stack, self._stack = self._stack, None
        stack.close()

    @property
    def attached(self) -> bool:
        return self._stack is not None
