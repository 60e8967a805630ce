"""Lumina-Image 2.0 (made only of single-stream layers): the backend on its tiny random pipeline.

Checked against stock diffusers and the written-out reference of ``tests/naive_lumina2.py``: every
stream bit-identical with every layer traced (guidance on: a separate unconditional forward; prompts
of different lengths, so each item's image rows start elsewhere); maps equal to the reference in
every score space and key set, per layer, with grouped K/V heads; the concept position policy; the
traced forward is the conditional one; encode mode stopping after the last used layer and equal to
the reference on its forward; and one clear error per bad selection.
"""

from __future__ import annotations

import pytest
import torch
from naive_lumina2 import capture_lumina2_inputs, lumina2_concept_states, lumina2_prompt_start, lumina2_reference_maps
from tiny_lumina2 import make_tiny_lumina2_pipeline

import conceptattention as ca
from conceptattention.adapters import backend_for
from conceptattention.adapters.base import ConceptEncoding

CONCEPTS = ["apple", "grass", "tree"]
PROMPTS = ["a red apple", "a red apple on the green grass near a tall tree"]
RUN = {"height": 64, "width": 48, "num_inference_steps": 2, "guidance_scale": 4.0}
ATOL = 1e-5


@pytest.fixture(scope="module")
def pipe():
    """3 layers, 2 refiner layers, 2 query heads on 1 K/V head; 64x48 px gives 4x3 image tokens."""
    return make_tiny_lumina2_pipeline(seed=0, num_layers=3, num_refiner_layers=2)


def _run(pipe, prompt=PROMPTS, **extra):
    prompt = prompt if isinstance(prompt, str) else list(prompt)
    with torch.no_grad():
        return pipe(prompt, generator=torch.Generator().manual_seed(3), output_type="pt", **{**RUN, **extra}).images


def _conditional(records):
    """The first forward of each step: guidance runs the unconditional batch as a second forward."""
    return records[::2]


def test_every_stream_stays_bit_identical_with_every_layer_traced(pipe):
    outputs: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda m, a, out: outputs.append(out.clone())) for b in pipe.transformer.layers]
    try:
        plain = _run(pipe)
        plain_layers = list(outputs)
        outputs.clear()
        with ca.trace(pipe, CONCEPTS, single_layers="all") as tc:
            traced = _run(pipe)
        traced_layers = list(outputs)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(plain, traced)
    assert len(plain_layers) == len(traced_layers) == RUN["num_inference_steps"] * 2 * 3  # cond + uncond forwards
    assert all(torch.equal(a, b) for a, b in zip(plain_layers, traced_layers))
    meta = tc.maps().metadata
    assert meta["blocks"] == ["single 0", "single 1", "single 2"] and meta["num_double_blocks"] == 0
    assert tc.maps().maps.shape == (2, 3, 4, 3)


VARIANTS = [
    pytest.param({}, CONCEPTS, [0, 1], id="default"),
    pytest.param({"single_layers": "all"}, CONCEPTS, [0, 1, 2], id="all"),
    pytest.param({"single_layers": [0], "concept_keys": "image"}, CONCEPTS, [0], id="keys-image"),
    pytest.param({"single_layers": [1], "concept_keys": "concepts"}, CONCEPTS, [1], id="keys-concepts"),
    pytest.param({"single_layers": "all", "softmax": False}, CONCEPTS, [0, 1, 2], id="no-softmax"),
    pytest.param({"single_layers": [0, 2], "score_space": "cross_attention"}, CONCEPTS, [0, 2], id="cross-attention"),
    pytest.param({"single_layers": "all", "score_space": "value"}, ["apple", "sky"], [0, 1, 2], id="value"),
    pytest.param({"single_layers": [2], "pooling": "mean"}, ["apple", "grass"], [2], id="mean-pooling"),
    pytest.param({"single_layers": [1]}, ["apple"], [1], id="single-concept-minmax"),
]


@pytest.mark.parametrize("prompts", [PROMPTS, PROMPTS[:1] * 2], ids=["lengths-differ", "lengths-equal"])
@pytest.mark.parametrize(("options", "concepts", "layers"), VARIANTS)
def test_maps_match_the_naive_reference(pipe, options, concepts, layers, prompts):
    records, _ = capture_lumina2_inputs(pipe.transformer, lambda: _run(pipe, prompts))
    reference_options = {k: v for k, v in options.items() if k != "single_layers"}
    expected, expected_layers = lumina2_reference_maps(
        pipe, _conditional(records), concepts, single_layers=layers, per_block=True, **reference_options
    )
    with ca.trace(pipe, concepts, per_block=True, **options) as tc:
        _run(pipe, prompts)
    maps = tc.maps()
    got = maps.maps.flatten(2)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)
    assert got.std() > 1e-3  # not trivially constant
    assert maps.metadata["single_layers"] == layers
    assert maps.block_maps is not None
    if len(concepts) > 1:
        torch.testing.assert_close(maps.block_maps.flatten(-2), expected_layers, rtol=0, atol=ATOL)


