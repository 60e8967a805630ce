"""The written-out Z-Image reference (``tests/naive_zimage.py``) equals stock diffusers on a tiny pipeline.

Checked on real pipeline calls (CPU, fp32): every block (noise refiner, context refiner, main layers) written
out equals the stock block on its captured inputs, with the batch mask in use; the attention internals of the
image rows equal what the stock processor hands to the attention kernel; a caption embedded alone equals the
forward's refined caption; and the image pad tokens sit between the image and the caption.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers import transformer_z_image
from naive_zimage import (
    capture_zimage_inputs,
    padded,
    zimage_block,
    zimage_caption_positions,
    zimage_concept_sequence,
    zimage_image_attention,
    zimage_image_positions,
    zimage_image_token_count,
    zimage_patchify,
)
from tiny_zimage import make_tiny_zimage_pipeline

SHORT = "a dog"
LONG = "a red dog on the green grass next to a tall tree under a blue sky with white clouds and a cat"
RUN = {"num_inference_steps": 2, "output_type": "pt", "max_sequence_length": 128, "guidance_scale": 4.0}
ATOL = 1e-5


@pytest.fixture(scope="module")
def pipe():
    return make_tiny_zimage_pipeline(seed=0, n_layers=2, n_refiner_layers=2)


def _encode(pipe, prompt):
    return pipe._encode_prompt([prompt], max_sequence_length=RUN["max_sequence_length"])[0]  # (L, D_text)


def _call(pipe, prompts, height=48, width=32, **extra):
    def run():
        with torch.no_grad():
            return pipe(
                prompts, height=height, width=width, generator=torch.Generator().manual_seed(0), **{**RUN, **extra}
            ).images

    return capture_zimage_inputs(pipe.transformer, run)


@pytest.fixture(scope="module")
def batch_call(pipe):
    """Two prompts of different padded caption lengths (32 and 64), CFG on: rows [cond x 2; uncond x 2]."""
    return _call(pipe, [SHORT, LONG])


def test_forward_batch_is_cond_then_uncond_with_a_key_mask(pipe, batch_call):
    records, _ = batch_call
    assert len(records) == 2
    expected = [_encode(pipe, p) for p in (SHORT, LONG, "", "")]
    for step, record in enumerate(records):
        fwd = record["forward"]
        assert len(fwd["x"]) == 4 and fwd["x"][0].shape == (4, 1, 24, 16)
        for got, want in zip(fwd["cap_feats"], expected):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        sched_t = pipe.scheduler.timesteps[step]
        torch.testing.assert_close(fwd["t"], ((1000 - sched_t) / 1000).expand(4))  # 0 = noise, 1 = clean
        assert record["noise_refiner"][0]["attn_mask"] is None  # same image size in every row
        for group, length in (("context_refiner", 64), ("layers", 96 + 64)):
            mask = record[group][0]["attn_mask"]
            assert mask.dtype == torch.bool and mask.shape == (4, length)
            caption = [64 if row == 1 else 32 for row in range(4)]
            valid = [c if group == "context_refiner" else 96 + c for c in caption]
            assert mask.sum(1).tolist() == valid
            assert record[group][0]["freqs_cis"].dtype == torch.complex64
            assert record[group][0]["freqs_cis"].shape == (4, length, 16)


@pytest.mark.parametrize("group", ["noise_refiner", "context_refiner", "layers"])
def test_written_out_block_equals_the_stock_block(pipe, batch_call, group):
    records, _ = batch_call
    blocks = getattr(pipe.transformer, group)
    assert len(blocks) == 2
    for record in records:
        assert len(record[group]) == len(blocks)
        for block, inputs, stock in zip(blocks, record[group], record["outputs"][group]):
            assert block.modulation == (group != "context_refiner")
            with torch.no_grad():
                got = zimage_block(
                    block, inputs["x"], inputs["attn_mask"], inputs["freqs_cis"], inputs.get("adaln_input")
                )
            torch.testing.assert_close(got, stock, rtol=0, atol=ATOL)


@pytest.mark.parametrize("group", ["noise_refiner", "layers"])
def test_image_attention_internals_equal_the_stock_kernel_inputs(pipe, batch_call, group, monkeypatch):
    """q, k (after QK-norm and RoPE), v and the pre-``to_out`` output of the first N rows, as the stock processor
    passes them to (and gets them from) ``dispatch_attention_fn`` ((B, S, H, D) there)."""
    records, _ = batch_call
    calls = []
    stock_dispatch = transformer_z_image.dispatch_attention_fn

    def recording(query, key, value, **kwargs):
        out = stock_dispatch(query, key, value, **kwargs)
        calls.append((query, key, value, out, kwargs["attn_mask"]))
        return out

    monkeypatch.setattr(transformer_z_image, "dispatch_attention_fn", recording)
    n = zimage_image_token_count(records[0]["forward"]["x"][0])
    assert n == 96
    for record in records:
        for block, inputs in zip(getattr(pipe.transformer, group), record[group]):
            calls.clear()
            with torch.no_grad():
                block(**inputs)
                qx, kx, vx, ox = zimage_image_attention(block, inputs, n)
            (q, k, v, out, mask) = calls[0]
            if group == "layers":  # the processor widens the (B, S) key mask to (B, 1, 1, S)
                assert mask.shape == (4, 1, 1, inputs["x"].shape[1])
            for mine, theirs in ((qx, q), (kx, k), (vx, v)):
                assert mine.shape == (4, 2, n, 32)
                torch.testing.assert_close(mine, theirs[:, :n].transpose(1, 2), rtol=0, atol=ATOL)
            assert ox.shape == (4, n, 64)
            torch.testing.assert_close(ox, out[:, :n].flatten(2), rtol=0, atol=ATOL)


def test_caption_alone_equals_the_forwards_refined_caption(pipe):
    """One prompt in the batch: the last context-refiner block's output equals the caption embedded alone."""
    tr = pipe.transformer
    states = _encode(pipe, SHORT)
    length = states.shape[0]
    refined = []
    handle = tr.context_refiner[-1].register_forward_hook(lambda m, a, out: refined.append(out))
    try:
        with torch.no_grad():
            latent = torch.randn(4, 1, 24, 16, generator=torch.Generator().manual_seed(3))
            tr([latent], torch.tensor([0.4]), [states], return_dict=False)
            alone = zimage_concept_sequence(tr, states, pooling_span=(0, length))
    finally:
        handle.remove()
    assert refined[0].shape == (1, padded(length), 64) and alone.shape == (padded(length), 64)
    torch.testing.assert_close(alone, refined[0][0], rtol=0, atol=ATOL)  # every row is valid in a batch of one
    with pytest.raises(AssertionError):
        zimage_concept_sequence(tr, states, pooling_span=(0, length + 1))  # a pad row is no caption token


