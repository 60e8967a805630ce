"""A plain, slow reference of ConceptAttention for tests, independent of the library's code.

It runs the concept stream block by block from inputs captured on an *untraced* forward,
computing full attention over [concepts; image] queries (every row, as a naive
implementation would) and keeping the concept rows. What differs per architecture is
written out plainly in :class:`ReferenceArch` instances: how a concept is encoded, the
concept conditioning, and how a block's real joint attention forms the image tensors.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb


def capture_forward_inputs(transformer, run):
    """Run ``run()`` and record, per transformer forward, its kwargs and each joint and single block's kwargs."""
    records = []

    def on_forward(module, args, kwargs):
        records.append({"forward": dict(kwargs), "blocks": []})

    def on_block(module, args, kwargs):
        # By name, also for blocks called positionally (HunyuanVideo).
        records[-1]["blocks"].append(dict(inspect.signature(module.forward).bind(*args, **kwargs).arguments))

    def on_single_block(module, args, kwargs):
        records[-1]["single"].append(dict(inspect.signature(module.forward).bind(*args, **kwargs).arguments))

    def on_forward_start(module, args, kwargs):
        on_forward(module, args, kwargs)
        records[-1]["single"] = []

    handles = [transformer.register_forward_pre_hook(on_forward_start, with_kwargs=True)]
    handles += [b.register_forward_pre_hook(on_block, with_kwargs=True) for b in transformer.transformer_blocks]
    singles = getattr(transformer, "single_transformer_blocks", None) or []
    handles += [b.register_forward_pre_hook(on_single_block, with_kwargs=True) for b in singles]
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


def dual_stream_embed(tr, states):
    return tr.context_embedder(states)


def dual_stream_modulation(block, c, temb):
    return block.norm1_context(c, emb=temb)


def dual_stream_feedforward(block):
    return block.norm2_context, block.ff_context


def dual_stream_concept_weights(block):
    """(q, k, v projections, q-norm, k-norm, output projection) the concepts go through: the text stream's."""
    attn = block.attn
    return attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.norm_added_q, attn.norm_added_k, attn.to_add_out


@dataclass(frozen=True)
class ReferenceArch:
    concept_states: Callable
    concept_temb: Callable | None  # (transformer, forward kwargs) -> concept temb, the same for every block
    image_attention: Callable  # (block, block kwargs) -> (q_x, k_x, v_x, o_x) of every image token
    block_concept_temb: Callable | None = None  # (block kwargs) -> concept temb of that block
    embed: Callable = dual_stream_embed  # (transformer, (C, D_text)) -> (C, D)
    modulation: Callable = dual_stream_modulation  # (block, c, temb) -> normed, gate, shift_mlp, scale_mlp, gate_mlp
    feedforward: Callable = dual_stream_feedforward  # block -> (norm2, ff) of the text stream
    concept_rope: Callable | None = None  # (transformer, block kwargs, positions) -> rotation of (B, H, C, D) q/k
    target_tokens: Callable | None = None  # (forward kwargs) -> the first n image tokens the maps describe
    concept_weights: Callable = dual_stream_concept_weights  # block -> (q, k, v, norm_q, norm_k, out) for concepts
    embed_at: Callable | None = None  # (transformer, concept states, forward kwargs) -> (C, D), instead of `embed`
    single: SingleReference | None = None  # the single-stream blocks after the dual-stream ones


# -- Qwen-Image ------------------------------------------------------------------------------------
def qwen_concept_states(pipe, concepts, pooling, encoder):
    """Each concept alone through the text-to-image pipeline's own prompt path; its tokens lead the result."""
    assert encoder in (None, "qwen2.5-vl")
    states = []
    for concept in concepts:
        hidden = pipe._get_qwen_prompt_embeds([concept])[0][0]  # (L, D), template prefix already dropped
        own = len(pipe.tokenizer(concept, add_special_tokens=False).input_ids)
        states.append(pool(hidden[:own], pooling))
    return torch.stack(states)


def qwen_block_concept_temb(block_inputs):
    temb = block_inputs["temb"]
    return temb.chunk(2, dim=0)[0] if block_inputs.get("modulate_index") is not None else temb


