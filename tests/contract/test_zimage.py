"""Z-Image (made only of single-stream layers): the backend on its tiny random pipeline.

Checked against stock diffusers and the written-out reference of ``tests/naive_zimage.py``: every
stream bit-identical with every layer traced (CFG batched, prompts of different lengths, image pad
tokens present); maps equal to the reference in every score space and key set, per layer; the
concept position policy (a concept gets the rotation of a one-word prompt's first token); pad
tokens never keys; the conditional half of [cond; uncond]; encode mode stopping after the last used
layer and equal to a traced forward; img2img traced; and one clear error per unsupported mode.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.pipelines.z_image.pipeline_z_image_img2img import ZImageImg2ImgPipeline
from naive_zimage import (
    capture_zimage_inputs,
    padded,
    zimage_concept_states,
    zimage_image_token_count,
    zimage_reference_maps,
)
from tiny_zimage import make_tiny_zimage_pipeline

import conceptattention as ca
from conceptattention.adapters import backend_for
from conceptattention.adapters.base import ConceptEncoding

CONCEPTS = ["dog", "grass", "tree"]
PROMPTS = ["a dog on the grass", "a red dog on the green grass next to a tall tree under a blue sky with clouds"]
RUN = {"height": 40, "width": 32, "num_inference_steps": 2, "guidance_scale": 4.0, "max_sequence_length": 128}
ATOL = 1e-5


@pytest.fixture(scope="module")
def pipe():
    """3 layers and 2 refiner layers; 40x32 px gives 10x8 = 80 image tokens and 16 image pad tokens."""
    return make_tiny_zimage_pipeline(seed=0, n_layers=3, n_refiner_layers=2)


def _run(pipe, prompt=PROMPTS[0], **extra):
    args = {**RUN, "output_type": "pt", **extra}
    prompt = prompt if isinstance(prompt, str) else list(prompt)  # the pipeline templates a list in place
    with torch.no_grad():
        return pipe(prompt, generator=torch.Generator().manual_seed(3), **args).images


def _layer_outputs(pipe):
    outputs, handles = [], []
    for block in pipe.transformer.layers:
        handles.append(block.register_forward_hook(lambda m, a, out: outputs.append(out.clone())))
    return outputs, handles


def test_every_stream_stays_bit_identical_with_every_layer_traced(pipe):
    outputs, handles = _layer_outputs(pipe)
    try:
        plain = _run(pipe, PROMPTS)
        plain_layers = list(outputs)
        outputs.clear()
        with ca.trace(pipe, CONCEPTS, single_layers="all") as tc:
            traced = _run(pipe, PROMPTS)
        traced_layers = list(outputs)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(plain, traced)
    assert len(plain_layers) == len(traced_layers) == RUN["num_inference_steps"] * 3
    assert all(torch.equal(a, b) for a, b in zip(plain_layers, traced_layers))
    meta = tc.maps().metadata
    assert meta["blocks"] == ["single 0", "single 1", "single 2"]
    assert meta["layers"] == [] and meta["num_double_blocks"] == 0 and meta["num_single_blocks"] == 3
    assert tc.maps().maps.shape == (2, 3, 10, 8)


VARIANTS = [
    pytest.param({}, CONCEPTS, [0, 1], id="default"),
    pytest.param({"single_layers": "all"}, CONCEPTS, [0, 1, 2], id="all"),
    pytest.param({"single_layers": [0], "concept_keys": "image"}, CONCEPTS, [0], id="keys-image"),
    pytest.param({"single_layers": [1], "concept_keys": "concepts"}, CONCEPTS, [1], id="keys-concepts"),
    pytest.param({"single_layers": "all", "softmax": False}, CONCEPTS, [0, 1, 2], id="no-softmax"),
    pytest.param({"single_layers": [0, 2], "score_space": "cross_attention"}, CONCEPTS, [0, 2], id="cross-attention"),
    pytest.param({"single_layers": "all", "score_space": "value"}, ["dog", "sky"], [0, 1, 2], id="value"),
    pytest.param({"single_layers": [2], "pooling": "mean"}, ["dog", "grass"], [2], id="mean-pooling"),
    pytest.param({"single_layers": [1]}, ["dog"], [1], id="single-concept-minmax"),
]


@pytest.mark.parametrize(("options", "concepts", "layers"), VARIANTS)
def test_maps_match_the_naive_reference(pipe, options, concepts, layers):
    records, _ = capture_zimage_inputs(pipe.transformer, lambda: _run(pipe, PROMPTS))
    reference_options = {k: v for k, v in options.items() if k != "single_layers"}
    expected, expected_layers = zimage_reference_maps(
        pipe, records, concepts, single_layers=layers, conditional_half=True, per_block=True, **reference_options
    )
    with ca.trace(pipe, concepts, per_block=True, **options) as tc:
        _run(pipe, PROMPTS)
    maps = tc.maps()
    got = maps.maps.flatten(2)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)
    assert got.std() > 1e-3  # not trivially constant
    assert maps.metadata["single_layers"] == layers and maps.metadata["blocks"] == [f"single {j}" for j in layers]
    assert maps.block_maps is not None
    if len(concepts) > 1:
        torch.testing.assert_close(maps.block_maps.flatten(-2), expected_layers, rtol=0, atol=ATOL)


def test_maps_describe_the_conditional_first_half_of_the_guidance_batch(pipe):
    """[cond; uncond]: the maps of a CFG call equal those of the same call's first half traced alone."""
    records, _ = capture_zimage_inputs(pipe.transformer, lambda: _run(pipe, PROMPTS))
    cond = zimage_reference_maps(pipe, records, CONCEPTS, single_layers=[0, 1], conditional_half=True)
    every = zimage_reference_maps(pipe, records, CONCEPTS, single_layers=[0, 1])  # (4, C, N): cond x 2, uncond x 2
    with ca.trace(pipe, CONCEPTS) as tc:
        _run(pipe, PROMPTS)
    got = tc.maps().maps.flatten(2)
    torch.testing.assert_close(got, every[:2], rtol=0, atol=ATOL)
    torch.testing.assert_close(got, cond, rtol=0, atol=ATOL)
    assert (got - every[2:]).abs().max() > 1e-3  # the unconditional half differs
    with ca.trace(pipe, CONCEPTS) as unguided:
        _run(pipe, PROMPTS, guidance_scale=0.0)  # Z-Image-Turbo's setting: no guidance batch
    assert unguided.maps().maps.shape[0] == 2


