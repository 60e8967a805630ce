"""The backend interface: what every architecture adapter provides, and the run state it shares.

A backend installs attention processors and block hooks on a stock diffusers
transformer; it never copies model code and never subclasses the model. Everything
that differs between architectures (forward arguments, position ids, concept
encoding, encode-mode recipe, default layers, CFG layout) lives in a backend: the
API modules above (``tracing``, ``encode``, ``generate``) only call this interface.

A backend is composed, not inherited: a frozen :class:`BackendSpec` (facts as data) plus
small typed parts (layer rule, concept encoder, forward reader, concept stream, encode
recipe, pipeline and frame facts). Adding a backend = one module in this package that
builds a :class:`Backend` from its spec and parts, plus its name in ``adapters/__init__.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Literal, Protocol, TypeVar

import torch
from typing_extensions import Self

from conceptattention.concepts import ConceptEmbeddings
from conceptattention.config import BlockChoice, ConceptAttentionConfig, Pooling
from conceptattention.core import ScoreAccumulator, TokenGrid
from conceptattention.errors import ConceptAttentionError

CfgLayout = Literal["separate", "batched"]
BlockKind = Literal["double", "single"]
Conditioning = TypeVar("Conditioning")
Inputs = TypeVar("Inputs", bound="EncodeInputs")
Fact = TypeVar("Fact")


class StopForward(Exception):
    """Raised after the last used block when the rest of the forward pass is not needed."""


@functools.cache
def _forward_parameters(module_class: Any) -> tuple[dict[str, int], dict[str, Any]]:
    """Name -> position (``self`` excluded) and name -> default of a module class's ``forward``, read once."""
    parameters = list(inspect.signature(module_class.forward).parameters.values())[1:]
    positions = {p.name: i for i, p in enumerate(parameters) if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)}
    defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
    return positions, defaults


