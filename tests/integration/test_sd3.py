"""SD3 / SD3.5 specifics beyond the contract suite: guidance layouts, concept encoders, excluded block, img2img."""

from __future__ import annotations

import pytest
import torch
from backend_cases import CASES_BY_NAME
from naive_reference import SD3, capture_forward_inputs, reference_maps

import conceptattention as ca

CASE = CASES_BY_NAME["sd3"]
RUN = {"height": 32, "width": 48, "num_inference_steps": 2, "max_sequence_length": 16, "output_type": "pt"}


@pytest.fixture(scope="module")
def sd3_pipe():
    return CASE.pipeline()


def _run(pipe, prompt="a dog on the grass", **extra):
    return pipe(prompt, generator=torch.Generator().manual_seed(1), **{**RUN, **extra}).images


@pytest.mark.parametrize(
    ("guidance", "prompts", "batched"),
    [
        pytest.param(1.0, ["a dog", "a cat under the sky"], False, id="no-guidance-batch2"),
        pytest.param(5.0, ["a dog", "a cat under the sky"], True, id="guidance-batch2"),
    ],
)
def test_guidance_on_and_off_give_maps_of_the_conditional_images(sd3_pipe, guidance, prompts, batched):
    concepts = ["dog", "sky", "grass"]
    forwards = []
    hook = sd3_pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: forwards.append(kw["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        records, _ = capture_forward_inputs(
            sd3_pipe.transformer, lambda: _run(sd3_pipe, prompts, guidance_scale=guidance)
        )
    finally:
        hook.remove()
    assert forwards == [4 if batched else 2] * 2  # [uncond; cond] in one forward when guidance is on
    expected = reference_maps(SD3, sd3_pipe, records, concepts, layers=[0, 1, 2], conditional_half=batched)
    with ca.trace(sd3_pipe, concepts, layers=[0, 1, 2]) as tc:
        _run(sd3_pipe, prompts, guidance_scale=guidance)
    maps = tc.maps()
    assert maps.maps.shape[:2] == (2, 3)  # B maps for B images, whatever the guidance batch
    torch.testing.assert_close(maps.maps.flatten(2), expected, rtol=0, atol=1e-5)
    assert ("conditional half" in maps.metadata["cfg"]) == batched
    # the unconditional half really differs: maps from it would not match
    if batched:
        uncond = reference_maps(SD3, sd3_pipe, records, concepts, layers=[0, 1, 2], rows=slice(0, 2))
        assert (uncond - expected).abs().max() > 1e-3


@pytest.mark.parametrize("pooling", ["first", "mean"])
def test_clip_concept_encoder_matches_reference(sd3_pipe, pooling):
    concepts = ["skyscraper", "dog", "sky"]
    records, _ = capture_forward_inputs(sd3_pipe.transformer, lambda: _run(sd3_pipe, guidance_scale=1.0))
    expected = reference_maps(SD3, sd3_pipe, records, concepts, layers=[0, 1, 2], concept_encoder="clip",
                              pooling=pooling)  # fmt: skip
    with ca.trace(sd3_pipe, concepts, layers=[0, 1, 2], concept_encoder="clip", pooling=pooling) as tc:
        _run(sd3_pipe, guidance_scale=1.0)
    torch.testing.assert_close(tc.maps().maps.flatten(2), expected, rtol=0, atol=1e-5)
    meta = tc.maps().metadata
    assert meta["concept_encoder"].startswith("clip") and len(meta["concept_tokens"]["skyscraper"]) > 1
    with ca.trace(sd3_pipe, concepts, layers=[0, 1, 2]) as t5:
        _run(sd3_pipe, guidance_scale=1.0)
    assert t5.maps().metadata["concept_encoder"].startswith("t5")
    assert (t5.maps().maps - tc.maps().maps).abs().max() > 1e-3  # the choice matters


def test_pipeline_without_t5_needs_the_clip_encoder():
    from tiny_sd3 import make_tiny_sd3_pipeline

    pipe = make_tiny_sd3_pipeline(seed=0, with_t5=False)
    with (
        pytest.raises(ca.ConceptAttentionError, match=r"without `tokenizer_3`.*pass `concept_encoder='clip'`"),
        ca.trace(pipe, ["dog", "sky"]),
    ):
        pass
    assert not any(m._forward_pre_hooks for m in pipe.transformer.modules())
    with ca.trace(pipe, ["dog", "sky"], concept_encoder="clip", layers=[1, 2]) as tc:
        _run(pipe)
    assert tc.maps().maps.shape == (1, 2, 8, 12)
    with pytest.raises(ca.ConceptAttentionError, match=r"`concept_encoder`='bert' is not available for SD3; choose "
                                                       r"one of 't5', 'clip'"):  # fmt: skip
        ca.trace(pipe, ["dog"], concept_encoder="bert")


def test_context_pre_only_last_block_is_excluded(sd3_pipe):
    with pytest.raises(
        ca.ConceptAttentionError,
        match=r"`layers` contains 3, which cannot be used: it is the `context_pre_only` block.*never trained\. "
        r"Choose among 0-2 \(default: 1-2\)",
    ):
        ca.trace(sd3_pipe, ["dog"], layers=[2, 3])
    with pytest.raises(ca.ConceptAttentionError, match="which cannot be used"):
        ca.encode_image(sd3_pipe, torch.rand(3, 32, 32), ["dog"], layers=[3])
    with ca.trace(sd3_pipe, ["dog", "sky"]) as tc:
        _run(sd3_pipe, num_inference_steps=1)
    meta = tc.maps().metadata
    assert meta["layers"] == [1, 2] and 3 in meta["excluded_blocks"] and meta["num_double_blocks"] == 4


def test_img2img_pipeline_streams_identical_and_maps(sd3_pipe):
    from diffusers import StableDiffusion3Img2ImgPipeline

    pipe = StableDiffusion3Img2ImgPipeline(**sd3_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 48)
    kwargs = {"image": image, "strength": 0.6, "num_inference_steps": 5, "max_sequence_length": 16, "height": 32,
              "width": 48, "output_type": "pt", "guidance_scale": 3.0}  # fmt: skip
    plain = pipe("a dog", generator=torch.Generator().manual_seed(0), **kwargs).images
    with ca.trace(pipe, ["dog", "sky"], layers=[0, 1, 2]) as tc:
        traced = pipe("a dog", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert torch.equal(plain, traced)
    maps = tc.maps()
    assert maps.maps.shape == (1, 2, 8, 12)
    meta = maps.metadata  # strength 0.6 of 5 steps: the last 3, counted from the first one run
    assert meta["num_steps_run"] == 3 and meta["steps"] == [0, 1, 2] and meta["timesteps"][0] < 0.8


def test_encode_sizes_the_model_cannot_take(sd3_pipe):
    image = torch.rand(3, 32, 32)
    with pytest.raises(ca.ConceptAttentionError, match=r"`height`=30 .* multiple of 4 .* try 28 or 32"):
        ca.encode_image(sd3_pipe, image, ["dog"], height=30, width=32)
    with pytest.raises(ca.ConceptAttentionError, match=r"`width`=160 is larger .* at most 128 pixels per side"):
        ca.encode_image(sd3_pipe, image, ["dog"], height=32, width=160)
    maps = ca.encode_image(sd3_pipe, image, ["dog", "sky"], height=32, width=128)
    assert maps.maps.shape == (1, 2, 8, 32) and maps.metadata["guidance_scale"] is None
