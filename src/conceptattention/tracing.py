"""``trace``: attach ConceptAttention to a pipeline, run it as usual, read the maps.

Nothing here knows an architecture: every per-model fact comes from the backend
(:mod:`conceptattention.adapters`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from conceptattention.adapters import backend_for
from conceptattention.adapters.base import Attachment, Backend, BlockRecord, BlockSelection, ForwardContext, RunState
from conceptattention.concepts import ConceptEmbeddings
from conceptattention.config import ConceptAttentionConfig
from conceptattention.core import Normalization, ScoreAccumulator, TokenGrid, finalize_maps, tokens_to_grid
from conceptattention.errors import ConceptAttentionError
from conceptattention.outputs import ConceptMaps, EncodeDetails, GenerateDetails, RunRecord, library_versions
from conceptattention.plan import CallPlan, call_plan
from conceptattention.steps import StepCounter

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
        transformer: a supported diffusers transformer (see ``supported_architectures()``).
        embeddings: the encoded concepts.
        concepts: the concept words, in the order of ``embeddings``.
        config: what to compute.
        backend: the transformer's backend (found from its class when omitted).
        pipeline: the pipeline whose calls drive the forwards: steps are read from its
            ``scheduler.step_index`` (a new ``scheduler.timesteps`` marks a new run; repeated
            forwards at one step, such as a separate negative-prompt pass, are not traced) and
            batched classifier-free guidance from its ``do_classifier_free_guidance``. Without
            it, every forward is the next step and there is no guidance batch.
        owner: the pipeline, for error messages and the record (defaults to ``pipeline``).
        stop_after_last_block: abort each forward after the last selected block (encode mode).
        blocks: the blocks, already resolved by the call's plan (default: resolved from ``config``).
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        embeddings: ConceptEmbeddings,
        concepts: Sequence[str],
        config: ConceptAttentionConfig,
        *,
        backend: Backend | None = None,
        pipeline: Any = None,
        owner: Any = None,
        stop_after_last_block: bool = False,
        blocks: BlockSelection | None = None,
    ) -> None:
        self.transformer = transformer
        self.owner = owner if owner is not None else pipeline
        self.backend = backend or backend_for(transformer, self.owner)
        self.concepts = tuple(concepts)
        self.config = config
        self.embeddings = embeddings
        self.pipeline = pipeline
        if blocks is None:
            blocks = self.backend.resolve_blocks(transformer, config.layers, config.single_layers)
        self.blocks = blocks
        softmax = config.use_softmax(len(self.concepts))
        if softmax and len(self.concepts) == 1:
            raise ConceptAttentionError(
                "`softmax=True` with a single concept gives a constant map; add concepts or leave `softmax=None`"
            )
        self.state = RunState(
            config=config,
            blocks=blocks,
            concepts=embeddings,
            accumulator=ScoreAccumulator(blocks.run_indices, per_block=config.per_block),
            softmax=softmax,
            stop_after_last_block=stop_after_last_block,
        )
        self.steps = StepCounter(pipeline)
        self._rows: tuple[torch.Tensor, int] | None = None  # (row items, item count) of the next forwards
        self.normalization = _normalization(softmax, len(self.concepts))
        self._attachment = Attachment(transformer, marker=self.backend.stream.processor)
        # Inspected once: reading the signature on every forward is measurable on small models.
        self._forward_signature = inspect.signature(transformer.forward)
        self._reset_run()

    # -- attach / detach -------------------------------------------------------------------
    def __enter__(self) -> ConceptSession:
        def install(stack) -> None:
            hook = self.transformer.register_forward_pre_hook(self._on_forward_start, with_kwargs=True, prepend=True)
            stack.callback(hook.remove)
            self.backend.install(self.transformer, self.state, stack)

        self._attachment.attach(install)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._attachment.detach()

    # -- run bookkeeping (host-side: nothing here reads a device tensor) ----------------------
    def _reset_run(self) -> None:
        self._step_times: dict[int, tuple[torch.Tensor, float]] = {}  # step -> (timestep on the device, scale)
        self._grid: TokenGrid | None = None
        self._conditional_half = False
        self._run_cfg: bool | None = None
        self.state.accumulator.reset()
        self.state.run += 1

    def start_run(self) -> None:
        """Forget the current run's maps (a new pipeline call does this by itself)."""
        self.steps.start_run()
        self._reset_run()

    @contextlib.contextmanager
    def rows_of_items(self, row_items: torch.Tensor, num_items: int) -> Iterator[None]:
        """Forwards inside the block carry rows of several items: row r of the batch belongs to item ``row_items[r]``.

        Encode mode batches noise draws of several images into one forward; the maps are then
        averaged per item, however the rows were batched.

        Args:
            row_items: (R,) int64 item of each batch row, on the model's device.
            num_items: how many items the maps describe.
        """
        self._rows = (row_items, num_items)
        try:
            yield
        finally:
            self._rows = None

    def _batched_cfg(self) -> bool:
        """Whether this run's forwards batch [uncond; cond], decided at the run's first forward."""
        if self._run_cfg is None:
            batched = self.pipeline is not None and self.backend.spec.cfg_layout == "batched"
            self._run_cfg = batched and self.backend.pipeline.batched_cfg(self.pipeline)
        return self._run_cfg

    def _on_forward_start(self, transformer, args: tuple, kwargs: dict) -> None:
        state = self.state
        state.forward = None
        where = self.steps.observe()
        if where.new_run:
            self._reset_run()
        if where.repeat:
            state.active = False  # a second forward at this step: a separate guidance pass
            return
        selected = self.config.steps is None or where.step in self.config.steps
        state.active = selected
        if not selected:
            return
        inputs = self._forward_signature.bind_partial(*args, **kwargs).arguments
        batched_cfg = self._batched_cfg()
        record = self.backend.reader(transformer, inputs, batched_cfg)
        row_items, num_items = self._rows if self._rows is not None else (None, None)
        state.forward = ForwardContext(record, row_items, num_items)
        self._conditional_half = self._conditional_half or batched_cfg
        self._step_times[where.step] = (record.timestep, record.time_scale)
        if self._grid is None:
            self._grid = record.grid

    # -- results -----------------------------------------------------------------------------
    @property
    def steps_run(self) -> int:
        """Number of denoising steps observed in the current run."""
        return self.steps.steps_run

    def used_steps(self) -> list[int]:
        """Indices of the traced steps of the current run."""
        return sorted(self._step_times)

    def used_timesteps(self) -> list[float]:
        """Flow-matching times in [0, 1] (1 = pure noise) of the traced steps: one host read for all of them."""
        steps = self.used_steps()
        if not steps:
            return []
        values = torch.stack([self._step_times[s][0].detach().reshape(()) for s in steps])
        return [value / self._step_times[s][1] for s, value in zip(steps, values.tolist())]

    def check_steps(self) -> None:
        steps = self.config.steps
        if steps is not None and self.steps_run and steps[-1] >= self.steps_run:
            raise ConceptAttentionError(
                f"`steps` contains {steps[-1]}, but the pipeline ran {self.steps_run} denoising steps "
                f"(valid indices: 0-{self.steps_run - 1})"
            )

    def token_maps(self) -> tuple[torch.Tensor, torch.Tensor | None, TokenGrid]:
        """(B, C, h, w) maps, optional (L, B, C, h, w) per-block maps, and the grid ((F, h, w) for video)."""
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

    def record(self, details: GenerateDetails | EncodeDetails) -> RunRecord:
        """What was used, as a typed record."""
        transformer = self.transformer
        backend = self.backend
        name = getattr(getattr(self.owner, "config", None), "_name_or_path", None) or getattr(
            transformer.config, "_name_or_path", None
        )
        if self._conditional_half:
            cfg = "batched classifier-free guidance: maps from the conditional half"
        elif backend.spec.cfg_layout == "separate":
            cfg = "first forward of each step (a separate negative-prompt forward is not traced)"
        else:
            cfg = "no guidance batch"
        return RunRecord(
            model=name or type(transformer).__name__,
            architecture=backend.spec.name,
            transformer_class=type(transformer).__name__,
            dtype=str(next(transformer.parameters()).dtype).replace("torch.", ""),
            concepts=list(self.concepts),
            concept_tokens={c: list(t) for c, t in zip(self.concepts, self.embeddings.tokens)},
            concept_encoder=self.embeddings.encoder,
            concept_positions=backend.spec.concept_positions,
            layers=list(self.blocks.double),
            single_layers=list(self.blocks.single),
            blocks=self.blocks.labels,
            num_double_blocks=backend.num_blocks(transformer),
            num_single_blocks=backend.num_single_blocks(transformer),
            excluded_blocks=backend.excluded_blocks(transformer),
            default_layers=backend.spec.default_layers,
            score_space=self.config.score_space,
            concept_keys=self.config.concept_keys,
            softmax=self.state.softmax,
            normalization=self.normalization,
            pooling=self.config.pooling,
            grid=list(self._grid.shape) if self._grid else [],
            cfg=cfg,
            versions=library_versions(),
            details=details,
        )

    def concept_maps(
        self,
        details: GenerateDetails | EncodeDetails,
        images: Sequence[Any] | None,
        *,
        image_size: tuple[int, int] | None = None,
        pixels_per_token: int = 1,
        num_frames: int | None = None,
        fps: float | None = None,
    ) -> ConceptMaps:
        """The one result path of trace, generate and encode: maps of the current run plus its record.

        Args:
            details: the mode's record.
            images: PIL images the maps describe (optional).
            image_size: (height, width) of those images; default: the token grid times ``pixels_per_token``.
            num_frames: decoded frames of the video the maps describe (video models; None for images).
            fps: frame rate of that video, for saved files (video models).
        """
        maps, block_maps, grid = self.token_maps()
        return ConceptMaps(
            maps=maps.cpu(),
            concepts=self.concepts,
            image_size=image_size or (grid.height * pixels_per_token, grid.width * pixels_per_token),
            images=list(images) if images is not None else None,
            block_maps=block_maps.cpu() if block_maps is not None else None,
            metadata=self.record(details).to_dict(),
            num_frames=num_frames,
            fps=fps,
        )