class CallArguments:
    """The arguments of one module call, read by name through the module class's ``forward`` signature.

    Blocks are called by keyword in a plain forward and positionally under gradient checkpointing
    (and by some transformers always): reading by signature serves both. The signature of each
    class is inspected once and cached, as diffusers' ``_get_parameter_from_args_kwargs`` does.
    """

    __slots__ = ("args", "kwargs", "module_class")

    def __init__(self, module: torch.nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> None:
        self.module_class: Any = type(module)
        self.args = args
        self.kwargs = kwargs

    def __getitem__(self, name: str) -> Any:
        if name in self.kwargs:
            return self.kwargs[name]
        positions, defaults = _forward_parameters(self.module_class)
        if name not in positions and name not in defaults:
            raise ConceptAttentionError(
                f"{self.module_class.__name__}.forward has no argument `{name}`; this diffusers version's block "
                "signature is not the one ConceptAttention supports (diffusers>=0.40)"
            )
        position = positions.get(name)
        if position is not None and position < len(self.args):
            return self.args[position]
        return defaults.get(name)


class TensorFacts(Generic[Fact]):
    """Host facts computed once from a device tensor and kept while that tensor lives.

    Pipelines pass the same position-id tensor at every step of a call, so the token geometry it
    encodes is read to the host once per call, not once per forward.

    Args:
        compute: ``tensor -> facts`` (may read the tensor on the host).
    """

    def __init__(self, compute: Callable[[torch.Tensor], Fact]) -> None:
        self._compute = compute
        self._cache: dict[int, tuple[weakref.ref, Fact]] = {}

    def __call__(self, tensor: torch.Tensor) -> Fact:
        key = id(tensor)
        hit = self._cache.get(key)
        if hit is not None and hit[0]() is tensor:
            return hit[1]
        facts = self._compute(tensor)
        self._cache[key] = (weakref.ref(tensor), facts)
        weakref.finalize(tensor, self._cache.pop, key, None)
        return facts


@dataclass(frozen=True)
class BackendSpec:
    """Per-architecture facts, as data (what a user or a record needs to know about a backend).

    Attributes:
        name: human-readable architecture name, e.g. ``"Flux.1"``.
        transformer_classes: diffusers transformer class names served.
        pipeline_classes: diffusers pipeline class names known to work (for docs and errors).
        processor_classes: stock attention processor class names replaced on traced blocks;
            any other processor there (IP-Adapter, fused, custom) is refused.
        double_blocks: attribute of the transformer holding the dual-stream (joint) blocks
            (``transformer_blocks`` in every diffusers MM-DiT so far); None: the model has none (made only of
            single-stream layers, as Z-Image).
        single_blocks: attribute holding the single-stream blocks that follow them (shared weights for text and
            image), when the backend traces them (``single_transformer_blocks`` in the Flux family); None: none.
        single_processor_classes: stock attention processor class names replaced on traced single-stream blocks.
        attention: attribute of a block holding its joint attention module.
        concept_encoders: names of the prompt encoders concepts can be encoded with; the first
            is the default.
        default_layers: the default-layer rule in words (recorded and documented).
        cfg_layout: ``"separate"`` (the negative prompt is its own forward, skipped) or
            ``"batched"`` ([uncond; cond] in one forward: maps from the conditional half).
        concept_positions: how concept tokens are placed for RoPE (``"none"``: no RoPE on text).
        max_sequence_length: the pipeline's default prompt token budget.
        modality: ``"image"`` (maps (B, C, h, w)) or ``"video"`` (maps (B, C, F, h, w), frame-major tokens).
    """

    name: str
    transformer_classes: tuple[str, ...]
    pipeline_classes: tuple[str, ...]
    processor_classes: tuple[str, ...]
    concept_encoders: tuple[str, ...]
    default_layers: str
    cfg_layout: CfgLayout
    concept_positions: str
    max_sequence_length: int
    modality: Literal["image", "video"] = "image"
    double_blocks: str | None = "transformer_blocks"
    attention: str = "attn"
    single_blocks: str | None = None
    single_processor_classes: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for lists of supported models."""
        return f"{'/'.join(self.transformer_classes)} ({', '.join(self.pipeline_classes)})"


@dataclass(frozen=True)
class ForwardRecord(Generic[Conditioning]):
    """What one traced transformer forward tells the concept stream, read by the backend.

    Attributes:
        timestep: the forward's timestep as the model got it, one element of its (B,) ``timestep`` (a 0-d
            tensor left on the device: reading it on the host would stall a GPU once per forward).
        time_scale: what divides ``timestep`` into the flow-matching time in [0, 1] (1 = pure noise), e.g. 1000.
        grid: layout of the image tokens.
        rows: batch rows whose maps are kept: all, or the conditional half under batched CFG.
        conditioning: the backend's typed record of what the concept conditioning needs.
        target: the image tokens the maps describe, within the image sequence (all of them, or the
            target grid when reference-image tokens follow it, as in image-editing pipelines).
        image: where the image tokens sit in the rows of a single-stream block's joint sequence, when the backend
            knows it from the forward's inputs: a slice of every row (Z-Image: the first N, before its pad tokens
            and the caption), or (B, N) int64 indices per row (Lumina-2: after captions of different lengths);
            None: the last ones, as many as the first dual-stream block's image stream has.
    """

    timestep: torch.Tensor
    time_scale: float
    grid: TokenGrid
    rows: slice
    conditioning: Conditioning
    target: slice = dataclasses.field(default_factory=lambda: slice(None))
    image: slice | torch.Tensor | None = None


def first_timestep(timestep: Any) -> torch.Tensor:
    """The first element of a forward's ``timestep`` (tensor or number) as a 0-d tensor, without a host read."""
    return torch.as_tensor(timestep).flatten()[0]


@dataclass(frozen=True)
class ForwardContext:
    """What the session hands the concept stream for one traced forward (the stream only reads it).

    Attributes:
        record: the backend's record of the forward.
        row_items: (R,) item (image) of each kept batch row, when rows of one forward belong to
            different items (noise draws batched together in encode mode); None: row r is item r.
        num_items: the number of items the maps describe (with ``row_items``).
    """

    record: ForwardRecord
    row_items: torch.Tensor | None = None
    num_items: int | None = None


