"""Encode mode: concept maps of real images from one noised forward pass per noise sample."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from conceptattention.adapters.base import StopForward
from conceptattention.config import ConceptAttentionConfig
from conceptattention.errors import ConceptAttentionError
from conceptattention.images import ImageInput, load_images, resize_for_model, to_model_input
from conceptattention.outputs import ConceptMaps, EncodeDetails
from conceptattention.plan import CallPlan, ModelPlan, call_plan, model_plan
from conceptattention.tracing import ConceptSession, config_with_overrides


def default_max_batch(transformer: Any, num_tokens: int) -> int:
    """Rows per encode forward when ``max_batch`` is not given.

    On CUDA: the free memory over a generous estimate of one row's activations in one block
    (40 x tokens x hidden width x element size), between 1 and 64. Elsewhere 4 (CPU matmuls
    gain little from larger batches and memory is shared with everything else).
    """
    parameter = next(transformer.parameters())
    if parameter.device.type != "cuda":
        return 4
    free, _ = torch.cuda.mem_get_info(parameter.device)
    config = transformer.config
    hidden = int(config.num_attention_heads) * int(config.attention_head_dim)
    per_row = 40 * num_tokens * hidden * parameter.element_size()
    return max(1, min(64, free // per_row))


def default_rows(pipe: Any, size: tuple[int, int] | None = None) -> int:
    """:func:`default_max_batch` for image encodes of this pipeline at ``size`` (default: the model's resolution)."""
    model = model_plan(pipe)
    tokens = _token_count(model, model.size(*(size or (None, None))))
    return default_max_batch(model.transformer, tokens + model.max_sequence_length())


def _noise_source(seed: int | Sequence[int], shape: torch.Size):
    """A function drawing the next (B, c, 2h, 2w) noise from one generator, or one generator per image."""
    if isinstance(seed, int) and not isinstance(seed, bool):
        generator = torch.Generator("cpu").manual_seed(seed)
        return lambda: torch.randn(shape, generator=generator, dtype=torch.float32)
    seeds = list(cast(Sequence[int], seed))
    if len(seeds) != shape[0] or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConceptAttentionError(f"`seed` must be an int or one int per image ({shape[0]}), got {seed!r}")
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return lambda: torch.stack([torch.randn(shape[1:], generator=g, dtype=torch.float32) for g in generators])


@torch.inference_mode()
def encode_image(
    pipe: Any,
    image: ImageInput | Sequence[ImageInput],
    concepts: Sequence[str],
    *,
    caption: str = "",
    config: ConceptAttentionConfig | None = None,
    t: float = 0.5,
    num_samples: int = 1,
    seed: int | Sequence[int] = 0,
    height: int | None = None,
    width: int | None = None,
    guidance_scale: float | None = None,
    max_sequence_length: int | None = None,
    max_batch: int | None = None,
    **overrides: Any,
) -> ConceptMaps:
    """Concept maps of real image(s).

    Resize (Lanczos) to the model resolution -> VAE encode -> noise to ``x_t = (1-t) z + t eps``
    -> one transformer forward with the caption, stopped after the last selected double
    block; repeated for ``num_samples`` seeded noise draws and averaged. The B x num_samples
    (image, draw) rows go through the transformer in micro-batches of ``max_batch`` rows; the
    noise is drawn in the same order whatever the batching, so the maps do not depend on it.

    Args:
        pipe: a loaded pipeline of a supported MM-DiT (see :func:`supported_architectures`).
        image: a PIL image, path, numpy array or tensor, or a list of them (batch B).
        concepts: concept words (1-64, unique).
        caption: prompt for the forward pass (default: empty).
        config: a :class:`ConceptAttentionConfig` (``steps`` is ignored here).
        t: flow-matching time in (0, 1) of the noised input.
        num_samples: independent noise draws to average.
        seed: seed of the noise draws (CPU generators, reproducible across devices); one seed per
            image makes each image's maps independent of how images are batched.
        height, width: model resolution; default: the model's recorded defaults, else the
            pipeline's default sample size.
        guidance_scale: guidance embedding of guidance-distilled models (default: the backend's);
            other models ignore it (encode mode runs no classifier-free guidance).
        max_sequence_length: caption token budget of the prompt encoder (default: the
            model's recorded default, else the backend's default).
        max_batch: rows (image x noise draw) per transformer forward; default
            :func:`default_max_batch` (from the device's free memory on CUDA, 4 elsewhere).
        **overrides: fields of :class:`ConceptAttentionConfig`.

    Returns:
        :class:`ConceptMaps` with ``maps`` (B, C, h, w) and the resized input images.

    Example:
        >>> maps = encode_image(pipe, "photo.jpg", ["dog", "grass", "sky"])  # doctest: +SKIP
        >>> maps.segmentation().shape  # (B, height, width)  # doctest: +SKIP
    """
    plan = _plan(pipe, concepts, config, overrides, t, num_samples, max_batch)
    plan.model.require("image", "`encode_image` maps images", "use `conceptattention.encode_video` (CLI: "
                       "`conceptattention encode` picks it from the model)")  # fmt: skip
    size = plan.model.size(height, width)
    images = [resize_for_model(im, size) for im in load_images(image)]
    run = _EncodeRun(caption, t, num_samples, seed, guidance_scale, max_sequence_length, max_batch)
    return _encode(plan, to_model_input(images), images, size, run)


@dataclass(frozen=True)
class _EncodeRun:
    """The options of one encode call shared by images and videos (validated)."""

    caption: str
    t: float
    num_samples: int
    seed: int | Sequence[int]
    guidance_scale: float | None
    max_sequence_length: int | None
    max_batch: int | None


def _plan(
    pipe: Any,
    concepts: Sequence[str],
    config: ConceptAttentionConfig | None,
    overrides: dict[str, Any],
    t: float,
    num_samples: int,
    max_batch: int | None,
) -> CallPlan:
    """The encode call's plan (``steps`` cleared: one forward per draw), after checking its own options."""
    config = dataclasses.replace(config_with_overrides(config, overrides), steps=None)
    if not 0.0 < float(t) < 1.0:
        raise ConceptAttentionError(f"`t` must be in (0, 1), got {t!r}; the paper uses t=0.5")
    for name, value in (("num_samples", num_samples), ("max_batch", max_batch)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConceptAttentionError(f"`{name}` must be a positive integer, got {value!r}")
    return call_plan(pipe, concepts, config)


def _encode(
    plan: CallPlan,
    pixels: torch.Tensor,
    items: list[Any],
    size: tuple[int, int],
    run: _EncodeRun,
    num_frames: int | None = None,
) -> ConceptMaps:
    """The encode loop of images (B, 3, H, W) and videos (B, 3, F, H, W) in [-1, 1]."""
    model = plan.model
    pipe, transformer, backend = model.pipe, model.transformer, model.backend
    max_sequence_length = model.max_sequence_length(run.max_sequence_length)
    embeddings = plan.encode_concepts()
    inputs = backend.encoding.inputs(pipe, pixels, run.caption, run.guidance_scale, max_sequence_length)
    session = ConceptSession(
        transformer, embeddings, plan.concepts, plan.config, backend=backend, owner=pipe, stop_after_last_block=True,
        blocks=plan.blocks,
    )  # fmt: skip
    clean = inputs.latents
    batch = clean.shape[0]
    draw_noise = _noise_source(run.seed, clean.shape)
    # Every draw in sequential order first: row r is draw r // B of item r % B.
    noise = torch.cat([draw_noise() for _ in range(run.num_samples)]).to(clean.device, clean.dtype)  # (S * B, ...)
    row_items = torch.arange(run.num_samples * batch, device=clean.device) % batch
    max_batch = run.max_batch
    if max_batch is None:
        max_batch = default_max_batch(transformer, _token_count(model, size, num_frames) + max_sequence_length)
    with session:
        session.start_run()
        for start in range(0, run.num_samples * batch, max_batch):
            rows = slice(start, start + max_batch)
            part = inputs.rows(row_items[rows])
            noisy = backend.encoding.noised(pipe, part.latents, noise[rows], run.t)
            with session.rows_of_items(row_items[rows], batch), contextlib.suppress(StopForward):
                backend.encoding.forward(pipe, part, noisy, run.t)  # StopForward: raised after the last selected block
    details = EncodeDetails(
        t=float(run.t),
        num_samples=run.num_samples,
        seed=run.seed if isinstance(run.seed, int) else list(run.seed),
        caption=run.caption,
        resolution=list(size),
        guidance_scale=inputs.guidance_scale,
        max_batch=max_batch,
    )
    fps = backend.frames.fps(pipe) if num_frames is not None else None
    return session.concept_maps(details, items, image_size=size, num_frames=num_frames, fps=fps)


def _token_count(model: ModelPlan, size: tuple[int, int], num_frames: int | None = None) -> int:
    """Image tokens of one encode row at ``size``; for ``num_frames`` video frames, all their token frames' tokens."""
    spatial = size[0] * size[1] // model.backend.encoding.pixels_per_token(model.pipe) ** 2
    if num_frames is None:
        return spatial
    r, p_t = model.backend.frames.frame_layout(model.pipe)
    return spatial * -(-((num_frames - 1) // r + 1) // p_t)


def _num_frames(model: ModelPlan, requested: int | None, available: int) -> int:
    """The frame count to encode: ``requested`` (or the model's default), checked against the model and the video.

    A causal video VAE takes ``r k + 1`` frames (r = its temporal compression) and makes ``k + 1`` latent frames.
    """
    pipe, backend = model.pipe, model.backend
    r, _ = backend.frames.frame_layout(pipe)
    count = requested if requested is not None else int(model.defaults.get("num_frames") or 0)
    count = count or backend.frames.default_num_frames(pipe)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConceptAttentionError(f"`num_frames` must be a positive integer, got {count!r}")
    if (count - 1) % r:
        lower = (count - 1) // r * r + 1
        raise ConceptAttentionError(
            f"`num_frames`={count} cannot be taken by {type(pipe).__name__}: its VAE compresses {r} frames into one "
            f"latent frame after the first, so it takes {r}k + 1 frames; try {lower} or {lower + r}"
        )
    if available < count:
        shorter = (available - 1) // r * r + 1
        what = "the model's default" if requested is None else "`num_frames`"
        raise ConceptAttentionError(
            f"The video has {available} frames, fewer than the {count} frames requested ({what}); pass "
            f"`num_frames={shorter}` (CLI `--num-frames {shorter}`) or give a video with at least {count} frames"
        )
    return count


def _video_batch(video: Any) -> list[Any]:
    """One video, or a list of videos (paths, frame lists or (F, H, W, 3) arrays), as a list of videos."""
    if isinstance(video, (list, tuple)) and video and all(
        isinstance(v, (str, Path, list, tuple)) or (isinstance(v, (np.ndarray, torch.Tensor)) and v.ndim == 4)
        for v in video
    ):
        return list(video)
    return [video]


@torch.inference_mode()
def encode_video(
    pipe: Any,
    video: Any,
    concepts: Sequence[str],
    *,
    caption: str = "",
    config: ConceptAttentionConfig | None = None,
    t: float = 0.5,
    num_samples: int = 1,
    seed: int | Sequence[int] = 0,
    num_frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    guidance_scale: float | None = None,
    max_sequence_length: int | None = None,
    max_batch: int | None = None,
    **overrides: Any,
) -> ConceptMaps:
    """Concept maps of real video(s) with a video model (see :func:`supported_architectures`).

    The first ``num_frames`` frames of each video are used (default: the model's default frame
    count; a shorter video is refused with the longest count it can give), each resized
    (Lanczos) to the model resolution; then, as :func:`encode_image`: VAE encode -> noise ->
    one transformer forward per noise draw, stopped after the last selected block.

    Args:
        pipe: a loaded video pipeline of a supported MM-DiT.
        video: a path (MP4, WebM, GIF, ...), a list of frames (PIL / arrays), an array or tensor
            (F, H, W, 3) / (F, 3, H, W); or a list of such videos (batch B).
        concepts: concept words (1-64, unique).
        num_frames: frames to encode; the model takes only certain counts (a causal video VAE
            with temporal compression r: r k + 1; the error names the nearest ones).
        caption, config, t, num_samples, seed, height, width, guidance_scale, max_sequence_length,
            max_batch, **overrides: as for :func:`encode_image`.

    Returns:
        :class:`ConceptMaps` with ``maps`` (B, C, F_tokens, h, w), ``num_frames`` and the resized input frames.

    Example:
        >>> maps = encode_video(pipe, "clip.mp4", ["dog", "ball"], num_frames=49)  # doctest: +SKIP
        >>> maps.upsampled().shape  # (B, C, 49, height, width)  # doctest: +SKIP
    """
    from conceptattention.videos import load_video, resize_frames, to_model_video

    plan = _plan(pipe, concepts, config, overrides, t, num_samples, max_batch)
    plan.model.require("video", "`encode_video` maps videos", "use `conceptattention.encode_image` (CLI: "
                       "`conceptattention encode` picks it from the model)")  # fmt: skip
    size = plan.model.size(height, width)
    videos = [load_video(v, f"`video[{i}]`") for i, v in enumerate(_video_batch(video))]
    count = _num_frames(plan.model, num_frames, min(len(v) for v in videos))
    videos = [resize_frames(v[:count], size) for v in videos]
    run = _EncodeRun(caption, t, num_samples, seed, guidance_scale, max_sequence_length, max_batch)
    return _encode(plan, to_model_video(videos), videos, size, run, num_frames=count)
