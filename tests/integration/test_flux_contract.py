"""Flux.1 specifics beyond the contract suite: true CFG, dtypes, offloading, checkpointing, sizes, seeds."""

from __future__ import annotations

import pytest
import torch

import conceptattention as ca


def _run(pipe, prompt, **kw):
    args = {"height": 32, "width": 48, "num_inference_steps": 2, "max_sequence_length": 16, "output_type": "pt"}
    return pipe(prompt, generator=torch.Generator().manual_seed(3), **{**args, **kw}).images


def test_maps_follow_the_latest_call_and_ignore_the_true_cfg_negative_pass(tiny_pipe):
    concepts = ["dog", "grass"]
    with ca.trace(tiny_pipe, concepts) as only_second:
        _run(tiny_pipe, "a cat")
    with ca.trace(tiny_pipe, concepts) as both:
        _run(tiny_pipe, "a dog")
        _run(tiny_pipe, "a cat")
    torch.testing.assert_close(both.maps().maps, only_second.maps().maps, rtol=0, atol=0)

    with ca.trace(tiny_pipe, concepts) as cfg:
        _run(tiny_pipe, "a dog", negative_prompt="a cat", true_cfg_scale=2.0, num_inference_steps=3)
    assert cfg.maps().metadata["num_steps_run"] == 3  # 6 forwards, 3 steps


def test_bf16_pipeline_streams_identical_and_maps_close_to_fp32(tiny_pipe):
    from tiny_flux import make_tiny_flux_pipeline

    pipe16 = make_tiny_flux_pipeline(seed=0, dtype=torch.bfloat16)
    plain = _run(pipe16, "a dog")
    with ca.trace(pipe16, ["dog", "grass", "sky"]) as tc16:
        traced = _run(pipe16, "a dog")
    assert torch.equal(plain, traced)
    with ca.trace(tiny_pipe, ["dog", "grass", "sky"]) as tc32:
        _run(tiny_pipe, "a dog")
    m16, m32 = tc16.maps().maps, tc32.maps().maps
    assert m16.dtype == torch.float32 and torch.isfinite(m16).all()
    assert torch.corrcoef(torch.stack([m16.flatten(), m32.flatten()]))[0, 1] > 0.9


def test_inference_mode_and_model_cpu_offload(tiny_pipe):
    from tiny_flux import make_tiny_flux_pipeline

    pipe = make_tiny_flux_pipeline(seed=0)
    pipe.enable_model_cpu_offload(device="cpu")
    with torch.inference_mode(), ca.trace(pipe, ["dog", "sky"]) as offloaded:
        _run(pipe, "a dog")
    with torch.inference_mode(), ca.trace(tiny_pipe, ["dog", "sky"]) as plain:
        _run(tiny_pipe, "a dog")
    torch.testing.assert_close(offloaded.maps().maps, plain.maps().maps, rtol=0, atol=1e-6)


def test_gradient_checkpointing_passes_block_arguments_by_position(tiny_pipe):
    from tiny_flux import make_tiny_flux_pipeline

    from conceptattention.concepts import encode_concepts
    from conceptattention.tracing import ConceptSession

    pipe = make_tiny_flux_pipeline(seed=0)
    transformer = pipe.transformer
    records = []
    hook = transformer.register_forward_pre_hook(lambda m, a, kw: records.append(kw), with_kwargs=True)
    try:
        _run(pipe, "a dog", num_inference_steps=1)
    finally:
        hook.remove()
    inputs = records[0]
    embeddings = encode_concepts(["dog", "sky"], pipe.tokenizer_2, pipe.text_encoder_2, torch.device("cpu"), "first")
    config = ca.ConceptAttentionConfig(layers=[0, 1, 2])

    def maps_with(checkpointing: bool) -> torch.Tensor:
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        else:
            transformer.disable_gradient_checkpointing()
        with torch.enable_grad(), ConceptSession(transformer, embeddings, ["dog", "sky"], config) as session:
            transformer(**inputs)
            return session.token_maps()[0]

    torch.testing.assert_close(maps_with(True), maps_with(False), rtol=0, atol=1e-6)


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
