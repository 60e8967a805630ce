"""The written-out Lumina-2 reference (``tests/naive_lumina2.py``) equals stock diffusers on a tiny pipeline.

Checked on real pipeline calls (CPU, fp32, within 2e-6): every block (noise refiner, context refiner, main
layers) written out equals the stock block on its captured inputs, with the caption mask and the batch mask in
use; the attention internals of the image rows equal what the stock processor hands to (and gets from) SDPA and
reproduce the block's output rows; the RoPE positions of caption, image and joint rows equal the freqs the
forward builds; a caption embedded alone equals the forward's refined caption; and the pipeline's template,
text-encoder layer, CFG call order and timestep direction are as ``naive_lumina2``'s docstring states.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from naive_lumina2 import (
    attention_input,
    attention_parts,
    block_from_attention,
    capture_lumina2_inputs,
    lumina2_block,
    lumina2_caption_freqs,
    lumina2_concept_sequence,
    lumina2_image_attention,
    lumina2_image_positions,
    lumina2_joint_positions,
    lumina2_patchify,
    lumina2_prompt_start,
    lumina2_rope,
)
from tiny_lumina2 import SYSTEM_PROMPT, TEMPLATE_SEPARATOR, make_tiny_lumina2_pipeline

SHORT = "a dog"
LONG = "a red dog on the green grass next to a tall tree under a blue sky with white clouds and a cat"
HEIGHT, WIDTH = 64, 48  # latent 8 x 6, 4 x 3 = 12 patches (rows != columns)
N = 12
RUN = {"num_inference_steps": 2, "output_type": "pt", "guidance_scale": 4.0}
ATOL = 2e-6
# The context refiner has no tanh gates: its branches enter the stream at full size (entries up to ~7) and the
# post-norms amplify the fp32 rounding of the attention kernel; the stock refiner's own output is ~3e-6 from its
# float64 result. Its outputs are compared at 1e-5; its attention (below) at ATOL, and the rest of its block,
# given the kernel's attention output, exactly.
UNGATED = {"rtol": 0, "atol": 1e-5}


@pytest.fixture(scope="module")
def pipe():
    return make_tiny_lumina2_pipeline(seed=0, num_layers=2, num_refiner_layers=2)


def _encode(pipe, prompts, template=True):
    """The pipeline's (embeds, mask) for ``prompts``, with or without the system-prompt template."""
    if template:
        prompts = [SYSTEM_PROMPT + TEMPLATE_SEPARATOR + p for p in prompts]
    with torch.no_grad():
        return pipe._get_gemma_prompt_embeds(prompts)


def _call(pipe, prompts, **extra):
    def run():
        with torch.no_grad():
            return pipe(
                prompts, height=HEIGHT, width=WIDTH, generator=torch.Generator().manual_seed(0), **{**RUN, **extra}
            ).images

    return capture_lumina2_inputs(pipe.transformer, run)


@pytest.fixture(scope="module")
def batch_call(pipe):
    """Two prompts of different caption lengths, CFG on: forwards [cond, uncond] per step, each a batch of 2."""
    return _call(pipe, [SHORT, LONG])


@pytest.fixture(scope="module")
def lengths(pipe):
    return _encode(pipe, [SHORT, LONG])[1].sum(1).tolist()


def test_template_and_first_prompt_token(pipe):
    assert pipe.system_prompt == SYSTEM_PROMPT and pipe.tokenizer.padding_side == "right"
    tok = pipe.tokenizer
    start = lumina2_prompt_start(tok, SYSTEM_PROMPT)
    assert start == 30
    ids = tok(SYSTEM_PROMPT + TEMPLATE_SEPARATOR + "a red apple").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] != tok.eos_token_id
    assert ids[:start] == tok(SYSTEM_PROMPT + TEMPLATE_SEPARATOR.rstrip()).input_ids
    assert tok.decode(ids[start:]) == " a red apple"
    _, mask = _encode(pipe, ["a red apple"])
    assert mask.shape == (1, 256) and mask.sum() == len(ids) and mask[0, : len(ids)].all()  # right-padded


