"""``trace``: attach ConceptAttention to a pipeline, run it as usual, read the maps."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import Any

import torch

from conceptattention.adapters import Adapter, adapter_for
from conceptattention.adapters.base import Attachment, TraceState
from conceptattention.concepts import ConceptEmbeddings, encode_concepts, validate_concepts
from conceptattention.config import ConceptAttentionConfig
from conceptattention.core import Normalization, ScoreAccumulator, finalize_maps, tokens_to_grid
from conceptattention.errors import ConceptAttentionError
from conceptattention.outputs import ConceptMaps, library_versions

logger = logging.getLogger(__name__)


def _normalization(softmax: bool, num_concepts: int) -> Normalization:
    if softmax:
        return "softmax"
    return "minmax" if num_concepts == 1 else "none"


class ConceptSession:
    """Concept attention attached to one transformer; the engine behind ``trace`` and ``encode_image``.

    A *run* is one pipeline call (or one encode call); maps are averaged over the
    selected (step, block) pairs of the latest run. Use as a context manager.

    Args:
        transformer: a supported diffusers transformer (see ``SUPPORTED_ARCHITECTURES``).
        embeddings: the encoded concepts.
        concepts: the concept words, in the order of ``embeddings``.
        config: what to compute.
        scheduler: when given, steps are read from ``scheduler.step_index`` and a new
            ``scheduler.timesteps`` marks a new run; repeated forwards at one step (the
            negative pass of true CFG) are not traced. Without it, every forward is the next step.
        owner: the pipeline, for error messages and metadata.
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        embeddings: ConceptEmbeddings,
        concepts: Sequence[str],
        config: ConceptAttentionConfig,
        *,
        scheduler: Any = None,
        owner: Any = None,
        adapter: Adapter | None = None,
    ) -> None:
        self.transformer = transformer
        self.adapter = adapter or adapter_for(transformer, owner)
        self.concepts = tuple(concepts)
        self.config = config
        self.embeddings = embeddings
        self.scheduler = scheduler
        self.owner = owner
        self.layers = self.adapter.spec.resolve_layers(transformer, config.layers)
        softmax = config.use_softmax(len(self.concepts))
        if softmax and len(self.concepts) == 1:
            raise ConceptAttentionError(
                "`softmax=True` with a single concept gives a constant map; add concepts or leave `softmax=None`"
            )
        self.state = TraceState(
            config=config,
            layers=self.layers,
            concept_states=embeddings.states,
            accumulator=ScoreAccumulator(self.layers, per_block=config.per_block),
            softmax=softmax,
        )
        self.normalization = _normalization(softmax, len(self.concepts))
        self._attachment = Attachment(transformer, marker=self.adapter.processor_class)
        # Inspected once: reading the signature on every forward is measurable on small models.
        self._forward_signature = inspect.signature(transformer.forward)
        self._reset_run(run_token=None)

    # -- attach / detach -------------------------------------------------------------------
    def __enter__(self) -> ConceptSession:
        self._attachment.attach(
            lambda stack: self.adapter.install(self.transformer, self.state, stack, self._on_forward_start)
        )
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._attachment.detach()

    # -- run bookkeeping (host-side, no device syncs per layer) ------------------------------
    def _reset_run(self, run_token: object) -> None:
        self._run_token = run_token
        self._steps_seen: set[int] = set()
        self._step_timesteps: dict[int, torch.Tensor] = {}
        self._grid: tuple[int, int] | None = None
        self.state.accumulator.reset()

    def _step_key(self) -> tuple[object, int]:
        if self.scheduler is None:
            return self._run_token, len(self._steps_seen)
        step = self.scheduler.step_index
        return self.scheduler.timesteps, 0 if step is None else int(step)

    def start_run(self) -> None:
        """Forget the current run's maps (a new pipeline call does this by itself)."""
        self._reset_run(run_token=object() if self.scheduler is None else None)

    def _on_forward_start(self, transformer, args: tuple, kwargs: dict) -> None:
        state = self.state
        token, step = self._step_key()
        if token is not self._run_token:
            self._reset_run(token)
        if step in self._steps_seen:
            state.active = False  # a second forward at this step: the negative branch of true CFG
            return
        self._steps_seen.add(step)
        selected = self.config.steps is None or step in self.config.steps
        state.active = selected
        state.concept_hidden = None
        if not selected:
            return
        inputs = dict(self._forward_signature.bind_partial(*args, **kwargs).arguments)
        state.forward_inputs = {k: inputs.get(k) for k in ("timestep", "guidance", "pooled_projections")}
        self._step_timesteps[step] = inputs["timestep"]
        if self._grid is None:
            self._grid = self._grid_from_ids(inputs["img_ids"], inputs["hidden_states"].shape[1])

    @staticmethod
    def _grid_from_ids(img_ids: torch.Tensor, num_tokens: int) -> tuple[int, int]:
        ids = img_ids[0] if img_ids.ndim == 3 else img_ids  # (N, 3): (unused, row, column)
        h, w = (int(v) + 1 for v in ids[-1, 1:3].tolist())  # once per run, not per layer
        if h * w != num_tokens:
            raise ConceptAttentionError(
                f"The image position ids describe a {h}x{w} grid but there are {num_tokens} image tokens; "
                "image-conditioned variants with extra tokens are not supported"
            )
        return h, w

    # -- results -----------------------------------------------------------------------------
    @property
    def steps_run(self) -> int:
        """Number of denoising steps observed in the current run."""
        return len(self._steps_seen)

    def used_steps(self) -> list[int]:
        """Indices of the traced steps of the current run."""
        return sorted(self._step_timesteps)

    def used_timesteps(self) -> list[float]:
        """Timestep values (as the transformer received them, in [0, 1]) of the traced steps."""
        return [float(self._step_timesteps[s].flatten()[0]) for s in self.used_steps()]

    def check_steps(self) -> None:
        steps = self.config.steps
        if steps is not None and self.steps_run and steps[-1] >= self.steps_run:
            raise ConceptAttentionError(
                f"`steps` contains {steps[-1]}, but the pipeline ran {self.steps_run} denoising steps "
                f"(valid indices: 0-{self.steps_run - 1})"
            )

    def token_maps(self) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]:
        """(B, C, h, w) maps, optional (L, B, C, h, w) per-block maps, and the grid (h, w)."""
        self.check_steps()
        accumulator = self.state.accumulator
        if accumulator.count == 0 or self._grid is None:
            raise ConceptAttentionError(
                "No concept maps recorded: run the pipeline inside `with trace(...)` (and check that the "
                "selected `steps` were run)"
            )
        maps = tokens_to_grid(finalize_maps(accumulator.mean(), self.normalization), self._grid)
        block_maps = None
        if self.config.per_block:
            block_maps = tokens_to_grid(finalize_maps(accumulator.block_means(), self.normalization), self._grid)
        return maps, block_maps, self._grid

    def metadata(self) -> dict[str, Any]:
        """What was used, for the record (JSON-serialisable)."""
        transformer = self.transformer
        name = getattr(getattr(self.owner, "config", None), "_name_or_path", None) or getattr(
            transformer.config, "_name_or_path", None
        )
        return {
            "model": name or type(transformer).__name__,
            "architecture": self.adapter.spec.name,
            "transformer_class": type(transformer).__name__,
            "dtype": str(next(transformer.parameters()).dtype).replace("torch.", ""),
            "concepts": list(self.concepts),
            "concept_tokens": {c: list(t) for c, t in zip(self.concepts, self.embeddings.tokens)},
            "layers": list(self.layers),
            "num_double_blocks": self.adapter.spec.num_double_blocks(transformer),
            "score_space": self.config.score_space,
            "concept_keys": None if self.config.score_space == "value" else self.config.concept_keys,
            "softmax": self.state.softmax,
            "normalization": self.normalization,
            "pooling": self.config.pooling,
            "grid": list(self._grid) if self._grid else None,
            "versions": library_versions(),
        }


