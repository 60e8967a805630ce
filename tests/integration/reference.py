"""A plain, slow reference of ConceptAttention for tests, independent of the library's code.

It runs the concept stream block by block from inputs captured on an *untraced* forward,
computing full joint attention over [concepts; image] queries (every row, as a naive
implementation would) and keeping the concept rows.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.embeddings import apply_rotary_emb


def capture_forward_inputs(transformer, run):
    """Run ``run()`` and record, per transformer forward, its kwargs and each double block's inputs."""
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


def concept_text_states(pipe, concepts, pooling):
    """Each concept encoded alone by T5 (no padding), pooled over its own sub-tokens."""
    states = []
    for concept in concepts:
        ids = pipe.tokenizer_2(concept, return_tensors="pt").input_ids  # ends with </s>
        hidden = pipe.text_encoder_2(ids).last_hidden_state[0]  # (S, D)
        own = hidden[:-1]  # drop </s>
        states.append(own[0] if pooling == "first" else own.mean(0))
    return torch.stack(states)  # (C, D)


def _heads(x, head_dim):
    return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)  # (B, H, S, D)


def _plain_attention(q, k, v):
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return weights @ v


@torch.no_grad()
def reference_maps(
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
):
    """(B, C, N) reference maps from captured forwards (one record per denoising step)."""
    tr = pipe.transformer
    num_concepts = len(concepts)
    use_softmax = num_concepts > 1 if softmax is None else softmax
    text_states = concept_text_states(pipe, concepts, pooling)
    total, count = 0.0, 0
    for step, record in enumerate(records):
        if steps is not None and step not in steps:
            continue
        fwd = record["forward"]
        batch = fwd["hidden_states"].shape[0]
        pooled = torch.zeros_like(fwd["pooled_projections"])
        t = fwd["timestep"] * 1000
        if fwd.get("guidance") is not None:
            temb_c = tr.time_text_embed(t, fwd["guidance"] * 1000, pooled)
        else:
            temb_c = tr.time_text_embed(t, pooled)
        c = tr.context_embedder(text_states).unsqueeze(0).expand(batch, -1, -1)
        for index in range(max(layers) + 1):
            block = tr.transformer_blocks[index]
            attn = block.attn
            inp = record["blocks"][index]
            x, txt, temb = inp["hidden_states"], inp["encoder_hidden_states"], inp["temb"]
            rope = inp["image_rotary_emb"]
            hd = attn.head_dim
            nx = block.norm1(x, emb=temb)[0]
            nt = block.norm1_context(txt, emb=temb)[0]
            nc, c_gate, c_shift, c_scale, c_gate_mlp = block.norm1_context(c, emb=temb_c)
            qx, kx, vx = (_heads(f(nx), hd) for f in (attn.to_q, attn.to_k, attn.to_v))
            qx, kx = attn.norm_q(qx.transpose(1, 2)).transpose(1, 2), attn.norm_k(kx.transpose(1, 2)).transpose(1, 2)
            qt, kt, vt = (_heads(f(nt), hd) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            qt = attn.norm_added_q(qt.transpose(1, 2)).transpose(1, 2)
            kt = attn.norm_added_k(kt.transpose(1, 2)).transpose(1, 2)
            qc, kc, vc = (_heads(f(nc), hd) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            qc = attn.norm_added_q(qc.transpose(1, 2)).transpose(1, 2)
            kc = attn.norm_added_k(kc.transpose(1, 2)).transpose(1, 2)
            # RoPE over the real joint sequence [text; image]; concepts sit at text position 0 (identity).
            q_joint = apply_rotary_emb(torch.cat([qt, qx], 2), rope, sequence_dim=2)
            k_joint = apply_rotary_emb(torch.cat([kt, kx], 2), rope, sequence_dim=2)
            text_len = qt.shape[2]
            qx_r, kx_r = q_joint[:, :, text_len:], k_joint[:, :, text_len:]
            real = _plain_attention(q_joint, k_joint, torch.cat([vt, vx], 2))
            o_x = real[:, :, text_len:].transpose(1, 2).flatten(2)  # (B, N, HD)
            # Naive concept attention: every query of [concepts; image], then keep the concept rows.
            keys = {
                "both": (torch.cat([kc, kx_r], 2), torch.cat([vc, vx], 2)),
                "image": (kx_r, vx),
                "concepts": (kc, vc),
            }[concept_keys]
            full = _plain_attention(torch.cat([qc, qx_r], 2), *keys)
            o_c = vc if score_space == "value" else full[:, :, :num_concepts]
            o_c = o_c.transpose(1, 2).flatten(2)  # (B, C, HD)
            if index in layers:
                if score_space == "output":
                    s = o_c @ o_x.transpose(1, 2)
                elif score_space == "value":
                    s = vc.transpose(1, 2).flatten(2) @ vx.transpose(1, 2).flatten(2).transpose(1, 2)
                else:
                    logits = qx_r @ kc.transpose(-1, -2) / math.sqrt(hd)  # (B, H, N, C)
                    if use_softmax:
                        logits = logits.softmax(-1)
                    s = logits.mean(1).transpose(1, 2)
                if use_softmax and score_space != "cross_attention":
                    s = s.softmax(1)
                total = total + s
                count += 1
            c = c + c_gate.unsqueeze(1) * attn.to_add_out(o_c)
            normed = block.norm2_context(c) * (1 + c_scale[:, None]) + c_shift[:, None]
            c = c + c_gate_mlp.unsqueeze(1) * block.ff_context(normed)
    mean = total / count
    if num_concepts == 1:
        low, high = mean.amin(-1, keepdim=True), mean.amax(-1, keepdim=True)
        mean = (mean - low) / (high - low)
    return mean
