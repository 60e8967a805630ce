"""Qwen-Image specifics beyond the contract suite: concept span in the template, RoPE policy, dead block, edits.

The text mask of prompts of different lengths is checked for every backend in ``tests/contract/``.
"""

from __future__ import annotations

import pytest
import torch
from backend_cases import CASES_BY_NAME
from naive_reference import QWEN_IMAGE, capture_forward_inputs, reference_maps
from tiny_qwenimage import make_tiny_qwenimage_pipeline

import conceptattention as ca
from conceptattention.adapters import backend_for
from conceptattention.adapters.base import ConceptEncoding
from conceptattention.errors import ConceptAttentionError

CASE = CASES_BY_NAME["qwenimage"]
RUN = {"height": 32, "width": 48, "num_inference_steps": 2, "output_type": "pt"}


@pytest.fixture(scope="module")
def qwen_pipe():
    return CASE.pipeline()


def _run(pipe, prompt="a dog on the grass", **extra):
    return pipe(prompt, generator=torch.Generator().manual_seed(1), **{**RUN, **extra}).images


@pytest.mark.parametrize("pooling", ["first", "mean"])
def test_concept_span_is_located_in_the_templated_sequence(qwen_pipe, pooling):
    """Multi-token concepts are pooled over their own span, found after the dropped template prefix."""
    backend = backend_for(qwen_pipe.transformer)
    concepts = ["skyscraper", "dog", "traffic light"]
    got = backend.concepts(qwen_pipe, concepts, ConceptEncoding(pooling=pooling))
    for concept, tokens in zip(concepts, got.tokens):  # byte-level pieces that spell the concept
        assert "".join(tokens).replace("Ġ", " ") == concept
    assert len(got.tokens[0]) > 1 and len(got.tokens[2]) > 1
    for row, concept in enumerate(concepts):
        hidden = qwen_pipe._get_qwen_prompt_embeds([concept])[0][0]  # the pipeline's own path, prefix dropped
        own = hidden[: len(got.tokens[row])]
        expected = own[0] if pooling == "first" else own.mean(0)
        torch.testing.assert_close(got.states[row], expected, rtol=0, atol=1e-6)
    assert "template" in got.encoder


def test_concepts_sit_at_the_first_prompt_position(qwen_pipe, monkeypatch):
    """With the prompt "dog" and the concept "dog", the concept's rotated key equals the prompt's first token's."""
    import conceptattention.adapters.qwenimage as qwen_module

    calls = []
    stock = qwen_module.apply_rotary_emb_qwen

    def recording(x, freqs, use_real=True):
        out = stock(x, freqs, use_real=use_real)
        calls.append((x.shape[1], out))
        return out

    monkeypatch.setattr(qwen_module, "apply_rotary_emb_qwen", recording)
    with ca.trace(qwen_pipe, ["dog", "sky"], layers=[0]) as tc:
        _run(qwen_pipe, "dog", num_inference_steps=1)
    # block 0 calls: image q, image k, text q, text k, concept q, concept k
    text_key, concept_key = calls[3][1], calls[5][1]  # (B, T, H, D), (B, C, H, D)
    assert calls[5][0] == 2 and text_key.shape[1] > 1
    torch.testing.assert_close(concept_key[:, 0], text_key[:, 0], rtol=0, atol=1e-5)
    assert (concept_key[:, 1] - text_key[:, 0]).abs().max() > 1e-3  # "sky" differs
    assert "first prompt token" in tc.maps().metadata["concept_positions"]


def test_last_block_is_dead_and_refused(qwen_pipe):
    with pytest.raises(ConceptAttentionError, match="feeds nothing"), ca.trace(qwen_pipe, ["dog"], layers=[3]):
        pass
    with ca.trace(qwen_pipe, ["dog", "sky"]) as tc:
        _run(qwen_pipe, num_inference_steps=1)
    meta = tc.maps().metadata
    assert meta["layers"] == [1, 2]  # the later half of the usable blocks 0-2
    assert list(meta["excluded_blocks"]) in (["3"], [3])


def test_pipeline_without_text_encoder_says_what_is_missing():
    pipe = make_tiny_qwenimage_pipeline(seed=0, num_layers=2)
    pipe.text_encoder = None
    with pytest.raises(ConceptAttentionError, match="text_encoder"), ca.trace(pipe, ["dog"]):
        pass


def test_zero_cond_t_models_modulate_concepts_with_the_target_half():
    """Edit checkpoints (`zero_cond_t`) double temb to [target; reference]; the text stream uses the target half."""
    pipe = make_tiny_qwenimage_pipeline(seed=3, num_layers=3, zero_cond_t=True)
    concepts = ["dog", "sky"]
    # The text-to-image pipeline cannot feed reference latents; a forward with explicit shapes can.
    tr = pipe.transformer
    target, reference = (1, 4, 6), (1, 2, 4)
    tokens = 4 * 6 + 2 * 4
    prompt_embeds, mask = pipe.encode_prompt("a dog on the grass", device="cpu")
    inputs = {
        "hidden_states": torch.randn(1, tokens, 16, generator=torch.Generator().manual_seed(0)),
        "encoder_hidden_states": prompt_embeds,
        "encoder_hidden_states_mask": mask,
        "timestep": torch.tensor([0.6]),
        "img_shapes": [[target, reference]],
        "return_dict": False,
    }
    with torch.no_grad():
        records, plain = capture_forward_inputs(tr, lambda: tr(**inputs))
        expected = reference_maps(QWEN_IMAGE, pipe, records, concepts, layers=[0, 1])
        with ca.trace(pipe, concepts, layers=[0, 1]) as tc:
            traced = tr(**inputs)
    assert torch.equal(plain[0], traced[0])
    maps = tc.maps()
    assert maps.grid == (4, 6)  # the target grid only: reference tokens are not mapped
    torch.testing.assert_close(maps.maps.flatten(2), expected, rtol=0, atol=1e-5)


def test_forward_with_inconsistent_img_shapes_is_refused(qwen_pipe):
    tr = qwen_pipe.transformer
    prompt_embeds, mask = qwen_pipe.encode_prompt("a dog", device="cpu")
    with ca.trace(qwen_pipe, ["dog"], layers=[0]), pytest.raises(ConceptAttentionError, match="img_shapes"):
        tr(hidden_states=torch.randn(1, 20, 16), encoder_hidden_states=prompt_embeds, encoder_hidden_states_mask=mask,
           timestep=torch.tensor([0.5]), img_shapes=[[(1, 4, 6)]], return_dict=False)  # fmt: skip


def test_edit_pipeline_without_its_reference_image_is_refused_before_any_compute(qwen_pipe):
    from diffusers import QwenImageEditPipeline

    edit = QwenImageEditPipeline(processor=None, **qwen_pipe.components)
    with pytest.raises(ConceptAttentionError, match="pass `image=`"):
        ca.generate(edit, "make the dog blue", ["dog"], num_inference_steps=1)


def test_encode_with_an_edit_pipeline_says_to_use_the_text_to_image_pipeline(qwen_pipe):
    from diffusers import QwenImageEditPipeline

    edit = QwenImageEditPipeline(processor=None, **qwen_pipe.components)
    with pytest.raises(ConceptAttentionError, match="QwenImagePipeline"):
        ca.encode_image(edit, torch.rand(3, 32, 48), ["dog", "sky"], height=32, width=48)