def test_caption_alone_equals_the_valid_rows_of_a_masked_batch(pipe, batch_call):
    """In the two-prompt batch the short captions are batch-padded and masked: their valid rows still equal the
    caption embedded alone (masked keys contribute nothing)."""
    records, _ = batch_call
    with torch.no_grad():
        for row, prompt in enumerate((SHORT, LONG, "", "")):
            states = _encode(pipe, prompt)
            alone = zimage_concept_sequence(pipe.transformer, states)
            stock = records[0]["outputs"]["context_refiner"][-1][row]
            torch.testing.assert_close(alone, stock[: padded(states.shape[0])], rtol=0, atol=ATOL)


def test_image_pad_tokens_follow_the_image_tokens_at_40x32(pipe):
    """80 image tokens then 16 ``x_pad_token`` rows (position (0, 0, 0)); the joint rows are [image + pads; caption]."""
    tr = pipe.transformer
    records, _ = _call(pipe, SHORT, height=40, width=32, num_inference_steps=1, guidance_scale=0.0)
    (record,) = records
    latent = record["forward"]["x"][0]
    assert latent.shape == (4, 1, 20, 16)
    n = zimage_image_token_count(latent)
    assert n == 80 and padded(n) == 96
    first = record["noise_refiner"][0]
    x, freqs = first["x"], first["freqs_cis"]
    assert x.shape == (1, 96, 64) and first["attn_mask"] is None
    with torch.no_grad():
        embedded = tr.all_x_embedder["2-1"](zimage_patchify(latent))
    torch.testing.assert_close(x[0, :n], embedded, rtol=0, atol=ATOL)
    torch.testing.assert_close(x[0, n:], tr.x_pad_token.expand(16, -1), rtol=0, atol=0)
    assert not torch.allclose(x[0, n - 1], tr.x_pad_token[0])
    caption_padded = padded(record["forward"]["cap_feats"][0].shape[0])
    assert caption_padded == 32
    positions = zimage_image_positions(caption_padded, 10, 8)
    torch.testing.assert_close(freqs[0], tr.rope_embedder(positions), rtol=0, atol=0)
    torch.testing.assert_close(freqs[0, n:], torch.ones(16, 16, dtype=torch.complex64), rtol=0, atol=0)
    cap_freqs = record["context_refiner"][0]["freqs_cis"][0]
    torch.testing.assert_close(cap_freqs, tr.rope_embedder(zimage_caption_positions(10)), rtol=0, atol=0)
    # The main layers read [refined image with its pads; refined caption]: the caption starts at 96, not at 80.
    unified = record["layers"][0]["x"]
    assert unified.shape == (1, 96 + caption_padded, 64)
    torch.testing.assert_close(unified[:, :96], record["outputs"]["noise_refiner"][-1], rtol=0, atol=0)
    torch.testing.assert_close(unified[:, 96:], record["outputs"]["context_refiner"][-1], rtol=0, atol=0)
    assert record["layers"][0]["attn_mask"] is None  # a batch of one has no batch padding