def test_the_traced_forward_is_the_conditional_one(pipe):
    records, _ = capture_lumina2_inputs(pipe.transformer, lambda: _run(pipe))
    assert len(records) == 4  # per step: the conditional, then the unconditional forward
    seen: list[int] = []
    with ca.trace(pipe, CONCEPTS) as tc:
        tc.on_block(lambda record: seen.append(record.block))
        _run(pipe)
    assert seen == [0, 1] * 2  # the concept stream ran in one forward per step, up to the last default layer
    expected = lumina2_reference_maps(pipe, _conditional(records), CONCEPTS, single_layers=[0, 1])
    torch.testing.assert_close(tc.maps().maps.flatten(2), expected, rtol=0, atol=ATOL)
    assert tc.maps().metadata["steps"] == [0, 1]


def test_a_concept_gets_the_rotation_and_the_refined_token_of_a_one_word_prompts_first_token(pipe):
    backend = backend_for(pipe.transformer)
    concepts = backend.concepts(pipe, ["apple", "grass"], ConceptEncoding("first"))
    start = lumina2_prompt_start(pipe.tokenizer, pipe.system_prompt)
    ids = backend.stream.concept_positions(concepts, torch.device("cpu"))
    assert ids.tolist() == [[start, 0, 0]] * 2
    records, _ = capture_lumina2_inputs(pipe.transformer, lambda: _run(pipe, "apple", guidance_scale=1.0))
    layer = records[0]["layers"][0]
    rotation = backend.stream.rotation(pipe.transformer, ids[:1])
    key = torch.randn(1, 1, 2, 32)  # (B, C, H, D)
    stock_freqs = layer["image_rotary_emb"][0, start]  # the prompt's first caption row (the caption comes first)
    rotated = torch.view_as_real(torch.view_as_complex(key.float().reshape(1, 1, 2, -1, 2)) * stock_freqs)
    assert torch.equal(rotation(key), rotated.flatten(3).float())
    # the token entering layer 0 at that row is the concept's own refined token
    tokens, _ = lumina2_concept_states(pipe, ["apple"])
    torch.testing.assert_close(tokens[0], layer["hidden_states"][0, start], rtol=0, atol=ATOL)
    inputs = backend.stream.concept_inputs(concepts, torch.device("cpu"), torch.float32)
    embedded = backend.stream.embed(pipe.transformer, inputs, None)
    reference, _ = lumina2_concept_states(pipe, ["apple", "grass"])
    torch.testing.assert_close(embedded, reference, rtol=0, atol=ATOL)


def test_encode_stops_after_the_last_selected_layer_and_equals_the_reference(pipe):
    calls: list[int] = []
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: calls.append(i)) for i, b in
               enumerate(pipe.transformer.layers)]  # fmt: skip
    image = torch.rand(3, 48, 32, generator=torch.Generator().manual_seed(1))
    records, result = capture_lumina2_inputs(
        pipe.transformer,
        lambda: ca.encode_image(pipe, image, ["apple", "sky"], caption="a red apple", height=48, width=32,
                                single_layers=[1], t=0.3, seed=7),
    )  # fmt: skip
    for h in handles:
        h.remove()
    assert calls == [0, 1]
    assert result.maps.shape == (1, 2, 3, 2) and result.metadata["blocks"] == ["single 1"]
    assert float(records[0]["forward"]["timestep"][0]) == pytest.approx(0.7)  # the model's time: 1 - t
    expected = lumina2_reference_maps(pipe, records, ["apple", "sky"], single_layers=[1])
    torch.testing.assert_close(result.maps.flatten(2), expected, rtol=0, atol=ATOL)


def test_generate_and_bad_selections(pipe):
    result = ca.generate(pipe, "a red apple", ["apple", "grass"], height=32, width=32, num_inference_steps=2, seed=0)
    assert result.maps.shape == (1, 2, 2, 2) and result.metadata["architecture"] == "Lumina-Image 2.0"
    message = r"`layers` selects double-stream blocks, but Lumina2Transformer2DModel \(Lumina-Image 2.0\) has none"
    with pytest.raises(ca.ConceptAttentionError, match=message + r": its 3 blocks are single-stream"):
        ca.trace(pipe, CONCEPTS, layers="all")
    with pytest.raises(ca.ConceptAttentionError, match=r"`single_layers` contains 7, but Lumina2Transformer2DModel "
                       r"has 3 single-stream blocks \(valid indices: 0-2\)"):  # fmt: skip
        ca.trace(pipe, CONCEPTS, single_layers=[7])
