"""Encode mode: concept maps of real images from one noised forward pass per noise sample."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any, cast

import torch

from conceptattention.adapters.base import Backend, StopForward
from conceptattention.concepts import validate_concepts
from conceptattention.config import ConceptAttentionConfig
from conceptattention.errors import ConceptAttentionError
from conceptattention.images import ImageInput, load_images, resize_for_model, to_model_input
from conceptattention.loading import model_defaults
from conceptattention.outputs import ConceptMaps, EncodeDetails
from conceptattention.tracing import (
    ConceptSession,
    config_with_overrides,
    encode_pipeline_concepts,
    pipeline_components,
)


def _model_size(pipe: Any, backend: Backend, height: int | None, width: int | None) -> tuple[int, int]:
    pixels = backend.pixels_per_token(pipe)
    largest = backend.max_pixels_per_side(pipe)
    defaults = model_defaults(pipe)
    default = int(getattr(pipe, "default_sample_size", 64)) * int(getattr(pipe, "vae_scale_factor", 1))
    size = (height or defaults.get("height", default), width or defaults.get("width", default))
    for name, value in zip(("height", "width"), size):
        if isinstance(value, bool) or not isinstance(value, int) or value < pixels or value % pixels:
            lower = max(pixels, (value // pixels) * pixels) if isinstance(value, int) else pixels
            raise ConceptAttentionError(
                f"`{name}`={value!r} cannot be taken by {type(pipe).__name__}: it must be a positive multiple of "
                f"{pixels} (VAE scale x patch size); try {lower} or {lower + pixels}"
            )
        if largest is not None and value > largest:
            raise ConceptAttentionError(
                f"`{name}`={value!r} is larger than {type(pipe).__name__} can take: its position table covers at "
                f"most {largest} pixels per side; use {largest} or less (a multiple of {pixels})"
            )
    return size


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
            model's recorded default, else the backend's ``spec.max_sequence_length``).
        max_batch: rows (image x noise draw) per transformer forward; default
            :func:`default_max_batch` (from the device's free memory on CUDA, 4 elsewhere).
        **overrides: fields of :class:`ConceptAttentionConfig`.

    Returns:
        :class:`ConceptMaps` with ``maps`` (B, C, h, w) and the resized input images.

    Example:
        >>> maps = encode_image(pipe, "photo.jpg", ["dog", "grass", "sky"])  # doctest: +SKIP
        >>> maps.segmentation().shape  # (B, height, width)  # doctest: +SKIP
    """
    concepts = validate_concepts(concepts)
    config = dataclasses.replace(config_with_overrides(config, overrides), steps=None)
    if not 0.0 < float(t) < 1.0:
        raise ConceptAttentionError(f"`t` must be in (0, 1), got {t!r}; the paper uses t=0.5")
    for name, value in (("num_samples", num_samples), ("max_batch", max_batch)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConceptAttentionError(f"`{name}` must be a positive integer, got {value!r}")
    transformer, backend = pipeline_components(pipe)
    backend.resolve_layers(transformer, config.layers)  # fail before any compute
    size = _model_size(pipe, backend, height, width)
    images = [resize_for_model(im, size) for im in load_images(image)]
    max_sequence_length = (
        max_sequence_length or model_defaults(pipe).get("max_sequence_length") or backend.spec.max_sequence_length
    )
    embeddings = encode_pipeline_concepts(pipe, backend, concepts, config)
    inputs = backend.encode_inputs(pipe, to_model_input(images), caption, guidance_scale, max_sequence_length)
    session = ConceptSession(
        transformer, embeddings, concepts, config, backend=backend, owner=pipe, stop_after_last_block=True
    )
    clean = inputs.latents
    batch = clean.shape[0]
    draw_noise = _noise_source(seed, clean.shape)
    # Every draw in sequential order first: row r is draw r // B of image r % B.
    noise = torch.cat([draw_noise() for _ in range(num_samples)]).to(clean.device, clean.dtype)  # (S * B, ...)
    row_images = torch.arange(num_samples * batch, device=clean.device) % batch
    if max_batch is None:
        tokens = size[0] * size[1] // backend.pixels_per_token(pipe) ** 2 + max_sequence_length
        max_batch = default_max_batch(transformer, tokens)
    state = session.state
    state.num_items = batch
    with session:
        session.start_run()
        for start in range(0, num_samples * batch, max_batch):
            rows = slice(start, start + max_batch)
            part = inputs.rows(row_images[rows])
            state.row_items = row_images[rows]
            with contextlib.suppress(StopForward):  # raised after the last selected block
                backend.encode_forward(pipe, part, backend.noised(part.latents, noise[rows], t), t)
    details = EncodeDetails(
        t=float(t),
        num_samples=num_samples,
        seed=seed if isinstance(seed, int) else list(seed),
        caption=caption,
        resolution=list(size),
        guidance_scale=inputs.guidance_scale,
        max_batch=max_batch,
    )
    return session.concept_maps(details, images, image_size=size)