@dataclass(frozen=True)
class BlockRecord:
    """What the concept stream did in one block of one traced forward, for observers (``trace.on_block``).

    Attributes:
        block: the block index within its kind.
        concept_tokens: (B_rows, C, D_model) the concept residual stream after the block (its attention and
            feed-forward updates), the input of the next block. Valid during the callback; clone it to keep it.
        kind: ``"double"`` (dual-stream) or ``"single"`` (single-stream) block.
    """

    block: int
    concept_tokens: torch.Tensor
    kind: BlockKind = "double"


@dataclass(frozen=True)
class BlockSelection:
    """The blocks a run scores, per kind, and how they map to the order the concept stream passes them.

    Attributes:
        double: dual-stream block indices (ascending; empty: none).
        single: single-stream block indices (ascending; empty: none).
        num_double: the model's dual-stream block count (single-stream block j runs after all of them).
    """

    double: tuple[int, ...]
    single: tuple[int, ...] = ()
    num_double: int = 0

    def __post_init__(self) -> None:
        if not self.double and not self.single:
            raise ConceptAttentionError("no block is selected: give `layers` or `single_layers`")

    @property
    def run_indices(self) -> tuple[int, ...]:
        """(L,) run index of every selected block: double block i is i, single block j is ``num_double + j``."""
        return self.double + tuple(self.num_double + j for j in self.single)

    @property
    def labels(self) -> list[str]:
        """One label per selected block, in run order (the order of per-block maps): ``"double 9"``, ``"single 0"``."""
        return [f"double {i}" for i in self.double] + [f"single {j}" for j in self.single]

    def kind_of(self, run_index: int) -> tuple[BlockKind, int]:
        """(kind, index within the kind) of a run index."""
        if run_index < self.num_double:
            return "double", run_index
        return "single", run_index - self.num_double


@dataclass
class RunState:
    """What one session shares with the hooks and processors it installs.

    The session owns it and is the only writer of ``active`` and ``forward``; processors and
    hooks read it and add to ``accumulator``.

    Attributes:
        config: the validated configuration.
        blocks: the selected blocks of each kind.
        layers: the selected blocks as run indices (sorted): double-stream block i is i, single-stream block j
            is ``num_double + j``, the order the concept stream passes them.
        concepts: the encoded concepts (their backend-private ``extras`` included).
        accumulator: running sums of saliency over (step, block).
        softmax: whether the softmax over concepts is applied.
        stop_after_last_block: abort the forward after the last selected block (encode mode).
        active: the concept stream runs in the current forward.
        forward: the current forward's context (None outside a traced forward).
        observers: callbacks given each block's :class:`BlockRecord` (none by default: nothing is kept).
        run: the current run's number (the session counts a new one at each pipeline call); what the concept stream
            keeps for a run is keyed by it.
    """

    config: ConceptAttentionConfig
    blocks: BlockSelection
    concepts: ConceptEmbeddings
    accumulator: ScoreAccumulator
    softmax: bool
    stop_after_last_block: bool
    active: bool = False
    forward: ForwardContext | None = None
    observers: list[Callable[[BlockRecord], None]] = dataclasses.field(default_factory=list)
    run: int = 0

    @property
    def layers(self) -> tuple[int, ...]:
        return self.blocks.run_indices

    @property
    def last_block(self) -> int:
        return self.layers[-1]

    def runs_block(self, index: int) -> bool:
        """The concept stream passes through every block up to the last selected one."""
        return self.active and index <= self.last_block


@dataclass(frozen=True)
class ConceptEncoding:
    """Concept-encoding choices for one session (passed to :meth:`Backend.encode_concepts`).

    Attributes:
        pooling: ``"first"`` or ``"mean"`` sub-token.
        encoder: one of the backend's ``concept_encoders`` (None: its default).
        max_sequence_length: the prompt token budget (encoders run without a mask see padding).
    """

    pooling: Pooling
    encoder: str | None = None
    max_sequence_length: int | None = None


@dataclass
class EncodeInputs:
    """What every encode-mode forward needs besides the noisy latents; backends add their conditioning.

    Attributes:
        latents: clean, normalised latents in the layout the backend noises (B, c, H', W').
        guidance_scale: guidance embedded in the forward (guidance-distilled models), else None.
    """

    latents: torch.Tensor
    guidance_scale: float | None

    batched_fields: ClassVar[tuple[str, ...]] = ()  # per-image tensor fields besides `latents`

    def rows(self, index: torch.Tensor) -> Self:
        """The inputs of the given images, in order (an image may repeat: one row per noise draw).

        Args:
            index: (R,) int64 image index of each row.
        """
        taken: dict[str, Any] = {name: _take(getattr(self, name), index) for name in ("latents", *self.batched_fields)}
        return dataclasses.replace(self, **taken)


