"""Generate mode: run the pipeline with a prompt and get images plus concept maps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from conceptattention.config import ConceptAttentionConfig
from conceptattention.errors import ConceptAttentionError
from conceptattention.outputs import ConceptMaps
from conceptattention.plan import call_plan
from conceptattention.tracing import config_with_overrides, trace


def generate(
    pipe: Any,
    prompt: str | Sequence[str],
    concepts: Sequence[str],
    *,
    config: ConceptAttentionConfig | None = None,
    seed: int | None = 0,
    num_inference_steps: int | None = None,
    **pipe_kwargs: Any,
) -> ConceptMaps:
    """Generate images and one map per concept per image.

    Args:
        pipe: a pipeline of a supported MM-DiT (see :func:`supported_architectures`).
        prompt: one prompt or a list (batch); ``num_images_per_prompt`` etc. go in ``pipe_kwargs``.
        concepts: concept words (need not occur in the prompt).
        config: a :class:`ConceptAttentionConfig` (layers, steps, score space, ...).
        seed: seed of a CPU generator for reproducible images; ``None`` to pass your own
            ``generator`` in ``pipe_kwargs``.
        num_inference_steps: denoising steps (the model's recorded default, else the pipeline's).
        **pipe_kwargs: fields of :class:`ConceptAttentionConfig` (``layers=[15, 16]``, ...), and
            any other argument of the pipeline's ``__call__`` (height, width, guidance_scale,
            num_images_per_prompt, ...).

    Returns:
        :class:`ConceptMaps` with ``maps`` (B, C, h, w) and the generated ``images``; for video models
        ``maps`` (B, C, F, h, w) on the token frames, ``num_frames`` and the generated frames.

    Example:
        >>> maps = generate(pipe, "a dog on grass", ["dog", "grass", "sky"], num_inference_steps=4)  # doctest: +SKIP
        >>> maps.save("outputs/dog")  # doctest: +SKIP
    """
    options = {k: pipe_kwargs.pop(k) for k in list(pipe_kwargs) if k in ConceptAttentionConfig.__dataclass_fields__}
    config = config_with_overrides(config, options)  # method options given as keywords, as on every entry point
    plan = call_plan(pipe, concepts, config)
    if not prompt or (not isinstance(prompt, str) and not all(isinstance(p, str) for p in prompt)):
        raise ConceptAttentionError(f"`prompt` must be a non-empty string or list of strings, got {prompt!r}")
    if "output_type" in pipe_kwargs and pipe_kwargs["output_type"] != "pil":
        raise ConceptAttentionError("`generate` returns PIL images (video frames); leave `output_type` unset")
    if seed is not None:
        if "generator" in pipe_kwargs:
            raise ConceptAttentionError("Pass either `seed` or `generator`, not both (set seed=None)")
        pipe_kwargs["generator"] = torch.Generator("cpu").manual_seed(seed)
    if num_inference_steps is not None:
        pipe_kwargs["num_inference_steps"] = num_inference_steps
    for key, value in plan.model.defaults.items():
        if key in ("height", "width", "max_sequence_length", "num_inference_steps"):
            pipe_kwargs.setdefault(key, value)
    backend = plan.model.backend
    for key, value in backend.pipeline.call_defaults(pipe).items():
        pipe_kwargs.setdefault(key, value)
    backend.pipeline.check_call(pipe, pipe_kwargs)
    with trace.from_plan(plan) as tracer:
        output = pipe(prompt=prompt, **pipe_kwargs)  # by keyword: some pipelines take `image` first
    scalars = {k: v for k, v in pipe_kwargs.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    prompts = prompt if isinstance(prompt, str) else list(prompt)
    images = output.frames if backend.spec.modality == "video" else output.images
    return tracer.maps(images=images, prompt=prompts, seed=seed, call=scalars)
