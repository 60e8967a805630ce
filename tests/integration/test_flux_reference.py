"""Maps equal a naive reference (full joint attention, written in the tests) for every variant."""

from __future__ import annotations

import pytest
import torch
from reference import capture_forward_inputs, reference_maps

import conceptattention as ca

PROMPT = "a dog on the grass near a tree"
RUN = {"height": 32, "width": 48, "num_inference_steps": 2, "max_sequence_length": 16, "output_type": "pt"}


def _run(pipe, prompt=PROMPT, **extra):
    return pipe(prompt, generator=torch.Generator().manual_seed(0), **{**RUN, **extra}).images


VARIANTS = [
    pytest.param({}, ["dog", "grass", "tree"], id="default"),
    pytest.param({"concept_keys": "image"}, ["dog", "grass", "tree"], id="keys-image"),
    pytest.param({"concept_keys": "concepts"}, ["dog", "grass", "tree"], id="keys-concepts"),
    pytest.param({"softmax": False}, ["dog", "grass", "tree"], id="no-softmax"),
    pytest.param({"score_space": "cross_attention"}, ["dog", "grass", "tree"], id="cross-attention"),
    pytest.param({"score_space": "cross_attention", "softmax": False}, ["dog", "sky"], id="cross-no-softmax"),
    pytest.param({"score_space": "value"}, ["dog", "grass", "tree"], id="value"),
    pytest.param({"pooling": "mean"}, ["skyscraper", "dog"], id="pooling-mean"),
    pytest.param({"pooling": "first"}, ["skyscraper", "dog"], id="pooling-first-multitoken"),
    pytest.param({}, ["dog"], id="single-concept-minmax"),
    pytest.param({"layers": [1], "steps": [1]}, ["dog", "sky"], id="one-layer-one-step"),
    pytest.param({"layers": [0, 2]}, ["dog", "sky", "cat", "tree"], id="layers-0-2"),
]


@pytest.mark.parametrize(("options", "concepts"), VARIANTS)
def test_generate_maps_match_naive_reference(tiny_pipe, options, concepts):
    layers = options.get("layers", [0, 1, 2])
    records, _ = capture_forward_inputs(tiny_pipe.transformer, lambda: _run(tiny_pipe))
    expected = reference_maps(tiny_pipe, records, concepts, **{**options, "layers": layers})
    with ca.trace(tiny_pipe, concepts, **{**options, "layers": layers}) as tc:
        _run(tiny_pipe)
    maps = tc.maps()
    got = maps.maps.flatten(2)  # (B, C, N)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert maps.metadata["layers"] == layers
    assert maps.metadata["steps"] == list(options.get("steps", [0, 1]))
    # the reference is not trivially constant: maps differ between concepts and patches
    assert got.std() > 1e-3


def test_batch_and_guidance_model_match_reference(tiny_dev_pipe):
    concepts = ["dog", "sky", "grass"]
    kwargs = {"num_images_per_prompt": 2, "guidance_scale": 3.5}
    prompts = ["a dog", "a cat on the grass"]
    records, _ = capture_forward_inputs(tiny_dev_pipe.transformer, lambda: _run(tiny_dev_pipe, prompts, **kwargs))
    expected = reference_maps(tiny_dev_pipe, records, concepts, layers=[0, 1])
    with ca.trace(tiny_dev_pipe, concepts) as tc:
        _run(tiny_dev_pipe, prompts, **kwargs)
    got = tc.maps().maps.flatten(2)
    assert got.shape == (4, 3, 8 * 12)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert tc.maps().metadata["layers"] == [0, 1]  # default: last 10 double blocks, here all 2


def test_encode_averages_every_noise_sample_and_matches_reference(tiny_pipe):
    image = torch.rand(3, 32, 48)
    concepts = ["dog", "grass", "sky"]
    captured = []

    def grab(module, args, kwargs):
        captured.append(dict(kwargs))

    handle = tiny_pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    single_calls = []
    single = tiny_pipe.transformer.single_transformer_blocks[0].register_forward_pre_hook(
        lambda *a: single_calls.append(1)
    )
    try:
        maps = ca.encode_image(
            tiny_pipe, image, concepts, height=32, width=48, num_samples=3, seed=7, t=0.5, layers=[1, 2]
        )
    finally:
        handle.remove()
        single.remove()
    assert len(captured) == 3 and not single_calls  # stopped after the last used double block

    # each draw really is x_t = (1 - t) z + t eps with a fresh eps from the seeded generator
    pixels = (image.permute(1, 2, 0).numpy() * 255).round() / 127.5 - 1
    with torch.no_grad():
        z = tiny_pipe.vae.encode(torch.from_numpy(pixels).permute(2, 0, 1)[None].float()).latent_dist.mode()
    z = (z - tiny_pipe.vae.config.shift_factor) * tiny_pipe.vae.config.scaling_factor
    generator = torch.Generator().manual_seed(7)
    for record in captured:
        eps = torch.randn(z.shape, generator=generator)
        expected = tiny_pipe._pack_latents(0.5 * z + 0.5 * eps, 1, 4, z.shape[2], z.shape[3])
        torch.testing.assert_close(record["hidden_states"], expected, rtol=0, atol=1e-5)
        assert float(record["timestep"][0]) == 0.5

    # maps = mean over samples of the reference on each captured (untraced) forward
    per_sample = []
    with torch.inference_mode():  # captured tensors are inference tensors
        for record in captured:
            recs, _ = capture_forward_inputs(tiny_pipe.transformer, lambda r=record: tiny_pipe.transformer(**r))
            per_sample.append(reference_maps(tiny_pipe, recs, concepts, layers=[1, 2]))
    expected = torch.stack(per_sample).mean(0)
    torch.testing.assert_close(maps.maps.flatten(2), expected, rtol=0, atol=1e-5)
    assert maps.metadata["num_samples"] == 3 and maps.metadata["t"] == 0.5 and maps.metadata["mode"] == "encode"
    assert maps.image_size == (32, 48) and maps.images[0].size == (48, 32)
