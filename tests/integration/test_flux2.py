"""Flux.2 specifics beyond the contract suite: concept RoPE position, reference images, encoders, guidance."""

from __future__ import annotations

import pytest
import torch
from backend_cases import CASES_BY_NAME
from naive_reference import FLUX2, capture_forward_inputs, reference_maps
from PIL import Image

import conceptattention as ca
from conceptattention.errors import ConceptAttentionError

KLEIN = CASES_BY_NAME["flux2-klein"]
DEV = CASES_BY_NAME["flux2-dev"]
RUN = {"height": 32, "width": 48, "num_inference_steps": 2, "output_type": "pt", "max_sequence_length": 64}


@pytest.fixture(scope="module")
def klein():
    return KLEIN.pipeline()


def _run(pipe, prompt="a dog on the grass", **extra):
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(1), **{**RUN, **extra}).images


def test_concepts_sit_where_a_prompts_first_user_token_sits(klein, monkeypatch):
    """Prompt "dog", concept "dog": the concept's rotated key equals the prompt's key at l = 3 (after the header)."""
    import conceptattention.adapters.joint as joint_module

    calls = []
    stock = joint_module.apply_rotary_emb

    def recording(x, freqs, **kwargs):
        out = stock(x, freqs, **kwargs)
        calls.append(out)
        return out

    # the shared Flux-family joint attention and the concept rows' rotation
    monkeypatch.setattr(joint_module, "apply_rotary_emb", recording)
    with ca.trace(klein, ["dog", "sky"], layers=[0]) as tc:
        _run(klein, "dog", num_inference_steps=1, guidance_scale=1.0)
    joint_key, concept_key = calls[1], calls[3]  # block 0: joint q, joint k, concept q, concept k
    header = len(klein.tokenizer("<|im_start|>user\n", add_special_tokens=False).input_ids)
    assert header == 3
    torch.testing.assert_close(concept_key[:, 0], joint_key[:, header], rtol=0, atol=1e-5)
    assert (concept_key[:, 0] - joint_key[:, 0]).abs().max() > 1e-3  # not the first template token's position
    assert "first sub-token" in tc.maps().metadata["concept_positions"]


def test_reference_image_tokens_are_attended_but_not_mapped(klein):
    """Image-conditioned generation appends reference latents (t = 10); maps cover the target grid only."""
    concepts = ["dog", "sky", "grass"]
    reference = Image.fromarray((torch.rand(64, 64, 3) * 255).to(torch.uint8).numpy())
    run = {"image": [reference], "guidance_scale": 1.0}
    records, plain = capture_forward_inputs(klein.transformer, lambda: _run(klein, **run))
    ids = records[0]["forward"]["img_ids"]
    ids = ids[0] if ids.ndim == 3 else ids
    assert int((ids[:, 0] > 0).sum()) > 0 and ids.shape[0] > 8 * 12  # reference tokens follow the target's
    expected = reference_maps(FLUX2, klein, records, concepts, layers=[0, 1, 2])
    with ca.trace(klein, concepts, layers=[0, 1, 2]) as tc:
        traced = _run(klein, **run)
    assert torch.equal(plain, traced)
    maps = tc.maps()
    assert maps.grid == (8, 12)
    torch.testing.assert_close(maps.maps.flatten(2), expected, rtol=0, atol=1e-5)


def test_dev_encode_embeds_guidance_and_records_it():
    pipe = DEV.pipeline()
    forwards = []
    record = lambda m, a, kw: forwards.append(kw["guidance"])  # noqa: E731
    hook = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        maps = ca.encode_image(pipe, torch.rand(3, 32, 48), ["dog", "sky"], height=32, width=48, layers=[1, 2],
                               max_sequence_length=256)  # fmt: skip
    finally:
        hook.remove()
    assert float(forwards[0][0]) == 4.0 and maps.metadata["guidance_scale"] == 4.0
    assert maps.metadata["concept_encoder"].startswith("prompt: mistral-3")


def test_pipeline_without_text_encoder_says_what_is_missing():
    pipe = KLEIN.fresh_pipeline()
    pipe.text_encoder = None
    with pytest.raises(ConceptAttentionError, match="text_encoder"), ca.trace(pipe, ["dog"]):
        pass


def test_concept_longer_than_the_prompt_budget_is_refused(klein):
    from conceptattention.adapters import backend_for
    from conceptattention.adapters.base import ConceptEncoding

    backend = backend_for(klein.transformer)
    with pytest.raises(ConceptAttentionError, match="max_sequence_length"):
        backend.concepts(klein, ["dog"], ConceptEncoding(pooling="first", max_sequence_length=3))
