"""Flux.1 specifics beyond the contract suite: a guidance-distilled model at batch 4."""

from __future__ import annotations

import torch
from naive_reference import FLUX, capture_forward_inputs, reference_maps

import conceptattention as ca


def test_batch_and_guidance_model_match_reference(tiny_dev_pipe):
    concepts = ["dog", "sky", "grass"]
    run = {"height": 32, "width": 48, "num_inference_steps": 2, "max_sequence_length": 16, "output_type": "pt",
           "num_images_per_prompt": 2, "guidance_scale": 3.5}  # fmt: skip
    prompts = ["a dog", "a cat on the grass"]

    def call():
        return tiny_dev_pipe(prompts, generator=torch.Generator().manual_seed(0), **run).images

    records, _ = capture_forward_inputs(tiny_dev_pipe.transformer, call)
    expected = reference_maps(FLUX, tiny_dev_pipe, records, concepts, layers=[0, 1])
    with ca.trace(tiny_dev_pipe, concepts) as tc:
        call()
    got = tc.maps().maps.flatten(2)
    assert got.shape == (4, 3, 8 * 12)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert tc.maps().metadata["layers"] == [0, 1]  # default: last 10 double blocks, here all 2
