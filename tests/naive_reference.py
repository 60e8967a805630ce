"""A plain, slow reference of ConceptAttention for tests, independent of the library's code.

It runs the concept stream block by block from inputs captured on an *untraced* forward,
computing full attention over [concepts; image] queries (every row, as a naive
implementation would) and keeping the concept rows. What differs per architecture is
written out plainly in :class:`ReferenceArch` instances: how a concept is encoded, the
concept conditioning, and how a block's real joint attention forms the image tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb


def capture_forward_inputs(transformer, run):
    """Run ``run()`` and record, per transformer forward, its kwargs and each joint block's kwargs."""
    records = []

    def on_forward(module, args, kwargs):
        records.append({"forward": dict(kwargs), "blocks": []})

    def on_block(module, args, kwargs):
        records[-1]["blocks"].append(dict(kwargs))

    handles = [transformer.register_forward_pre_hook(on_forward, with_kwargs=True)]
    handles += [b.register_forward_pre_hook(on_block, with_kwargs=True) for b in transformer.transformer_blocks]
    try:
        result = run()
    finally:
        for h in handles:
            h.remove()
    return records, result


def heads(x, head_dim):
    return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)  # (B, H, S, D)


def merge(x):
    return x.transpose(1, 2).flatten(2)  # (B, S, H * D)


def plain_attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(d) [+ mask]) v; a float mask is added to the logits, a bool mask selects keys."""
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    return torch.softmax(logits, dim=-1) @ v


def maybe_norm(norm, x):
    """Per-head norm on (B, H, S, D) (over D), or nothing when the model has none."""
    return x if norm is None else norm(x)


def stream_qkv(block, inputs, head_dim, temb_image=None, temb_text=None):
    """(q, k, v) of the image and the text stream of a block, (B, H, S, D) each, after QK-norm (no RoPE)."""
    attn, temb = block.attn, inputs["temb"]
    nx = block.norm1(inputs["hidden_states"], emb=temb if temb_image is None else temb_image)[0]
    nt = block.norm1_context(inputs["encoder_hidden_states"], emb=temb if temb_text is None else temb_text)[0]
    qx, kx, vx = (heads(f(nx), head_dim) for f in (attn.to_q, attn.to_k, attn.to_v))
    qt, kt, vt = (heads(f(nt), head_dim) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    image = (maybe_norm(attn.norm_q, qx), maybe_norm(attn.norm_k, kx), vx)
    text = (maybe_norm(attn.norm_added_q, qt), maybe_norm(attn.norm_added_k, kt), vt)
    return image, text


def pool(own: torch.Tensor, pooling: str) -> torch.Tensor:
    return own[0] if pooling == "first" else own.mean(0)


# -- Flux.1 ----------------------------------------------------------------------------------------
def flux_concept_states(pipe, concepts, pooling, encoder):
    """Each concept alone through T5 (no padding), its tokens without </s>."""
    assert encoder in (None, "t5")
    states = []
    for concept in concepts:
        ids = pipe.tokenizer_2(concept, return_tensors="pt").input_ids  # ends with </s>
        hidden = pipe.text_encoder_2(ids).last_hidden_state[0]  # (S, D)
        states.append(pool(hidden[:-1], pooling))
    return torch.stack(states)


def flux_concept_temb(tr, fwd):
    pooled = torch.zeros_like(fwd["pooled_projections"])
    t = fwd["timestep"] * 1000
    if fwd.get("guidance") is not None:
        return tr.time_text_embed(t, fwd["guidance"] * 1000, pooled)
    return tr.time_text_embed(t, pooled)


def flux_image_attention(block, inputs, qkv=None, mask=None):
    """(q_x, k_x after RoPE, v_x, o_x) of the block's real joint attention over [text; image]."""
    (qx, kx, vx), (qt, kt, vt) = qkv or stream_qkv(block, inputs, block.attn.head_dim)
    rope = inputs["image_rotary_emb"]
    q = apply_rotary_emb(torch.cat([qt, qx], 2), rope, sequence_dim=2)
    k = apply_rotary_emb(torch.cat([kt, kx], 2), rope, sequence_dim=2)
    text_len = qt.shape[2]
    real = plain_attention(q, k, torch.cat([vt, vx], 2), mask)
    return q[:, :, text_len:], k[:, :, text_len:], vx, merge(real[:, :, text_len:])