def test_a_concept_gets_the_rotation_and_the_refined_token_of_a_one_word_prompts_first_token(pipe):
    backend = backend_for(pipe.transformer)
    concepts = backend.concepts(pipe, ["dog", "grass"], ConceptEncoding("first", max_sequence_length=128))
    ids = backend.stream.concept_positions(concepts, torch.device("cpu"))
    assert ids.tolist() == [[4, 0, 0], [4, 0, 0]]  # caption index 3 (after "<|im_start|>user\n") at 1 + 3
    for word in ("dog", "grass"):
        records, _ = capture_zimage_inputs(pipe.transformer, lambda w=word: _run(pipe, w, guidance_scale=0.0))
        layer = records[0]["layers"][0]
        n_padded = padded(zimage_image_token_count(records[0]["forward"]["x"][0]))
        rotation = backend.stream.rotation(pipe.transformer, ids[:1])
        key = torch.randn(1, 1, 2, 32)  # (B, C, H, D): one concept's key
        # the stock rotation of the prompt's first caption row (the caption follows the padded image)
        stock_freqs = layer["freqs_cis"][0, n_padded + 3]  # (D / 2,) complex
        rotated = torch.view_as_real(torch.view_as_complex(key.float().reshape(1, 1, 2, -1, 2)) * stock_freqs)
        assert torch.equal(rotation(key), rotated.flatten(3))
        # the refined token entering layer 0 at that row is the concept's token (its caption refined alone)
        refined_row = layer["x"][0, n_padded + 3]
        tokens, _ = zimage_concept_states(pipe, [word], length=128)
        torch.testing.assert_close(tokens[0], refined_row, rtol=0, atol=ATOL)
    # and the library's own concept tokens are those
    embedded = backend.stream.embed(
        pipe.transformer, backend.stream.concept_inputs(concepts, "cpu", torch.float32), None
    )
    reference, _ = zimage_concept_states(pipe, ["dog", "grass"], length=128)
    torch.testing.assert_close(embedded, reference, rtol=0, atol=ATOL)