def test_text_states_are_the_second_to_last_encoder_layer(pipe):
    embeds, _ = _encode(pipe, ["a red apple"])
    out = []
    handle = pipe.text_encoder.layers[-2].register_forward_hook(lambda m, a, o: out.append(o))
    try:
        prompt = SYSTEM_PROMPT + TEMPLATE_SEPARATOR + "a red apple"
        enc = pipe.tokenizer([prompt], padding="max_length", max_length=256, return_tensors="pt")
        with torch.no_grad():
            last = pipe.text_encoder(enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
    finally:
        handle.remove()
    layer_out = out[0][0] if isinstance(out[0], tuple) else out[0]
    torch.testing.assert_close(embeds, layer_out, rtol=0, atol=0)
    assert not torch.allclose(embeds, last, atol=1e-3)


def test_pipeline_call_runs_and_decodes_its_latents(pipe):
    def call(output_type):
        with torch.no_grad():
            return pipe(
                "a red apple",
                height=32,
                width=32,
                num_inference_steps=2,
                output_type=output_type,
                generator=torch.Generator().manual_seed(1),
            ).images

    image, latents = call("pt"), call("latent")
    assert latents.shape == (1, 4, 4, 4)
    with torch.no_grad():
        vae = pipe.vae
        decoded = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
    expected = pipe.image_processor.postprocess(decoded, output_type="pt")
    assert image.shape == (1, 3, 32, 32)
    torch.testing.assert_close(image, expected, rtol=0, atol=0)
    assert image.std() > 1e-3


def test_cfg_runs_cond_then_uncond_and_timestep_zero_is_noise(pipe):
    records, _ = _call(pipe, [SHORT], num_inference_steps=2)
    assert len(records) == 4  # per step: cond, uncond
    cond, cond_mask = _encode(pipe, [SHORT])
    uncond, uncond_mask = _encode(pipe, [""], template=False)  # the negative prompt gets no template
    assert uncond_mask.sum() == 1  # <bos> alone
    noise = torch.randn((1, 4, HEIGHT // 8, WIDTH // 8), generator=torch.Generator().manual_seed(0))
    for index, record in enumerate(records):
        fwd = record["forward"]
        step, is_cond = divmod(index, 2)
        states, mask = (cond, cond_mask) if is_cond == 0 else (uncond, uncond_mask)
        torch.testing.assert_close(fwd["encoder_hidden_states"], states, rtol=0, atol=0)
        torch.testing.assert_close(fwd["encoder_attention_mask"], mask, rtol=0, atol=0)
        sched_t = pipe.scheduler.timesteps[step]
        torch.testing.assert_close(fwd["timestep"], (1 - sched_t / 1000).expand(1), rtol=0, atol=0)
    first = records[0]["forward"]
    assert float(first["timestep"][0]) == 0.0  # step 0 (sigma 1): the latents are the pure noise ...
    torch.testing.assert_close(first["hidden_states"], noise, rtol=0, atol=0)
    assert 0 < float(records[2]["forward"]["timestep"][0]) < 1  # ... and t grows toward 1 = clean


def test_forward_masks_and_joint_layout(pipe, batch_call, lengths):
    records, _ = batch_call
    assert len(records) == 4 and lengths[0] < lengths[1]
    for index, record in enumerate(records):
        cap = lengths if index % 2 == 0 else [1, 1]
        mask = record["context_refiner"][0]["attention_mask"]
        assert mask.shape == (2, 256) and mask.sum(1).tolist() == cap
        assert record["noise_refiner"][0]["attention_mask"] is None
        joint = record["layers"][0]
        total = max(cap) + N
        assert joint["hidden_states"].shape == (2, total, 64)
        if cap[0] == cap[1]:
            assert joint["attention_mask"] is None  # same length: no mask
        else:
            assert joint["attention_mask"].dtype == torch.bool
            assert joint["attention_mask"].tolist() == [[j < c + N for j in range(total)] for c in cap]
        refined_cap = record["outputs"]["context_refiner"][-1]
        refined_img = record["outputs"]["noise_refiner"][-1]
        for i, c in enumerate(cap):  # [caption (valid rows); image; zeros]
            x = joint["hidden_states"][i]
            torch.testing.assert_close(x[:c], refined_cap[i, :c], rtol=0, atol=0)
            torch.testing.assert_close(x[c : c + N], refined_img[i], rtol=0, atol=0)
            assert not x[c + N :].any()


def test_image_rows_are_the_embedded_patches(pipe, batch_call):
    records, _ = batch_call
    first = records[0]
    latent = first["forward"]["hidden_states"]
    with torch.no_grad():
        embedded = torch.stack([pipe.transformer.x_embedder(lumina2_patchify(item)) for item in latent])
    torch.testing.assert_close(first["noise_refiner"][0]["hidden_states"], embedded, rtol=0, atol=ATOL)


def test_positions_equal_the_forwards_freqs(pipe, batch_call, lengths):
    records, _ = batch_call
    axes = pipe.transformer.config.axes_dim_rope
    record = records[0]
    total = max(lengths) + N
    for i, c in enumerate(lengths):
        cap_freqs = record["context_refiner"][0]["image_rotary_emb"][i]
        assert cap_freqs.dtype == torch.complex128
        mask = record["context_refiner"][0]["attention_mask"][i]
        torch.testing.assert_close(cap_freqs, lumina2_caption_freqs(mask, axes), rtol=0, atol=1e-12)
        assert not cap_freqs[c:].any()  # zero on the caption pads
        img_freqs = record["noise_refiner"][0]["image_rotary_emb"][i]
        torch.testing.assert_close(img_freqs, lumina2_rope(lumina2_image_positions(c, 4, 3), axes), rtol=0, atol=1e-12)
        joint_freqs = record["layers"][0]["image_rotary_emb"][i]
        expected = lumina2_rope(lumina2_joint_positions(c, 4, 3, total), axes)
        torch.testing.assert_close(joint_freqs, expected, rtol=0, atol=1e-12)
    assert lumina2_image_positions(5, 4, 3)[:4].tolist() == [[5, 0, 0], [5, 0, 1], [5, 0, 2], [5, 1, 0]]


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
                got = lumina2_block(
                    block,
                    inputs["hidden_states"],
                    inputs["attention_mask"],
                    inputs["image_rotary_emb"],
                    inputs.get("temb"),
                )
            tol = UNGATED if group == "context_refiner" else {"rtol": 0, "atol": ATOL}
            torch.testing.assert_close(got, stock, **tol)


@pytest.mark.parametrize("group", ["noise_refiner", "layers"])
def test_image_attention_internals_equal_the_stock_kernel(pipe, batch_call, lengths, group, monkeypatch):
    """q, k (after QK-norm and RoPE, K/V widened to the query heads), v and the pre-``to_out`` output of the image
    rows, as the stock processor passes them to (and gets them from) SDPA; o_x reproduces the block's image rows."""
    records, _ = batch_call
    calls = []
    stock_sdpa = F.scaled_dot_product_attention

    def recording(query, key, value, **kwargs):
        out = stock_sdpa(query, key, value, **kwargs)
        calls.append((query, key, value, out))
        return out

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    for index, record in enumerate(records):
        cap = lengths if index % 2 == 0 else [1, 1]
        slices = [slice(0, N)] * 2 if group == "noise_refiner" else [slice(c, c + N) for c in cap]
        for block, inputs, stock in zip(getattr(pipe.transformer, group), record[group], record["outputs"][group]):
            assert block.attn.to_k.out_features == 32  # one K/V head for two query heads
            calls.clear()
            with torch.no_grad():
                block(**inputs)
                qx, kx, vx, ox = lumina2_image_attention(block, inputs, slices)
                rows = torch.stack([inputs["hidden_states"][i, s] for i, s in enumerate(slices)])
                rebuilt = block_from_attention(block, rows, ox, inputs["temb"])
            (q, k, v, out) = calls[0]  # (B, H, S, D)
            for mine, theirs in ((qx, q), (kx, k), (vx, v), (ox, out.transpose(1, 2).flatten(2))):
                theirs = torch.stack([theirs[i, ..., s, :] for i, s in enumerate(slices)])
                torch.testing.assert_close(mine, theirs, rtol=0, atol=ATOL)
            stock_rows = torch.stack([stock[i, s] for i, s in enumerate(slices)])
            torch.testing.assert_close(rebuilt, stock_rows, rtol=0, atol=ATOL)


@pytest.mark.parametrize("group", ["noise_refiner", "context_refiner", "layers"])
def test_block_from_the_kernels_attention_is_exact(pipe, batch_call, group, monkeypatch):
    """Every row: the written-out attention output equals SDPA's within ATOL, and the written-out rest of the block
    on SDPA's own output reproduces the stock block bit for bit."""
    records, _ = batch_call
    calls = []
    stock_sdpa = F.scaled_dot_product_attention

    def recording(query, key, value, **kwargs):
        calls.append(stock_sdpa(query, key, value, **kwargs))
        return calls[-1]

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    for record in records:
        for block, inputs, stock in zip(getattr(pipe.transformer, group), record[group], record["outputs"][group]):
            calls.clear()
            with torch.no_grad():
                block(**inputs)
                kernel_o = calls[0].transpose(1, 2).flatten(2)
                x, mask, freqs, temb = (
                    inputs.get(k) for k in ("hidden_states", "attention_mask", "image_rotary_emb", "temb")
                )
                o = attention_parts(block, attention_input(block, x, temb), mask, freqs)[3]
                rebuilt = block_from_attention(block, x, kernel_o, temb)
            torch.testing.assert_close(o, kernel_o, rtol=0, atol=ATOL)
            torch.testing.assert_close(rebuilt, stock, rtol=0, atol=0)


def test_caption_alone_equals_the_forwards_refined_caption(pipe):
    """One prompt: the last context-refiner block's output equals the caption embedded alone (pads included)."""
    records, _ = _call(pipe, "a red apple", num_inference_steps=1, guidance_scale=1.0)
    (record,) = records
    states, mask = record["forward"]["encoder_hidden_states"], record["forward"]["encoder_attention_mask"]
    with torch.no_grad():
        alone = lumina2_concept_sequence(pipe.transformer, states[0], mask[0])
    stock = record["outputs"]["context_refiner"][-1][0]
    torch.testing.assert_close(alone, stock, **UNGATED)
    valid = int(mask.sum())
    torch.testing.assert_close(record["layers"][0]["hidden_states"][0, :valid], alone[:valid], **UNGATED)


def test_caption_alone_equals_its_row_of_a_masked_batch(pipe, batch_call):
    """In the two-prompt batch each caption equals the caption embedded alone (masked keys contribute nothing)."""
    records, _ = batch_call
    for index in (0, 1):  # cond, uncond
        fwd = records[index]["forward"]
        with torch.no_grad():
            for row in range(2):
                states, mask = fwd["encoder_hidden_states"][row], fwd["encoder_attention_mask"][row]
                alone = lumina2_concept_sequence(pipe.transformer, states, mask)
                stock = records[index]["outputs"]["context_refiner"][-1][row]
                torch.testing.assert_close(alone, stock, **UNGATED)