class trace:  # noqa: N801 - a context manager used like a function, as DAAM's `trace`
    """Attach ConceptAttention to a pipeline for the duration of a ``with`` block.

    Inside the block, call the pipeline exactly as usual; afterwards read the maps of
    the latest call with :meth:`maps`. On exit (also on exceptions) the pipeline is
    restored: same processor objects, no hooks left.

    Args:
        pipe: a diffusers pipeline of a supported MM-DiT (see :func:`supported_architectures`).
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
        self._bind(call_plan(pipe, concepts, config_with_overrides(config, overrides)))  # fails before encoding

    def _bind(self, plan: CallPlan) -> None:
        self.plan = plan
        self.pipe = plan.model.pipe
        self.concepts, self.config = plan.concepts, plan.config
        self.transformer, self.backend = plan.model.transformer, plan.model.backend
        self._session: ConceptSession | None = None
        self._finished: ConceptSession | None = None  # kept after exit so maps stay readable
        self._observers: list[Callable[[BlockRecord], None]] = []

    @classmethod
    def from_plan(cls, plan: CallPlan) -> trace:
        """A trace of a call already planned (:func:`~conceptattention.plan.call_plan`): nothing is resolved again."""
        self = cls.__new__(cls)
        self._bind(plan)
        return self

    def __enter__(self) -> trace:
        if self._session is not None:
            raise ConceptAttentionError("This trace is already entered; exit it before entering it again.")
        session = ConceptSession(
            self.transformer, self.plan.encode_concepts(), self.concepts, self.config, backend=self.backend,
            pipeline=self.pipe, blocks=self.plan.blocks,
        )  # fmt: skip
        session.state.observers.extend(self._observers)
        session.__enter__()
        self._session = session
        return self

    def on_block(self, callback: Callable[[BlockRecord], None]) -> None:
        """Call ``callback`` with a :class:`~conceptattention.adapters.base.BlockRecord` after every block the concept
        stream passes, in every traced forward (e.g. to study the concept tokens block by block). Nothing is kept
        unless the callback keeps it.

        Example:
            >>> tokens = {}  # doctest: +SKIP
            >>> with trace(pipe, ["dog", "sky"]) as tc:  # doctest: +SKIP
            ...     tc.on_block(lambda r: tokens.__setitem__(r.block, r.concept_tokens.clone()))
            ...     pipe("a dog", num_inference_steps=4)
        """
        self._observers.append(callback)
        if self._session is not None:
            self._session.state.observers.append(callback)

    def __exit__(self, *exc_info: object) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.__exit__(*exc_info)
            self._finished = session

    def maps(
        self,
        images: Sequence[Any] | None = None,
        *,
        prompt: str | list[str] | None = None,
        seed: int | None = None,
        call: dict[str, Any] | None = None,
    ) -> ConceptMaps:
        """Maps of the latest pipeline call (inside or after the ``with`` block).

        Args:
            images: the pipeline's output images (PIL), attached for overlays and saving; for video models
                its ``output.frames`` (one list of PIL frames per video).
            prompt, seed, call: what the call used, for the record (``generate`` fills them).

        Returns:
            :class:`ConceptMaps` with ``maps`` of shape (B, C, h, w), or (B, C, F, h, w) for video models.
        """
        session = self._session or self._finished
        if session is None:
            raise ConceptAttentionError(
                "No concept maps recorded: run the pipeline inside `with trace(pipe, concepts) as tc:`"
            )
        details = GenerateDetails(
            steps=session.used_steps(),
            num_steps_run=session.steps_run,
            timesteps=session.used_timesteps(),
            prompt=prompt,
            seed=seed,
            call=dict(call or {}),
        )
        num_frames = fps = None
        if self.backend.spec.modality == "video":
            num_frames, fps = self._video_frames(session, images), self.backend.frames.fps(self.pipe)
        return session.concept_maps(
            details,
            images,
            pixels_per_token=self.backend.encoding.pixels_per_token(self.pipe),
            num_frames=num_frames,
            fps=fps,
        )

    def _video_frames(self, session: ConceptSession, videos: Sequence[Any] | None) -> int:
        """Decoded frames of a video model's output: counted from the given videos, else from the token grid."""
        if videos is None:
            grid = session._grid
            assert grid is not None  # token_maps() checked that the run recorded maps
            return self.backend.frames.decoded_frames(self.pipe, grid.frames)
        if not all(isinstance(video, (list, tuple)) and video for video in videos):
            raise ConceptAttentionError(
                f"{self.backend.spec.name} makes videos: pass `images=output.frames` (one list of PIL frames per "
                "video), not single images"
            )
        return len(videos[0])


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