# -- Chroma ----------------------------------------------------------------------------------------
def chroma_concept_states(pipe, concepts, pooling, encoder):
    """Each concept alone through the T5 ``text_encoder`` (no padding), its tokens without </s>."""
    assert encoder in (None, "t5")
    states = []
    for concept in concepts:
        ids = pipe.tokenizer(concept, return_tensors="pt").input_ids
        hidden = pipe.text_encoder(ids).last_hidden_state[0]
        states.append(pool(hidden[:-1], pooling))
    return torch.stack(states)


def chroma_block_concept_temb(block_inputs):
    """The block's text modulation slice (a function of the timestep alone)."""
    return block_inputs["temb"][:, 6:]


def chroma_image_attention(block, inputs):
    """Flux's joint attention with the block's own modulation slices and the pipeline's (B, T + N) mask."""
    temb = inputs["temb"]
    qkv = stream_qkv(block, inputs, block.attn.head_dim, temb_image=temb[:, :6], temb_text=temb[:, 6:])
    mask = inputs.get("attention_mask")
    if mask is not None:
        mask = (mask[:, None, None, :] * mask[:, None, :, None]).to(qkv[0][0].dtype)  # (B, 1, S, S), additive
    return flux_image_attention(block, inputs, qkv, mask)


# -- SD3 / SD3.5 -----------------------------------------------------------------------------------
def sd3_concept_states(pipe, concepts, pooling, encoder, t5_length=256):
    """Each concept alone; T5 padded to 256 tokens without a mask (as SD3 does), or CLIP-L+G padded to T5 width."""
    states = []
    for concept in concepts:
        if encoder in (None, "t5"):
            ids = pipe.tokenizer_3(concept, padding="max_length", max_length=t5_length, return_tensors="pt").input_ids
            hidden = pipe.text_encoder_3(ids)[0][0]  # (S, D)
            end = ids[0].tolist().index(pipe.tokenizer_3.eos_token_id)
            own = hidden[:end]
        else:
            ids = pipe.tokenizer(concept, padding="max_length", max_length=77, return_tensors="pt").input_ids
            parts = [
                enc(ids, output_hidden_states=True).hidden_states[-2][0]
                for enc in (pipe.text_encoder, pipe.text_encoder_2)
            ]
            hidden = torch.cat(parts, -1)
            hidden = F.pad(hidden, (0, pipe.transformer.config.joint_attention_dim - hidden.shape[-1]))
            end = ids[0].tolist().index(pipe.tokenizer.eos_token_id)
            own = hidden[1:end]  # after <|startoftext|>, before <|endoftext|>
        states.append(pool(own, pooling))
    return torch.stack(states)


def sd3_concept_temb(tr, fwd):
    return tr.time_text_embed(fwd["timestep"], torch.zeros_like(fwd["pooled_projections"]))