def pipeline_components(pipe: Any) -> tuple[torch.nn.Module, Adapter]:
    """The transformer of a pipeline and its adapter, or a clear error."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise ConceptAttentionError(
            f"{type(pipe).__name__} has no `transformer`; pass a diffusers pipeline of an MM-DiT such as FluxPipeline"
        )
    return transformer, adapter_for(transformer, pipe)


def encode_pipeline_concepts(pipe: Any, adapter: Adapter, concepts: Sequence[str], pooling) -> ConceptEmbeddings:
    """Encode concepts with the pipeline's prompt encoder named by the adapter's spec."""
    spec = adapter.spec
    tokenizer = getattr(pipe, spec.concept_tokenizer, None)
    encoder = getattr(pipe, spec.concept_encoder, None)
    if tokenizer is None or encoder is None:
        raise ConceptAttentionError(
            f"The pipeline has no `{spec.concept_encoder}`/`{spec.concept_tokenizer}`; {spec.name} concepts are "
            "encoded with the prompt text encoder, so load the pipeline with its text encoders"
        )
    return encode_concepts(concepts, tokenizer, encoder, pipe._execution_device, pooling)


class trace:  # noqa: N801 - a context manager used like a function, as DAAM's `trace`
    """Attach ConceptAttention to a pipeline for the duration of a ``with`` block.

    Inside the block, call the pipeline exactly as usual; afterwards read the maps of
    the latest call with :meth:`maps`. On exit (also on exceptions) the pipeline is
    restored: same processor objects, no hooks left.

    Args:
        pipe: a diffusers pipeline of a supported MM-DiT (``FluxPipeline``).
        concepts: concept words, e.g. ``["dog", "tree", "sky"]`` (1-64, unique, non-blank).
        config: a :class:`ConceptAttentionConfig`; keyword overrides are applied on top.
        **overrides: fields of :class:`ConceptAttentionConfig`, e.g. ``layers=[15, 16, 17, 18]``.

    Example:
        >>> with trace(pipe, ["dog", "grass", "sky"]) as tc:  # doctest: +SKIP
        ...     out = pipe("a dog on the grass", num_inference_steps=4)
        >>> maps = tc.maps(images=out.images)  # doctest: +SKIP
        >>> maps.maps.shape  # (B, C, h, w)  # doctest: +SKIP
    """

    def __init__(
        self,
        pipe: Any,
        concepts: Sequence[str],
        config: ConceptAttentionConfig | None = None,
        **overrides: Any,
    ) -> None:
        self.pipe = pipe
        self.concepts = validate_concepts(concepts)
        self.config = config_with_overrides(config, overrides)
        self.transformer, self.adapter = pipeline_components(pipe)
        self.adapter.spec.resolve_layers(self.transformer, self.config.layers)  # fail before encoding
        self._session: ConceptSession | None = None
        self._finished: ConceptSession | None = None  # kept after exit so maps stay readable

    def __enter__(self) -> trace:
        if self._session is not None:
            raise ConceptAttentionError("This trace is already entered; exit it before entering it again.")
        embeddings = encode_pipeline_concepts(self.pipe, self.adapter, self.concepts, self.config.pooling)
        session = ConceptSession(
            self.transformer,
            embeddings,
            self.concepts,
            self.config,
            scheduler=getattr(self.pipe, "scheduler", None),
            owner=self.pipe,
            adapter=self.adapter,
        )
        session.__enter__()
        self._session = session
        return self

    def __exit__(self, *exc_info: object) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.__exit__(*exc_info)
            self._finished = session

    def maps(self, images: Sequence[Any] | None = None) -> ConceptMaps:
        """Maps of the latest pipeline call (inside or after the ``with`` block).

        Args:
            images: the pipeline's output images (PIL), attached for overlays and saving.

        Returns:
            :class:`ConceptMaps` with ``maps`` of shape (B, C, h, w).
        """
        session = self._session or self._finished
        if session is None:
            raise ConceptAttentionError(
                "No concept maps recorded: run the pipeline inside `with trace(pipe, concepts) as tc:`"
            )
        maps, block_maps, grid = session.token_maps()
        pixels = self.adapter.spec.pixels_per_token(self.pipe)
        metadata = session.metadata()
        metadata.update(
            mode="generate",
            steps=session.used_steps(),
            num_steps_run=session.steps_run,
            timesteps=session.used_timesteps(),
        )
        return ConceptMaps(
            maps=maps.cpu(),
            concepts=self.concepts,
            image_size=(grid[0] * pixels, grid[1] * pixels),
            images=list(images) if images is not None else None,
            block_maps=block_maps.cpu() if block_maps is not None else None,
            metadata=metadata,
        )


def config_with_overrides(config: ConceptAttentionConfig | None, overrides: dict[str, Any]) -> ConceptAttentionConfig:
    """``config`` (or the default) with keyword overrides applied and validated."""
    config = config or ConceptAttentionConfig()
    if not overrides:
        return config
    fields = set(ConceptAttentionConfig.__dataclass_fields__)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConceptAttentionError(f"Unknown option(s) {unknown}; valid options: {sorted(fields)}")
    return ConceptAttentionConfig(**{**config.to_dict(), **overrides})