def test_pad_tokens_are_never_keys_and_never_mapped(pipe):
    """Changing the learned pad tokens changes the stock image tokens but not how concepts read them."""
    records, _ = capture_zimage_inputs(pipe.transformer, lambda: _run(pipe, PROMPTS))
    with ca.trace(pipe, CONCEPTS, single_layers=[0]) as tc:
        _run(pipe, PROMPTS)
    n = zimage_image_token_count(records[0]["forward"]["x"][0])
    assert n == 80 and padded(n) == 96  # 16 image pad tokens precede the caption
    assert tc.maps().maps.flatten(2).shape[-1] == n
    # Layer 0's concept rows depend only on the concept tokens and the layer's real image tokens: the reference
    # built from them equals the library even though the layer's input holds random pad rows after them.
    expected = zimage_reference_maps(pipe, records, CONCEPTS, single_layers=[0], conditional_half=True)
    torch.testing.assert_close(tc.maps().maps.flatten(2), expected, rtol=0, atol=ATOL)
    pad_rows = records[0]["layers"][0]["x"][0, n : padded(n)]
    assert pad_rows.abs().max() > 0.1  # the pad tokens are real, non-zero rows in the stock sequence


def test_encode_stops_after_the_last_selected_layer_and_equals_a_traced_forward(pipe):
    calls: list[str] = []
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: calls.append(f"layer {i}")) for i, b in
               enumerate(pipe.transformer.layers)]  # fmt: skip
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    try:
        result = ca.encode_image(pipe, image, ["dog", "sky"], caption="a dog", height=32, width=32,
                                 single_layers=[1], t=0.4, seed=7)  # fmt: skip
    finally:
        for h in handles:
            h.remove()
    assert calls == ["layer 0", "layer 1"]
    assert result.maps.shape == (1, 2, 8, 8)
    assert result.metadata["blocks"] == ["single 1"]
    # the same forward, traced by hand: clean latents noised at t = 0.4, the model's time 1 - t
    from conceptattention.adapters.zimage import ZImageEncode

    recipe = ZImageEncode()
    pixels = (torch.as_tensor(np.asarray(result.images[0]), dtype=torch.float32).permute(2, 0, 1) / 127.5 - 1)[None]
    inputs = recipe.inputs(pipe, pixels, "a dog", None, 512)
    noise = torch.randn(inputs.latents.shape, generator=torch.Generator().manual_seed(7))
    noisy = recipe.noised(pipe, inputs.latents, noise, 0.4)
    records, _ = capture_zimage_inputs(pipe.transformer, lambda: recipe.forward(pipe, inputs, noisy, 0.4))
    assert float(records[0]["forward"]["t"][0]) == pytest.approx(0.6)
    expected = zimage_reference_maps(pipe, records, ["dog", "sky"], single_layers=[1])
    torch.testing.assert_close(result.maps.flatten(2), expected, rtol=0, atol=1e-4)
    assert result.metadata["t"] == 0.4


def test_img2img_is_traced_bit_identically():
    pipe = make_tiny_zimage_pipeline(seed=0, n_layers=2, n_refiner_layers=1)
    img2img = ZImageImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    args = {"image": image, "strength": 0.5, "height": 32, "width": 32, "num_inference_steps": 4,
            "guidance_scale": 0.0, "output_type": "pt"}  # fmt: skip
    forwards: list[int] = []
    hook = img2img.transformer.register_forward_pre_hook(lambda m, a: forwards.append(1))
    try:
        plain = img2img("a dog", generator=torch.Generator().manual_seed(0), **args).images
        with ca.trace(img2img, ["dog", "sky"]) as tc:
            traced = img2img("a dog", generator=torch.Generator().manual_seed(0), **args).images
    finally:
        hook.remove()
    assert torch.equal(plain, traced)
    steps = len(forwards) // 2
    assert tc.maps().maps.shape == (1, 2, 8, 8) and tc.maps().metadata["steps"] == list(range(steps))
    assert tc.maps().metadata["timesteps"][0] < 1.0  # starts from the partly noised image, not pure noise