def sd3_image_attention(block, inputs):
    """(q_x, k_x, v_x, o_x) of the block's real joint attention over [image; text] (no RoPE)."""
    (qx, kx, vx), (qt, kt, vt) = stream_qkv(block, inputs, block.attn.to_q.out_features // block.attn.heads)
    n = qx.shape[2]
    real = plain_attention(torch.cat([qx, qt], 2), torch.cat([kx, kt], 2), torch.cat([vx, vt], 2))
    return qx, kx, vx, merge(real[:, :, :n])


@dataclass(frozen=True)
class ReferenceArch:
    concept_states: Callable
    concept_temb: Callable | None  # (transformer, forward kwargs) -> concept temb, the same for every block
    image_attention: Callable
    block_concept_temb: Callable | None = None  # (block kwargs) -> concept temb of that block


FLUX = ReferenceArch(flux_concept_states, flux_concept_temb, flux_image_attention)
SD3 = ReferenceArch(sd3_concept_states, sd3_concept_temb, sd3_image_attention)
CHROMA = ReferenceArch(chroma_concept_states, None, chroma_image_attention, chroma_block_concept_temb)


@torch.no_grad()
def reference_maps(
    arch: ReferenceArch,
    pipe,
    records,
    concepts,
    *,
    layers,
    steps=None,
    score_space="output",
    concept_keys="both",
    softmax=None,
    pooling="first",
    concept_encoder=None,
    conditional_half=False,
    rows=None,
):
    """(B, C, N) reference maps from captured forwards (one record per denoising step).

    ``conditional_half``: the forwards batch [uncond; cond]; maps describe the cond half.
    ``rows``: an explicit batch slice instead (e.g. the unconditional half, for contrast).
    """
    tr = pipe.transformer
    num_concepts = len(concepts)
    use_softmax = num_concepts > 1 if softmax is None else softmax
    text_states = arch.concept_states(pipe, concepts, pooling, concept_encoder)
    total, count = 0.0, 0
    for step, record in enumerate(records):
        if steps is not None and step not in steps:
            continue
        fwd = record["forward"]
        batch = fwd["hidden_states"].shape[0]
        keep = rows or (slice(batch // 2, None) if conditional_half else slice(None))
        forward_temb = arch.concept_temb(tr, fwd)[keep] if arch.concept_temb else None
        num_rows = len(range(*keep.indices(batch)))
        c = tr.context_embedder(text_states).unsqueeze(0).expand(num_rows, -1, -1)
        for index in range(max(layers) + 1):
            block = tr.transformer_blocks[index]
            block_temb = arch.block_concept_temb
            temb_c = block_temb(record["blocks"][index])[keep] if block_temb else forward_temb
            attn = block.attn
            qx, kx, vx, o_x = (t[keep] for t in arch.image_attention(block, record["blocks"][index]))
            hd = qx.shape[-1]
            nc, c_gate, c_shift, c_scale, c_gate_mlp = block.norm1_context(c, emb=temb_c)
            qc, kc, vc = (heads(f(nc), hd) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            qc, kc = maybe_norm(attn.norm_added_q, qc), maybe_norm(attn.norm_added_k, kc)
            # Naive concept attention: every query of [concepts; image], then keep the concept rows.
            keys = {
                "both": (torch.cat([kc, kx], 2), torch.cat([vc, vx], 2)),
                "image": (kx, vx),
                "concepts": (kc, vc),
            }[concept_keys]
            o_c = merge(plain_attention(torch.cat([qc, qx], 2), *keys)[:, :, :num_concepts])  # (B, C, HD)
            if index in layers:
                if score_space == "output":
                    s = o_c @ o_x.transpose(1, 2)
                elif score_space == "value":
                    s = merge(vc) @ merge(vx).transpose(1, 2)
                else:
                    logits = qx @ kc.transpose(-1, -2) / math.sqrt(hd)  # (B, H, N, C)
                    if use_softmax:
                        logits = logits.softmax(-1)
                    s = logits.mean(1).transpose(1, 2)
                if use_softmax and score_space != "cross_attention":
                    s = s.softmax(1)
                total = total + s
                count += 1
            # The concept residual stream always takes the attention output, whatever the score.
            c = c + c_gate.unsqueeze(1) * attn.to_add_out(o_c)
            normed = block.norm2_context(c) * (1 + c_scale[:, None]) + c_shift[:, None]
            c = c + c_gate_mlp.unsqueeze(1) * block.ff_context(normed)
    mean = total / count
    if num_concepts == 1:
        low, high = mean.amin(-1, keepdim=True), mean.amax(-1, keepdim=True)
        mean = (mean - low) / (high - low)
    return mean
