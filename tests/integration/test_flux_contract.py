"""Flux.1 specifics beyond the contract suite: sizes the pipeline rounds, per-image seeds, guidance-distilled encode.

Repeated calls, true CFG, bfloat16, inference mode, offloading and gradient checkpointing are checked for
every backend in ``tests/contract/test_backend_modes.py``.
"""

from __future__ import annotations

import pytest
import torch

import conceptattention as ca


def _run(pipe, prompt, **kw):
    args = {"height": 32, "width": 48, "num_inference_steps": 2, "max_sequence_length": 16, "output_type": "pt"}
    return pipe(prompt, generator=torch.Generator().manual_seed(3), **{**args, **kw}).images


def test_sizes_the_pipeline_rounds_down_give_maps_of_the_produced_image(tiny_pipe):
    # the tiny pipeline needs multiples of 4 and rounds other sizes down (with a warning)
    with ca.trace(tiny_pipe, ["dog", "sky"]) as tc:
        images = _run(tiny_pipe, "a dog", height=35, width=22)
    maps = tc.maps()
    assert tuple(images.shape[-2:]) == (32, 20) == maps.image_size
    assert maps.maps.shape[-2:] == (8, 5)


def test_per_image_seeds_make_batched_encoding_match_single_encoding(tiny_pipe):
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 32, 32, generator=g), torch.rand(3, 32, 32, generator=g)
    kwargs = {"height": 32, "width": 32, "num_samples": 2, "layers": [1, 2]}
    both = ca.encode_image(tiny_pipe, [a, b], ["dog", "sky"], seed=[3, 4], **kwargs)
    alone_a = ca.encode_image(tiny_pipe, a, ["dog", "sky"], seed=3, **kwargs)
    alone_b = ca.encode_image(tiny_pipe, b, ["dog", "sky"], seed=[4], **kwargs)
    torch.testing.assert_close(both.maps, torch.cat([alone_a.maps, alone_b.maps]), rtol=0, atol=1e-5)
    assert both.metadata["seed"] == [3, 4]
    with pytest.raises(ca.ConceptAttentionError, match=r"one int per image \(2\)"):
        ca.encode_image(tiny_pipe, [a, b], ["dog", "sky"], seed=[3], **kwargs)


def test_encode_with_a_guidance_distilled_model_passes_guidance(tiny_dev_pipe):
    seen = []
    hook = tiny_dev_pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["guidance"]), with_kwargs=True
    )
    try:
        maps = ca.encode_image(tiny_dev_pipe, torch.rand(3, 32, 32), ["dog", "sky"], height=32, width=32,
                               guidance_scale=2.5)  # fmt: skip
    finally:
        hook.remove()
    assert seen[0].tolist() == [2.5] and maps.metadata["guidance_scale"] == 2.5
    torch.testing.assert_close(maps.maps.sum(1), torch.ones(1, 8, 8))