def _take(value: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    return None if value is None else value.index_select(0, index.to(value.device))


ConceptEncoder = Callable[[Any, Sequence[str], ConceptEncoding], ConceptEmbeddings]
"""``(pipe, concepts, encoding) -> ConceptEmbeddings``: each concept encoded on its own with the pipeline's prompt
encoder, (C, D_text) states, backend-private data in ``extras``."""

ForwardReader = Callable[[Any, Mapping[str, Any], bool], ForwardRecord[Conditioning]]
"""``(transformer, its call's arguments, batched_cfg) -> ForwardRecord``: what one traced forward tells the stream."""


def no_dead_blocks(transformer: Any, blocks: torch.nn.ModuleList) -> dict[int, str]:
    """Every block can be scored."""
    return {}


def _last_blocks(count: int, usable: Sequence[int]) -> tuple[int, ...]:
    return tuple(usable[-count:])


def last_blocks(count: int) -> Callable[[Sequence[int]], tuple[int, ...]]:
    """Default-layer rule: the last ``count`` usable blocks (all of them when there are fewer)."""
    return functools.partial(_last_blocks, count)


def later_half(usable: Sequence[int]) -> tuple[int, ...]:
    """Default-layer rule: the later half of the usable blocks."""
    return tuple(usable[len(usable) // 2 :])


def all_but_last(usable: Sequence[int]) -> tuple[int, ...]:
    """Default-layer rule: every usable block but the last (all of them when there is one)."""
    return tuple(usable[:-1]) if len(usable) > 1 else tuple(usable)


@dataclass(frozen=True)
class LayerRule:
    """Which blocks can be scored and which are by default (``spec.default_layers`` says it in words).

    Attributes:
        default: usable dual-stream block indices (ascending) -> the default selection.
        excluded: ``(transformer, its blocks) -> {index: why}``: dual-stream blocks that must never be scored
            (their text queries are untrained).
        single_default: single-stream block indices (ascending) -> the default selection of them; None: none
            (the paper's dual-stream default). Models made only of single-stream layers give one.
    """

    default: Callable[[Sequence[int]], tuple[int, ...]]
    excluded: Callable[[Any, torch.nn.ModuleList], dict[int, str]] = no_dead_blocks
    single_default: Callable[[Sequence[int]], tuple[int, ...]] | None = None


class ConceptStream(Protocol):
    """The part that runs concepts through a model's blocks: installs processors and block hooks."""

    @property
    def processor(self) -> type:
        """The installed processor class (marks a transformer as traced, to refuse a second attach)."""
        ...

    def install(self, backend: Backend, transformer: Any, state: RunState, stack: contextlib.ExitStack) -> None:
        """Install processors and hooks on the blocks 0..last selected, pushing undo steps onto ``stack``."""
        ...


class EncodeRecipe(ABC, Generic[Inputs]):
    """Encode mode for one architecture: real pixels -> clean latents and conditioning -> noised -> one forward."""

    @abstractmethod
    def pixels_per_token(self, pipe: Any) -> int:
        """Image pixels per token side (VAE scale factor x patch size)."""

    @abstractmethod
    def inputs(
        self, pipe: Any, pixels: torch.Tensor, caption: str, guidance_scale: float | None, max_sequence_length: int
    ) -> Inputs:
        """Clean latents and conditioning of real images (B, 3, height, width) in [-1, 1]."""

    @abstractmethod
    def forward(self, pipe: Any, inputs: Inputs, noisy_latents: torch.Tensor, t: float) -> None:
        """One transformer forward on noisy latents at flow-matching time ``t``."""

    def latents(self, pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised latents of (B, 3, height, width) pixels in [-1, 1]: the VAE mode, shifted and scaled."""
        vae = pipe.vae
        latents = vae.encode(pixels.to(pipe._execution_device, vae.dtype)).latent_dist.mode()  # (B, c, H', W')
        latents = (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
        return latents.to(pipe.transformer.dtype)

    def noised(self, pipe: Any, clean: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
        """x_t of clean latents at time ``t``: rectified flow, ``(1 - t) x0 + t eps``."""
        return (1.0 - t) * clean + t * noise

    def default_size(self, pipe: Any) -> tuple[int, int]:
        """(height, width) the pipeline generates by default (its default sample size x VAE scale factor)."""
        side = int(getattr(pipe, "default_sample_size", 64)) * int(getattr(pipe, "vae_scale_factor", 1))
        return side, side

    def max_pixels_per_side(self, pipe: Any) -> int | None:
        """The largest image side the model can take, if it has one (learned position tables)."""
        return None


def guidance_property(pipe: Any) -> bool:
    """Whether the pipeline's current call batches [uncond; cond]: its ``do_classifier_free_guidance``."""
    try:
        return bool(pipe.do_classifier_free_guidance)
    except AttributeError:  # the property reads state set inside the pipeline's __call__
        return False


def no_call_defaults(pipe: Any) -> dict[str, Any]:
    return {}


def any_call(pipe: Any, call: Mapping[str, Any]) -> None:
    return None


@dataclass(frozen=True)
class PipelineFacts:
    """What a backend knows of its pipelines' calls (the defaults serve most).

    Attributes:
        batched_cfg: whether the current call batches [uncond; cond] (read at each run's first forward).
        max_sequence_length: the prompt token budget when neither the call nor the recorded defaults give one
            (None: ``spec.max_sequence_length``).
        call_defaults: pipeline-call arguments ``generate`` sets when the caller does not.
        check_call: refuses call arguments the pipeline needs but lacks, before any compute.
    """

    batched_cfg: Callable[[Any], bool] = guidance_property
    max_sequence_length: Callable[[Any], int] | None = None
    call_defaults: Callable[[Any], dict[str, Any]] = no_call_defaults
    check_call: Callable[[Any, Mapping[str, Any]], None] = any_call


class VideoFacts(ABC):
    """The frame facts of a video model."""

    @abstractmethod
    def frame_layout(self, pipe: Any) -> tuple[int, int]:
        """(r, p_t): decoded frames per latent frame (the causal VAE's temporal compression) and latent frames per
        token frame. A video of n frames is taken when ``(n - 1) % r == 0`` and its ``(n - 1) // r + 1`` latent
        frames are a multiple of ``p_t``.
        """

    @abstractmethod
    def default_num_frames(self, pipe: Any) -> int:
        """Frames the pipeline generates by default."""

    @abstractmethod
    def fps(self, pipe: Any) -> float | None:
        """Frame rate the model's videos are meant to play at (None: unknown)."""

    def decoded_frames(self, pipe: Any, token_frames: int) -> int:
        """Frames of the decoded video whose latents fill ``token_frames`` token frames."""
        r, p_t = self.frame_layout(pipe)
        return (token_frames * p_t - 1) * r + 1


@dataclass(frozen=True)
class Backend(Generic[Inputs, Conditioning]):
    """One architecture: its facts (:attr:`spec`) and the parts the API composes.

    A backend is data, not a subclass: each part is small and generic in the backend's own types
    (``Inputs``, its :class:`EncodeInputs`; ``Conditioning``, what its :class:`ForwardRecord` carries),
    so no part downcasts, and backend-private data (concept positions, whole sequences) travels in
    ``ConceptEmbeddings.extras`` in the backend's own type, never as a field of a shared type.

    Attributes:
        spec: the facts, as data.
        layers: which blocks can be scored, and the default ones.
        concepts: the concept encoder.
        reader: reads each traced forward's record from its arguments.
        stream: runs the concepts through the blocks (processors, hooks, the text path).
        encoding: the encode-mode recipe (real images and videos).
        pipeline: facts of the pipeline's calls.
        video: frame facts (video models only).
    """

    spec: BackendSpec
    layers: LayerRule
    concepts: ConceptEncoder
    reader: ForwardReader[Conditioning]
    stream: ConceptStream
    encoding: EncodeRecipe[Inputs]
    pipeline: PipelineFacts = PipelineFacts()
    video: VideoFacts | None = None

    def __post_init__(self) -> None:
        if (self.video is not None) != (self.spec.modality == "video"):
            raise TypeError(f"{self.spec.name}: frame facts are given exactly for video models")

    # -- blocks and layers ---------------------------------------------------------------------
    def blocks(self, transformer: torch.nn.Module) -> torch.nn.ModuleList:
        """The dual-stream blocks (empty for a model made only of single-stream layers)."""
        name = self.spec.double_blocks
        return torch.nn.ModuleList() if name is None else getattr(transformer, name)

    def num_blocks(self, transformer: torch.nn.Module) -> int:
        return len(self.blocks(transformer))

    def excluded_blocks(self, transformer: torch.nn.Module) -> dict[int, str]:
        """Blocks that must never be scored, with the reason (their text queries are untrained)."""
        return self.layers.excluded(transformer, self.blocks(transformer))

    def usable_blocks(self, transformer: torch.nn.Module) -> list[int]:
        excluded = self.excluded_blocks(transformer)
        return [i for i in range(self.num_blocks(transformer)) if i not in excluded]

    def default_layers(self, transformer: torch.nn.Module) -> tuple[int, ...]:
        """The default block selection (the rule is ``spec.default_layers``)."""
        return self.layers.default(self.usable_blocks(transformer))

    def resolve_layers(self, transformer: torch.nn.Module, layers: BlockChoice) -> tuple[int, ...]:
        """Default or validated dual-stream block indices, with errors naming the valid range.

        Args:
            layers: indices, ``"all"`` (every usable block), ``"none"``, or None (the default).
        """
        if layers is None:
            return self.default_layers(transformer)
        if layers == "none":
            return ()
        count = self.num_blocks(transformer)
        if count == 0:
            singles = self.num_single_blocks(transformer)
            raise ConceptAttentionError(
                f"`layers` selects double-stream blocks, but {type(transformer).__name__} ({self.spec.name}) has "
                f"none: its {singles} blocks are single-stream; select them with `single_layers` (valid indices: "
                f"{_ranges(range(singles))}; CLI: --single-layers)"
            )
        if layers == "all":
            return tuple(self.usable_blocks(transformer))
        bad = [i for i in layers if i >= count]
        if bad:
            raise ConceptAttentionError(
                f"`layers` contains {bad[0]}, but {type(transformer).__name__} has {count} double-stream blocks "
                f"(valid indices: 0-{count - 1})"
            )
        excluded = self.excluded_blocks(transformer)
        for index in layers:
            if index in excluded:
                raise ConceptAttentionError(
                    f"`layers` contains {index}, which cannot be used: {excluded[index]}. Choose among "
                    f"{_ranges(self.usable_blocks(transformer))} (default: {_ranges(self.default_layers(transformer))})"
                )
        return tuple(layers)

    def single_blocks(self, transformer: torch.nn.Module) -> torch.nn.ModuleList | None:
        """The single-stream blocks the backend can trace (None where it has none)."""
        name = self.spec.single_blocks
        return None if name is None else getattr(transformer, name, None)

    def num_single_blocks(self, transformer: torch.nn.Module) -> int:
        blocks = self.single_blocks(transformer)
        return 0 if blocks is None else len(blocks)

    def resolve_single_layers(self, transformer: torch.nn.Module, single_layers: BlockChoice) -> tuple[int, ...]:
        """Default or validated single-stream block indices. The default is none (the paper's dual-stream blocks)
        unless the layer rule gives one (models made only of single-stream layers).

        Args:
            single_layers: indices, ``"all"``, ``"none"``, or None (the default).
        """
        count = self.num_single_blocks(transformer)
        if single_layers is None:
            rule = self.layers.single_default
            return () if rule is None or count == 0 else rule(range(count))
        if single_layers == "none":
            return ()
        name = type(transformer).__name__
        if count == 0:
            why = (
                f"{self.spec.name} is dual-stream throughout" if self.spec.single_blocks is None
                else "this model was built with `num_single_layers=0`"
            )  # fmt: skip
            raise ConceptAttentionError(
                f"`single_layers` was given, but {name} has no single-stream blocks ({why}); select "
                "dual-stream blocks with `layers`"
            )
        if single_layers == "all":
            return tuple(range(count))
        bad = [j for j in single_layers if j >= count]
        if bad:
            raise ConceptAttentionError(
                f"`single_layers` contains {bad[0]}, but {name} has {count} single-stream blocks "
                f"(valid indices: {_ranges(range(count))})"
            )
        return tuple(single_layers)

    def resolve_blocks(
        self, transformer: torch.nn.Module, layers: BlockChoice, single_layers: BlockChoice = None
    ) -> BlockSelection:
        """The blocks of a run, per kind: each default or validated (errors name the valid ranges)."""
        double = self.resolve_layers(transformer, layers)
        single = self.resolve_single_layers(transformer, single_layers)
        if not double and not single:
            if self.num_blocks(transformer) == 0:  # made only of single-stream layers
                raise ConceptAttentionError(
                    "`single_layers='none'` leaves no block to score: select blocks with `single_layers`"
                )
            hint = " or `single_layers`" if self.num_single_blocks(transformer) else ""
            raise ConceptAttentionError(f"`layers='none'` leaves no block to score: select blocks with `layers`{hint}")
        return BlockSelection(double, single, self.num_blocks(transformer))

    # -- concepts and calls --------------------------------------------------------------------
    def concept_encoder(self, choice: str | None) -> str:
        """The concept encoder to use, validated against the backend's choices."""
        encoders = self.spec.concept_encoders
        if choice is None:
            return encoders[0]
        if choice not in encoders:
            raise ConceptAttentionError(
                f"`concept_encoder`={choice!r} is not available for {self.spec.name}; choose one of "
                f"{', '.join(map(repr, encoders))}"
            )
        return choice

    def default_max_sequence_length(self, pipe: Any) -> int:
        """The prompt token budget when neither the call nor the model's recorded defaults give one."""
        budget = self.pipeline.max_sequence_length
        return self.spec.max_sequence_length if budget is None else budget(pipe)

    def install(self, transformer: Any, state: RunState, stack: contextlib.ExitStack) -> None:
        """Install the concept stream on the blocks 0..last selected, pushing undo steps onto ``stack``."""
        self.stream.install(self, transformer, state, stack)

    @property
    def frames(self) -> VideoFacts:
        """The frame facts (video models; callers check ``spec.modality`` first)."""
        if self.video is None:
            raise ConceptAttentionError(f"{self.spec.name} is an image model")
        return self.video


def _ranges(indices: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    parts: list[str] = []
    items = sorted(indices)
    start = prev = items[0] if items else 0
    for index in [*items[1:], None]:
        if index is not None and index == prev + 1:
            prev = index
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if index is not None:
            start = prev = index
    return ", ".join(parts) if items else "none"


def attention_processors(transformer: Any) -> dict[str, Any]:
    """Name -> processor of every attention module, named as diffusers' ``attn_processors`` names them
    (``"<module path>.processor"``); also for transformers without diffusers' attention mixin (Z-Image)."""
    if hasattr(transformer, "attn_processors"):
        return dict(transformer.attn_processors)
    return {
        f"{name}.processor": module.processor
        for name, module in transformer.named_modules()
        if hasattr(module, "set_processor") and hasattr(module, "processor")
    }


def set_attention_processors(transformer: Any, processors: Mapping[str, Any]) -> None:
    """Set the processors named in ``processors`` (names as :func:`attention_processors` gives), the others kept."""
    if hasattr(transformer, "set_attn_processor"):
        every = attention_processors(transformer)
        every.update(processors)
        transformer.set_attn_processor(every)  # it takes every attention module's processor at once
        return
    modules = dict(transformer.named_modules())
    for name, processor in processors.items():
        modules[name.removesuffix(".processor")].set_processor(processor)


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
        processors = attention_processors(self.transformer)
        if any(isinstance(p, self._marker) for p in processors.values()):
            raise ConceptAttentionError(
                "ConceptAttention is already attached to this transformer (nested or concurrent `trace`); "
                "exit the other trace first."
            )
        stack = contextlib.ExitStack()
        stack.callback(lambda: set_attention_processors(self.transformer, processors))
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
