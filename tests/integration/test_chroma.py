"""Chroma specifics beyond the contract suite: per-block modulation, encode's text mask, missing encoder, dead block.

The text mask of prompts of different lengths in generation is checked for every backend in ``tests/contract/``.
"""

from __future__ import annotations

import pytest
import torch
from backend_cases import CASES_BY_NAME
from tiny_chroma import make_tiny_chroma_pipeline

import conceptattention as ca
from conceptattention.errors import ConceptAttentionError

CASE = CASES_BY_NAME["chroma"]
RUN = {"height": 32, "width": 48, "num_inference_steps": 2, "max_sequence_length": 16, "output_type": "pt"}


@pytest.fixture(scope="module")
def chroma_pipe():
    return CASE.pipeline()


def _run(pipe, prompt="a dog on the grass", **extra):
    return pipe(prompt, generator=torch.Generator().manual_seed(1), **{**RUN, **extra}).images


def test_concepts_use_each_blocks_own_text_modulation(chroma_pipe):
    """Every traced block modulates the concepts with exactly the text slice it gives the prompt."""
    seen: dict[int, list[torch.Tensor]] = {}
    blocks = chroma_pipe.transformer.transformer_blocks
    hooks = [
        block.norm1_context.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: seen.setdefault(i, []).append(kwargs["emb"]), with_kwargs=True
        )
        for i, block in enumerate(blocks)
    ]
    try:
        with ca.trace(chroma_pipe, ["dog", "sky"], layers=[0, 1, 2]):
            _run(chroma_pipe, num_inference_steps=1, guidance_scale=1.0)
    finally:
        for hook in hooks:
            hook.remove()
    slices = [seen[i][0] for i in range(len(blocks))]
    for i in range(len(blocks)):
        prompt_emb, concept_emb = seen[i]  # the real text stream first, then the concepts
        assert torch.equal(prompt_emb, concept_emb)
    assert not torch.equal(slices[0], slices[1])  # a different slice per block


def test_encode_passes_the_pipelines_text_mask(chroma_pipe):
    image = torch.rand(1, 3, 32, 48)
    forwards = []
    hook = chroma_pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: forwards.append(kw["attention_mask"]), with_kwargs=True
    )
    try:
        maps = ca.encode_image(chroma_pipe, image, ["dog", "sky"], caption="a dog", layers=[0, 1], seed=0,
                               height=32, width=48)  # fmt: skip
    finally:
        hook.remove()
    (mask,) = forwards
    tokens = (32 // 4) * (48 // 4)
    text_len = mask.shape[1] - tokens
    # caption tokens + one padding token stay valid, the rest of the padding is masked; image tokens all valid
    valid = int(mask[0, :text_len].sum())
    assert 1 < valid < text_len and bool(mask[0, text_len:].all())
    assert maps.grid == (8, 12) and maps.metadata["guidance_scale"] is None


def test_pipeline_without_text_encoder_says_what_is_missing():
    pipe = make_tiny_chroma_pipeline(seed=0)
    pipe.text_encoder = None
    with pytest.raises(ConceptAttentionError, match="text_encoder"), ca.trace(pipe, ["dog"]):
        pass


def test_last_block_is_excluded_when_no_single_blocks_follow():
    pipe = make_tiny_chroma_pipeline(seed=0, num_layers=3, num_single_layers=0)
    with pytest.raises(ConceptAttentionError, match="feeds nothing"), ca.trace(pipe, ["dog"], layers=[2]):
        pass
    with ca.trace(pipe, ["dog", "sky"]) as tc:
        _run(pipe, num_inference_steps=1, guidance_scale=1.0)
    assert tc.maps().metadata["layers"] == [0, 1]