def qwen_embed(tr, states):
    return tr.txt_in(tr.txt_norm(states))


def _qwen_modulate(x, mod):
    shift, scale, gate = mod.chunk(3, dim=-1)
    return x * (1 + scale[:, None]) + shift[:, None], gate


def qwen_modulation(block, c, temb):
    mod1, mod2 = block.txt_mod(temb).chunk(2, dim=-1)
    normed, gate = _qwen_modulate(block.txt_norm1(c), mod1)
    shift2, scale2, gate2 = mod2.chunk(3, dim=-1)
    return normed, gate, shift2, scale2, gate2


def qwen_feedforward(block):
    return block.txt_norm2, block.txt_mlp


def _qwen_rotate(x, freqs):
    """RoPE of (B, H, S, D) by complex (S, D/2) frequencies, written out (pairs of channels as complex numbers)."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs).flatten(-2).type_as(x)


def qwen_concept_rope(tr, block_inputs, positions):
    first_text_position = block_inputs["image_rotary_emb"][1][:1]  # (1, D/2)
    return lambda x: _qwen_rotate(x, first_text_position)


def qwen_image_attention(block, inputs):
    """(q_x, k_x after RoPE, v_x, o_x) of the real joint attention over [text; image] with the text mask."""
    temb = inputs["temb"]
    text_temb = temb.chunk(2, dim=0)[0] if inputs.get("modulate_index") is not None else temb
    img_mod1 = block.img_mod(temb).chunk(2, dim=-1)[0]
    if inputs.get("modulate_index") is not None:  # [target; reference] image tokens use the two temb halves
        half = img_mod1.shape[0] // 2
        index = inputs["modulate_index"].unsqueeze(-1)  # (B, N, 1)
        shift0, scale0, _ = img_mod1[:half].chunk(3, dim=-1)
        shift1, scale1, _ = img_mod1[half:].chunk(3, dim=-1)
        shift = torch.where(index == 0, shift0[:, None], shift1[:, None])
        scale = torch.where(index == 0, scale0[:, None], scale1[:, None])
        nx = block.img_norm1(inputs["hidden_states"]) * (1 + scale) + shift
    else:
        nx, _ = _qwen_modulate(block.img_norm1(inputs["hidden_states"]), img_mod1)
    nt, _ = _qwen_modulate(block.txt_norm1(inputs["encoder_hidden_states"]), block.txt_mod(text_temb).chunk(2, -1)[0])
    attn = block.attn
    hd = attn.inner_dim // attn.heads
    qx, kx, vx = (heads(f(nx), hd) for f in (attn.to_q, attn.to_k, attn.to_v))
    qt, kt, vt = (heads(f(nt), hd) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    qx, kx = attn.norm_q(qx), attn.norm_k(kx)
    qt, kt = attn.norm_added_q(qt), attn.norm_added_k(kt)
    image_freqs, text_freqs = inputs["image_rotary_emb"]
    qx, kx = _qwen_rotate(qx, image_freqs), _qwen_rotate(kx, image_freqs)
    qt, kt = _qwen_rotate(qt, text_freqs), _qwen_rotate(kt, text_freqs)
    mask = inputs.get("encoder_hidden_states_mask")
    if mask is not None:
        keys_valid = torch.cat([mask.bool(), torch.ones(qx.shape[0], qx.shape[2], dtype=torch.bool)], dim=1)
        mask = keys_valid[:, None, None, :]
    text_len = qt.shape[2]
    real = plain_attention(torch.cat([qt, qx], 2), torch.cat([kt, kx], 2), torch.cat([vt, vx], 2), mask)
    return qx, kx, vx, merge(real[:, :, text_len:])


def qwen_target_tokens(fwd):
    frames, h, w = fwd["img_shapes"][0][0]
    return frames * h * w


# -- Flux.2 ----------------------------------------------------------------------------------------
def flux2_concept_states(pipe, concepts, pooling, encoder, length=512):
    """Each concept alone through the pipeline's own prompt function; its span right after the template header.

    Returns (states, positions): the header length (tokens before the user text) is each concept's position.
    """
    assert encoder in (None, "prompt")
    tok = pipe.tokenizer
    states, positions = [], []
    for concept in concepts:
        if hasattr(pipe, "_get_qwen3_prompt_embeds"):
            hidden = pipe._get_qwen3_prompt_embeds(pipe.text_encoder, tok, [concept], max_sequence_length=length)[0]
            header = "<|im_start|>user\n"
        else:
            hidden = pipe._get_mistral_3_small_prompt_embeds(
                pipe.text_encoder, tok, [concept], max_sequence_length=length, system_message=pipe.system_message
            )[0]
            header = f"<s>[SYSTEM_PROMPT]{pipe.system_message}[/SYSTEM_PROMPT][INST]"
        start = len(tok(header, add_special_tokens=False).input_ids)
        own = len(tok(concept, add_special_tokens=False).input_ids)
        states.append(pool(hidden[start : start + own], pooling))
        positions.append(start)
    return torch.stack(states), positions


def flux2_block_concept_temb(block_inputs):
    return block_inputs["temb_mod_txt"]


def flux2_modulation(block, c, temb):
    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = temb.chunk(6, dim=-1)
    return (1 + scale[:, None]) * block.norm1_context(c) + shift[:, None], gate, shift_mlp, scale_mlp, gate_mlp


def flux2_concept_rope(tr, block_inputs, positions):
    ids = torch.zeros(len(positions), 4)
    ids[:, 3] = torch.tensor(positions, dtype=torch.float32)
    rotary = tr.pos_embed(ids)
    return lambda x: apply_rotary_emb(x, rotary, sequence_dim=2)


def flux2_image_attention(block, inputs):
    """(q_x, k_x after RoPE, v_x, o_x) of the real joint attention over [text; image]."""
    img_mod = inputs["temb_mod_img"].chunk(6, dim=-1)
    txt_mod = inputs["temb_mod_txt"].chunk(6, dim=-1)
    nx = (1 + img_mod[1][:, None]) * block.norm1(inputs["hidden_states"]) + img_mod[0][:, None]
    nt = (1 + txt_mod[1][:, None]) * block.norm1_context(inputs["encoder_hidden_states"]) + txt_mod[0][:, None]
    attn = block.attn
    hd = attn.head_dim
    qx, kx, vx = (heads(f(nx), hd) for f in (attn.to_q, attn.to_k, attn.to_v))
    qt, kt, vt = (heads(f(nt), hd) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    qx, kx, qt, kt = attn.norm_q(qx), attn.norm_k(kx), attn.norm_added_q(qt), attn.norm_added_k(kt)
    rope = inputs["image_rotary_emb"]
    q = apply_rotary_emb(torch.cat([qt, qx], 2), rope, sequence_dim=2)
    k = apply_rotary_emb(torch.cat([kt, kx], 2), rope, sequence_dim=2)
    text_len = qt.shape[2]
    real = plain_attention(q, k, torch.cat([vt, vx], 2))
    return q[:, :, text_len:], k[:, :, text_len:], vx, merge(real[:, :, text_len:])


def flux2_target_tokens(fwd):
    ids = fwd["img_ids"][0] if fwd["img_ids"].ndim == 3 else fwd["img_ids"]
    return int((ids[:, 0] == 0).sum())


# -- CogVideoX --------------------------------------------------------------------------------------
def cogvideox_concept_states(pipe, concepts, pooling, encoder, length=16):
    """Each concept alone through T5, padded to the prompt budget with no mask (as the pipeline); its leading tokens."""
    assert encoder in (None, "t5")
    states = []
    for concept in concepts:
        ids = pipe.tokenizer(concept, padding="max_length", max_length=length, return_tensors="pt").input_ids
        hidden = pipe.text_encoder(ids)[0][0]  # (S, D)
        own = len(pipe.tokenizer(concept, add_special_tokens=False).input_ids)
        states.append(pool(hidden[:own], pooling))
    return torch.stack(states)


def _cogvideox_slots(norm, temb):
    """(video (shift, scale, gate), text (shift, scale, gate)) of a CogVideoXLayerNormZero."""
    chunks = norm.linear(F.silu(temb)).chunk(6, dim=1)
    return chunks[:3], chunks[3:]


def cogvideox_modulation(block, c, temb):
    _, (shift, scale, gate) = _cogvideox_slots(block.norm1, temb)
    _, (shift2, scale2, gate2) = _cogvideox_slots(block.norm2, temb)
    return block.norm1.norm(c) * (1 + scale[:, None]) + shift[:, None], gate, shift2, scale2, gate2


def cogvideox_image_attention(block, inputs):
    """(q_x, k_x after RoPE, v_x, o_x) of the shared attention over [text; video], written out."""
    (vshift, vscale, _), (tshift, tscale, _) = _cogvideox_slots(block.norm1, inputs["temb"])
    nx = block.norm1.norm(inputs["hidden_states"]) * (1 + vscale[:, None]) + vshift[:, None]
    nt = block.norm1.norm(inputs["encoder_hidden_states"]) * (1 + tscale[:, None]) + tshift[:, None]
    attn = block.attn1
    hd = attn.to_q.out_features // attn.heads
    joint = torch.cat([nt, nx], 1)
    q, k, v = (heads(f(joint), hd) for f in (attn.to_q, attn.to_k, attn.to_v))
    q, k = attn.norm_q(q), attn.norm_k(k)
    text_len = nt.shape[1]
    qx, kx = q[:, :, text_len:], k[:, :, text_len:]
    rope = inputs.get("image_rotary_emb")
    if rope is not None:
        qx, kx = apply_rotary_emb(qx, rope), apply_rotary_emb(kx, rope)
    real = plain_attention(torch.cat([q[:, :, :text_len], qx], 2), torch.cat([k[:, :, :text_len], kx], 2), v)
    return qx, kx, v[:, :, text_len:], merge(real[:, :, text_len:])


def cogvideox_concept_weights(block):
    attn = block.attn1
    return attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k, attn.to_out[0]


COGVIDEOX = ReferenceArch(
    cogvideox_concept_states,
    None,
    cogvideox_image_attention,
    lambda block_inputs: block_inputs["temb"],
    embed=lambda tr, states: tr.patch_embed.text_proj(states),
    modulation=cogvideox_modulation,
    feedforward=lambda block: (block.norm2.norm, block.ff),
    concept_weights=cogvideox_concept_weights,
)
# -- HunyuanVideo ----------------------------------------------------------------------------------
def hunyuan_concept_states(pipe, concepts, pooling, encoder, length=256):
    """Each concept alone through the pipeline's own Llama prompt path (template prefix cropped); its tokens lead.

    Returns one (cropped states (1, L, D), mask (1, L), own token count, pooling) per concept: the token
    refiner runs on the whole sequence at each forward (:func:`hunyuan_embed_at`).
    """
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    assert encoder in (None, "llama")
    states = []
    for concept in concepts:
        hidden, mask = pipe._get_llama_prompt_embeds([concept], DEFAULT_PROMPT_TEMPLATE, max_sequence_length=length)
        own = len(pipe.tokenizer(concept, add_special_tokens=False).input_ids)
        states.append((hidden, mask, own, pooling))
    return states


def hunyuan_embed_at(tr, states, fwd):
    """Each concept's sequence alone through the token refiner at the forward's timestep, its own tokens pooled."""
    pooled = []
    for hidden, mask, own, pooling in states:
        refined = tr.context_embedder(hidden, fwd["timestep"][:1], mask)[0]  # (L, D)
        pooled.append(pool(refined[:own], pooling))
    return torch.stack(pooled)


def hunyuan_concept_temb(tr, fwd):
    """Timestep + guidance embedding with a zero pooled-CLIP input."""
    return tr.time_text_embed(fwd["timestep"], torch.zeros_like(fwd["pooled_projections"]), fwd.get("guidance"))[0]


def hunyuan_image_attention(block, inputs):
    """(q_x, k_x after RoPE, v_x, o_x) of the real joint attention over [video; text] with the text mask."""
    (qx, kx, vx), (qt, kt, vt) = stream_qkv(block, inputs, block.attn.to_q.out_features // block.attn.heads)
    rope = inputs["freqs_cis"]
    qx, kx = apply_rotary_emb(qx, rope), apply_rotary_emb(kx, rope)  # video tokens only
    n = qx.shape[2]
    mask = inputs["attention_mask"]  # (B, 1, 1, N + T) bool: padded prompt tokens are not keys
    real = plain_attention(torch.cat([qx, qt], 2), torch.cat([kx, kt], 2), torch.cat([vx, vt], 2), mask)
    return qx, kx, vx, merge(real[:, :, :n])


HUNYUAN_VIDEO = ReferenceArch(
    hunyuan_concept_states, hunyuan_concept_temb, hunyuan_image_attention, embed_at=hunyuan_embed_at
)
FLUX = ReferenceArch(flux_concept_states, flux_concept_temb, flux_image_attention)
SD3 = ReferenceArch(sd3_concept_states, sd3_concept_temb, sd3_image_attention)
CHROMA = ReferenceArch(chroma_concept_states, None, chroma_image_attention, chroma_block_concept_temb)
FLUX2 = ReferenceArch(
    flux2_concept_states,
    None,
    flux2_image_attention,
    flux2_block_concept_temb,
    modulation=flux2_modulation,
    concept_rope=flux2_concept_rope,
    target_tokens=flux2_target_tokens,
)
QWEN_IMAGE = ReferenceArch(
    qwen_concept_states,
    None,
    qwen_image_attention,
    qwen_block_concept_temb,
    embed=qwen_embed,
    modulation=qwen_modulation,
    feedforward=qwen_feedforward,
    concept_rope=qwen_concept_rope,
    target_tokens=qwen_target_tokens,
)


# -- LongCat-Image ---------------------------------------------------------------------------------
def longcat_concept_states(pipe, concepts, pooling, encoder):
    """Each concept alone through the pipeline's own prompt path (template sliced off, padded to its budget).

    Returns (states, positions): where the concept's tokens sit in its padded block (0 with right padding).
    """
    assert encoder in (None, "qwen2.5-vl")
    states, positions = [], []
    for concept in concepts:
        hidden = pipe._encode_prompt([concept])[0]  # (L, D)
        own = len(pipe.tokenizer(concept, add_special_tokens=False).input_ids)
        start = 0 if pipe.tokenizer.padding_side == "right" else pipe.tokenizer_max_length - own
        states.append(pool(hidden[start : start + own], pooling))
        positions.append(start)
    return torch.stack(states), positions


def longcat_concept_rope(tr, block_inputs, positions):
    """The forward's own text rotation at each concept's position: text ids (0, p, p) are the rows p of the RoPE."""
    cos, sin = block_inputs["image_rotary_emb"]  # (T + N, D), text rows first
    rotary = (cos[positions], sin[positions])
    return lambda x: apply_rotary_emb(x, rotary, sequence_dim=2)


LONGCAT = ReferenceArch(
    longcat_concept_states,
    None,
    flux_image_attention,  # Flux.1's double block and joint attention, no text mask
    lambda block_inputs: block_inputs["temb"],  # the timestep embedding alone
    concept_rope=longcat_concept_rope,
)


# -- single-stream blocks ----------------------------------------------------------------------------
@dataclass(frozen=True)
class SingleReference:
    """One architecture's single-stream block, written out plainly.

    Attributes:
        concept_temb: (forward temb of the concepts or None, block kwargs) -> the concepts' modulation input.
        image_attention: (block, block kwargs, forward kwargs) -> (q_x, k_x, v_x, o_x) of the image tokens in the
            block's real attention (q/k after QK-norm and RoPE, (B, H, N, D); o_x (B, N, H * D)).
        concept_branches: (block, c, temb) -> (q_c, k_c, v_c (B, H, C, D) after QK-norm, mlp, gate).
        out: (block, o_c, mlp) -> the parallel projection.
        clip: the block clips float16.
    """

    concept_temb: Callable
    image_attention: Callable
    concept_branches: Callable
    out: Callable = lambda block, o, mlp: block.proj_out(torch.cat([o, mlp], -1))


def _single_heads_normed(attn, x, head_dim):
    """(B, S, H * D) -> three (B, H, S, D) q, k, v after the shared QK-norm."""
    q, k, v = (heads(f(x), head_dim) for f in (attn.to_q, attn.to_k, attn.to_v))
    return maybe_norm(attn.norm_q, q), maybe_norm(attn.norm_k, k), v


def flux_single_concept(block, c, temb):
    nc, gate = block.norm(c, emb=temb)
    attn = block.attn
    qc, kc, vc = _single_heads_normed(attn, nc, attn.head_dim)
    return qc, kc, vc, block.act_mlp(block.proj_mlp(nc)), gate


def flux_single_attention(block, inputs, fwd, mask=None, concatenated=False):
    """[text; image] through the shared weights, RoPE on the whole sequence; the image rows (the last N)."""
    n = fwd["hidden_states"].shape[1]
    seq = inputs["hidden_states"]
    if not concatenated:
        seq = torch.cat([inputs["encoder_hidden_states"], seq], 1)
    normed, _ = block.norm(seq, emb=inputs["temb"])
    attn = block.attn
    q, k, v = _single_heads_normed(attn, normed, attn.head_dim)
    rope = inputs["image_rotary_emb"]
    q, k = apply_rotary_emb(q, rope, sequence_dim=2), apply_rotary_emb(k, rope, sequence_dim=2)
    real = plain_attention(q, k, v, mask)
    return q[:, :, -n:], k[:, :, -n:], v[:, :, -n:], merge(real[:, :, -n:])


def chroma_single_attention(block, inputs, fwd):
    mask = inputs.get("attention_mask")
    if mask is not None:
        mask = (mask[:, None, None, :] * mask[:, None, :, None]).to(inputs["hidden_states"].dtype)  # additive, as stock
    return flux_single_attention(block, inputs, fwd, mask, concatenated=True)


def flux2_single_concept(block, c, temb):
    shift, scale, gate = temb.chunk(3, dim=-1)
    nc = (1 + scale[:, None]) * block.norm(c) + shift[:, None]
    attn = block.attn
    fused = attn.to_qkv_mlp_proj(nc)
    qkv, mlp = fused[..., : 3 * attn.inner_dim], fused[..., 3 * attn.inner_dim :]
    qc, kc, vc = (heads(t, attn.head_dim) for t in qkv.chunk(3, -1))
    return attn.norm_q(qc), attn.norm_k(kc), vc, attn.mlp_act_fn(mlp), gate


def flux2_single_attention(block, inputs, fwd):
    n = fwd["hidden_states"].shape[1]
    shift, scale, _ = inputs["temb_mod"].chunk(3, dim=-1)
    normed = (1 + scale[:, None]) * block.norm(inputs["hidden_states"]) + shift[:, None]
    attn = block.attn
    qkv = attn.to_qkv_mlp_proj(normed)[..., : 3 * attn.inner_dim]
    q, k, v = (heads(t, attn.head_dim) for t in qkv.chunk(3, -1))
    q, k = attn.norm_q(q), attn.norm_k(k)
    rope = inputs["image_rotary_emb"]
    q, k = apply_rotary_emb(q, rope, sequence_dim=2), apply_rotary_emb(k, rope, sequence_dim=2)
    real = plain_attention(q, k, v)
    return q[:, :, -n:], k[:, :, -n:], v[:, :, -n:], merge(real[:, :, -n:])


def hunyuan_single_concept(block, c, temb):
    nc, gate = block.norm(c, emb=temb)
    attn = block.attn
    qc, kc, vc = _single_heads_normed(attn, nc, attn.to_q.out_features // attn.heads)
    return qc, kc, vc, block.act_mlp(block.proj_mlp(nc)), gate


def hunyuan_single_attention(block, inputs, fwd):
    """[video; text] through the shared weights, RoPE on the video tokens only, the text mask; the first N rows."""
    video = inputs["hidden_states"]
    n = video.shape[1]
    normed, _ = block.norm(torch.cat([video, inputs["encoder_hidden_states"]], 1), emb=inputs["temb"])
    attn = block.attn
    q, k, v = _single_heads_normed(attn, normed, attn.to_q.out_features // attn.heads)
    rope = inputs["image_rotary_emb"]
    qx, kx = apply_rotary_emb(q[:, :, :n], rope), apply_rotary_emb(k[:, :, :n], rope)
    q, k = torch.cat([qx, q[:, :, n:]], 2), torch.cat([kx, k[:, :, n:]], 2)
    real = plain_attention(q, k, v, inputs["attention_mask"])
    return qx, kx, v[:, :, :n], merge(real[:, :, :n])


FLUX_SINGLE = SingleReference(lambda temb, inputs: temb, flux_single_attention, flux_single_concept)
CHROMA_SINGLE = SingleReference(lambda temb, inputs: inputs["temb"], chroma_single_attention, flux_single_concept)
LONGCAT_SINGLE = SingleReference(lambda temb, inputs: inputs["temb"], flux_single_attention, flux_single_concept)
FLUX2_SINGLE = SingleReference(
    lambda temb, inputs: inputs["temb_mod"],
    flux2_single_attention,
    flux2_single_concept,
    out=lambda block, o, mlp: block.attn.to_out(torch.cat([o, mlp], -1)),
)
HUNYUAN_SINGLE = SingleReference(lambda temb, inputs: temb, hunyuan_single_attention, hunyuan_single_concept)
FLUX = replace(FLUX, single=FLUX_SINGLE)
CHROMA = replace(CHROMA, single=CHROMA_SINGLE)
LONGCAT = replace(LONGCAT, single=LONGCAT_SINGLE)
FLUX2 = replace(FLUX2, single=FLUX2_SINGLE)
HUNYUAN_VIDEO = replace(HUNYUAN_VIDEO, single=HUNYUAN_SINGLE)


def _score(score_space, use_softmax, o_c, o_x, qx, kc, vc, vx, n):
    """(B, C, N) one block's scores over the first n image tokens, written out."""
    if score_space == "output":
        s = o_c @ o_x[:, :n].transpose(1, 2)
    elif score_space == "value":
        s = merge(vc) @ merge(vx[:, :, :n]).transpose(1, 2)
    else:
        logits = qx[:, :, :n] @ kc.transpose(-1, -2) / math.sqrt(qx.shape[-1])  # (B, H, N, C)
        if use_softmax:
            logits = logits.softmax(-1)
        s = logits.mean(1).transpose(1, 2)
    if use_softmax and score_space != "cross_attention":
        s = s.softmax(1)
    return s