def test_generate_runs_the_pipeline_and_refuses_a_guidance_truncation(pipe):
    result = ca.generate(pipe, "a dog on the grass", ["dog", "grass"], height=32, width=32, num_inference_steps=2,
                         seed=0, guidance_scale=0.0)  # fmt: skip
    assert result.maps.shape == (1, 2, 8, 8) and result.metadata["architecture"] == "Z-Image"
    message = r"`cfg_truncation=0.5` turns classifier-free guidance off for the later steps"
    with pytest.raises(ca.ConceptAttentionError, match=message):
        ca.generate(pipe, "a dog", ["dog"], height=32, width=32, num_inference_steps=2, cfg_truncation=0.5)
    with ca.trace(pipe, ["dog"]), pytest.raises(ca.ConceptAttentionError, match=message):
        _run(pipe, "a dog", cfg_truncation=0.5)


def test_bad_selections_and_modes_get_one_clear_message_each(pipe):
    with pytest.raises(ca.ConceptAttentionError, match=r"`layers` selects double-stream blocks, but "
                       r"ZImageTransformer2DModel \(Z-Image\) has none: its 3 blocks are single-stream; select them "
                       r"with `single_layers` \(valid indices: 0-2; CLI: --single-layers\)"):  # fmt: skip
        ca.trace(pipe, CONCEPTS, layers=[1])
    with pytest.raises(ca.ConceptAttentionError, match=r"`single_layers` contains 3, but ZImageTransformer2DModel "
                       r"has 3 single-stream blocks \(valid indices: 0-2\)"):  # fmt: skip
        ca.trace(pipe, CONCEPTS, single_layers=[3])
    with pytest.raises(ca.ConceptAttentionError, match=r"`single_layers='none'` leaves no block to score"):
        ca.trace(pipe, CONCEPTS, single_layers="none")
    assert ca.trace(pipe, CONCEPTS, layers="none").plan.blocks.single == (0, 1)


def test_omni_mode_is_refused_with_the_reason():
    pipe = make_tiny_zimage_pipeline(seed=0, n_layers=2, n_refiner_layers=1)
    message = (
        r"Z-Image omni mode \(ZImageOmniPipeline: condition images, per-token noise masks, SigLIP tokens\) is not "
    )
    with ca.trace(pipe, CONCEPTS), pytest.raises(ca.ConceptAttentionError, match=message + r"supported; use ZImage"):
        latent = torch.randn(4, 1, 8, 8)
        pipe.transformer([[latent]], torch.tensor([0.5]), [[torch.randn(5, 32)]], image_noise_mask=[[1]])


def test_a_concept_missing_from_its_template_is_refused(pipe):
    backend = backend_for(pipe.transformer)
    with pytest.raises(ca.ConceptAttentionError, match=r"The concept 'dog' does not occur in its templated encoding"):
        backend.concepts(pipe, ["dog"], ConceptEncoding("first", max_sequence_length=3))


def test_concepts_are_refined_once_per_pipeline_call(pipe):
    """The context refiner takes no timestep: the concepts' refined tokens are computed at a call's first forward."""
    calls: list[int] = []
    hook = pipe.transformer.context_refiner[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        _run(pipe, guidance_scale=0.0)
        plain = len(calls)
        calls.clear()
        with ca.trace(pipe, CONCEPTS) as tc:
            _run(pipe, guidance_scale=0.0)
            first = len(calls)
            _run(pipe, "a tree", guidance_scale=0.0)
        second = len(calls) - first
    finally:
        hook.remove()
    assert plain == RUN["num_inference_steps"]  # the prompt's caption, at every forward
    assert first == second == plain + 1  # plus the concepts' captions (one batch: equal padded lengths), once
    assert tc.maps().metadata["steps"] == [0, 1]  # the second call is a new run