def _naive_concept_attention(qc, kc, vc, qx, kx, vx, concept_keys, num_concepts):
    """Every query of [concepts; image] over the chosen keys, then the concept rows (B, C, H * D)."""
    keys = {
        "both": (torch.cat([kc, kx], 2), torch.cat([vc, vx], 2)),
        "image": (kx, vx),
        "concepts": (kc, vc),
    }[concept_keys]
    return merge(plain_attention(torch.cat([qc, qx], 2), *keys)[:, :, :num_concepts])


@torch.no_grad()
def reference_maps(
    arch: ReferenceArch,
    pipe,
    records,
    concepts,
    *,
    layers,
    single_layers=(),
    steps=None,
    score_space="output",
    concept_keys="both",
    softmax=None,
    pooling="first",
    concept_encoder=None,
    conditional_half=False,
    rows=None,
    per_block=False,
):
    """(B, C, N) reference maps from captured forwards (one record per denoising step).

    ``layers`` / ``single_layers``: dual- and single-stream block indices (the concepts run through every
    dual-stream block before the first single-stream one).
    ``conditional_half``: the forwards batch [uncond; cond]; maps describe the cond half.
    ``rows``: an explicit batch slice instead (e.g. the unconditional half, for contrast).
    ``per_block``: also return the (L, B, C, N) per-block means, double blocks first (before normalisation).
    """
    tr = pipe.transformer
    num_concepts = len(concepts)
    use_softmax = num_concepts > 1 if softmax is None else softmax
    text_states = arch.concept_states(pipe, concepts, pooling, concept_encoder)
    text_states, positions = text_states if isinstance(text_states, tuple) else (text_states, None)
    layers, single_layers = list(layers), list(single_layers)
    total, count = 0.0, 0
    blocks: dict[tuple[int, int], list] = {}
    num_double = len(tr.transformer_blocks)
    last_double = num_double - 1 if single_layers else max(layers)
    for step, record in enumerate(records):
        if steps is not None and step not in steps:
            continue
        fwd = record["forward"]
        batch = fwd["hidden_states"].shape[0]
        keep = rows or (slice(batch // 2, None) if conditional_half else slice(None))
        forward_temb = arch.concept_temb(tr, fwd)[keep] if arch.concept_temb else None
        num_rows = len(range(*keep.indices(batch)))
        c = arch.embed_at(tr, text_states, fwd) if arch.embed_at else arch.embed(tr, text_states)
        c = c.unsqueeze(0).expand(num_rows, -1, -1)
        n = arch.target_tokens(fwd) if arch.target_tokens else None
        for index in range(last_double + 1):
            block = tr.transformer_blocks[index]
            block_temb = arch.block_concept_temb
            temb_c = block_temb(record["blocks"][index])[keep] if block_temb else forward_temb
            to_q, to_k, to_v, norm_q, norm_k, to_out = arch.concept_weights(block)
            qx, kx, vx, o_x = (t[keep] for t in arch.image_attention(block, record["blocks"][index]))
            hd = qx.shape[-1]
            nc, c_gate, c_shift, c_scale, c_gate_mlp = arch.modulation(block, c, temb_c)
            qc, kc, vc = (heads(f(nc), hd) for f in (to_q, to_k, to_v))
            qc, kc = maybe_norm(norm_q, qc), maybe_norm(norm_k, kc)
            if arch.concept_rope:
                rotate = arch.concept_rope(tr, record["blocks"][index], positions)
                qc, kc = rotate(qc), rotate(kc)
            o_c = _naive_concept_attention(qc, kc, vc, qx, kx, vx, concept_keys, num_concepts)  # (B, C, HD)
            if index in layers:
                s = _score(score_space, use_softmax, o_c, o_x, qx, kc, vc, vx, n)
                blocks.setdefault((0, index), []).append(s)
                total = total + s
                count += 1
            # The concept residual stream always takes the attention output, whatever the score.
            c = c + c_gate.unsqueeze(1) * to_out(o_c)
            norm2, ff = arch.feedforward(block)
            normed = norm2(c) * (1 + c_scale[:, None]) + c_shift[:, None]
            c = c + c_gate_mlp.unsqueeze(1) * ff(normed)
        for j in range(max(single_layers) + 1 if single_layers else 0):
            single = arch.single
            assert single is not None, "this architecture has no single-stream reference"
            block, inputs = tr.single_transformer_blocks[j], record["single"][j]
            qx, kx, vx, o_x = (t[keep] for t in single.image_attention(block, inputs, fwd))
            temb_c = single.concept_temb(forward_temb, inputs)
            temb_c = temb_c if temb_c is forward_temb else temb_c[keep]
            qc, kc, vc, mlp, gate = single.concept_branches(block, c, temb_c)
            if arch.concept_rope:
                rotate = arch.concept_rope(tr, inputs, positions)
                qc, kc = rotate(qc), rotate(kc)
            o_c = _naive_concept_attention(qc, kc, vc, qx, kx, vx, concept_keys, num_concepts)
            if j in single_layers:
                s = _score(score_space, use_softmax, o_c, o_x, qx, kc, vc, vx, n)
                blocks.setdefault((1, j), []).append(s)
                total = total + s
                count += 1
            c = c + gate.reshape(gate.shape[0], 1, -1) * single.out(block, o_c, mlp)
    mean = total / count
    if num_concepts == 1:
        low, high = mean.amin(-1, keepdim=True), mean.amax(-1, keepdim=True)
        mean = (mean - low) / (high - low)
    if per_block:
        return mean, torch.stack([sum(v) / len(v) for _, v in sorted(blocks.items())])
    return mean
