"""A plain, written-out reference of Z-Image's transformer pieces for tests, independent of the library.

``ZImageTransformer2DModel`` (diffusers) is single-stream: every block runs one self-attention over a joint
sequence. In basic (non-omni) mode, per batch item ``i``:

* image: the latent ``(C, 1, H, W)`` is cut into ``N = (H / 2) * (W / 2)`` patches (patch 2, frame patch 1),
  embedded by ``all_x_embedder["2-1"]`` and padded to ``Npad``, a multiple of 32, with the learned
  ``x_pad_token`` (the pad rows are *replaced* by the token after embedding; they are not masked, so they are
  keys and values like any image token); positions ``(Lpad + 1, h, w)``, the pads at ``(0, 0, 0)``;
* caption: the ``(L, D_text)`` text states are padded to ``Lpad`` (a multiple of 32), embedded by
  ``cap_embedder`` (RMSNorm then Linear) and the pad rows replaced by ``cap_pad_token`` (not masked either);
  positions ``(1 + l, 0, 0)`` for ``l < Lpad`` (the pads continue the count);
* the image alone goes through ``noise_refiner`` (modulated blocks), the caption alone through
  ``context_refiner`` (``modulation=False`` blocks), then ``[image (Npad rows); caption (Lpad rows)]``
  through ``layers`` (modulated). Items of different lengths are right-padded with zeros (and zero
  ``freqs_cis``) to the longest one and a ``(B, S)`` boolean key mask (True = real row) is passed; when every
  item has the same length the mask is ``None``.

Everything here uses torch and the model's own weights / modules (Linear layers, the norms' weights and eps,
``rope_embedder``, the pad tokens); RMSNorm, RoPE, the modulation and the attention are written out.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F

SEQ_MULTIPLE = 32  # image and caption tokens of each item are padded to a multiple of this
PATCH = 2  # basic-mode spatial patch size (frame patch 1)


# -- plain pieces ---------------------------------------------------------------------------------
def rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """``x * rsqrt(mean(x^2) + eps) * weight`` over the last dim, with the norm's weight and eps (fp32 statistics)."""
    out = x * torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + norm.eps)
    if norm.weight is None:
        return out.to(x.dtype)
    if norm.weight.dtype in (torch.float16, torch.bfloat16):
        out = out.to(norm.weight.dtype)
    return out * norm.weight


def heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, S, H * D) -> (B, H, S, D)."""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def merge(x: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> (B, S, H * D)."""
    return x.transpose(1, 2).flatten(2)


def rotate(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Complex RoPE written with real arithmetic: consecutive pairs ``(a, b)`` of the head dim are rotated by the
    angle of ``freqs_cis``: ``(a cos - b sin, a sin + b cos)``, computed in fp32 and cast back.

    x: (B, H, S, D); freqs_cis: (B, S, D / 2) complex (zeros on batch-padding rows, which then give zeros).
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = freqs_cis.real[:, None], freqs_cis.imag[:, None]  # (B, 1, S, D / 2)
    return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2).to(x.dtype)


def plain_attention(q, k, v, key_mask=None):
    """softmax(q k^T / sqrt(D)) v with no SDPA; ``key_mask`` (B, S) bool drops the keys where it is False.

    q: (B, H, Sq, D); k, v: (B, H, S, D) -> (B, H, Sq, D).
    """
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1) @ v


def swiglu(ff, x: torch.Tensor) -> torch.Tensor:
    """The block's feed-forward: ``w2(silu(w1 x) * w3 x)`` (no biases)."""
    return ff.w2(F.silu(ff.w1(x)) * ff.w3(x))


# -- one block --------------------------------------------------------------------------------------
def block_modulation(block, adaln_input: torch.Tensor | None):
    """(scale_msa, gate_msa, scale_mlp, gate_mlp), each (B, 1, dim), of a modulated block; ``None`` for a
    ``modulation=False`` (refiner) block.

    ``adaLN_modulation`` is one Linear (no SiLU before it) on ``adaln_input`` (B, min(dim, 256)); its 4 * dim
    output splits into scale / gate pairs (no shift); the scales are used as ``1 + scale``, the gates as
    ``tanh(gate)``.
    """
    if not block.modulation:
        return None
    linear = block.adaLN_modulation[0]
    scale_msa, gate_msa, scale_mlp, gate_mlp = linear(adaln_input)[:, None].chunk(4, dim=-1)
    return 1 + scale_msa, gate_msa.tanh(), 1 + scale_mlp, gate_mlp.tanh()


def attention_input(block, x: torch.Tensor, adaln_input: torch.Tensor | None = None) -> torch.Tensor:
    """What the attention reads: ``attention_norm1(x)``, times ``1 + scale_msa`` in a modulated block. (B, S, dim)."""
    normed = rms_norm(block.attention_norm1, x)
    mod = block_modulation(block, adaln_input)
    return normed if mod is None else normed * mod[0]


def attention_parts(block, normed: torch.Tensor, attn_mask: torch.Tensor | None, freqs_cis: torch.Tensor):
    """The block's self-attention on ``normed`` (B, S, dim), written out.

    Returns (q, k, v, o): q and k (B, H, S, D) after the per-head RMS QK-norm and RoPE, v (B, H, S, D), and o
    (B, S, H * D), the attention output before ``to_out``. ``attn_mask``: (B, S) bool key mask or None.
    """
    attn = block.attention
    q, k, v = (heads(f(normed), attn.heads) for f in (attn.to_q, attn.to_k, attn.to_v))
    q, k = rms_norm(attn.norm_q, q), rms_norm(attn.norm_k, k)  # over D, per head
    q, k = rotate(q, freqs_cis), rotate(k, freqs_cis)
    return q, k, v, merge(plain_attention(q, k, v, attn_mask))


def zimage_block(block, x, attn_mask, freqs_cis, adaln_input=None) -> torch.Tensor:
    """One ``ZImageTransformerBlock`` (basic mode, no per-token noise mask), written out.

    x: (B, S, dim); attn_mask: (B, S) bool or None; freqs_cis: (B, S, D / 2) complex; adaln_input:
    (B, min(dim, 256)) for a modulated block (ignored by a refiner block). Returns (B, S, dim)::

        x = x + tanh(g_msa) * attention_norm2(to_out(attn(attention_norm1(x) * (1 + s_msa))))
        x = x + tanh(g_mlp) * ffn_norm2(ffn(ffn_norm1(x) * (1 + s_mlp)))

    (without modulation, the same with no scales and no gates).
    """
    mod = block_modulation(block, adaln_input)
    normed = rms_norm(block.attention_norm1, x)
    if mod is not None:
        normed = normed * mod[0]
    o = attention_parts(block, normed, attn_mask, freqs_cis)[3]
    attn_out = rms_norm(block.attention_norm2, block.attention.to_out[0](o))
    x = x + (attn_out if mod is None else mod[1] * attn_out)
    normed = rms_norm(block.ffn_norm1, x)
    if mod is not None:
        normed = normed * mod[2]
    ff_out = rms_norm(block.ffn_norm2, swiglu(block.feed_forward, normed))
    return x + (ff_out if mod is None else mod[3] * ff_out)


def zimage_image_attention(block, inputs: dict, n: int):
    """(q_x, k_x, v_x, o_x) of the first ``n`` (image) rows of the block's real attention.

    ``inputs``: the block's captured arguments (``x``, ``attn_mask``, ``freqs_cis``, ``adaln_input``). q_x and
    k_x (B, H, n, D) after QK-norm and RoPE, v_x (B, H, n, D), o_x (B, n, H * D) before ``to_out``. The keys
    of that attention are the whole row, image pads and caption pads included (only batch padding is masked).
    """
    normed = attention_input(block, inputs["x"], inputs.get("adaln_input"))
    q, k, v, o = attention_parts(block, normed, inputs.get("attn_mask"), inputs["freqs_cis"])
    return q[:, :, :n], k[:, :, :n], v[:, :, :n], o[:, :n]


# -- sequences and positions ------------------------------------------------------------------------
def padded(length: int) -> int:
    """``length`` rounded up to a multiple of 32."""
    return length + (-length) % SEQ_MULTIPLE


def zimage_image_token_count(latent: torch.Tensor, patch_size: int = PATCH) -> int:
    """N, the real image tokens of a (C, F, H, W) latent (the rows before any ``x_pad_token``)."""
    _, frames, height, width = latent.shape
    return frames * (height // patch_size) * (width // patch_size)


def zimage_patchify(latent: torch.Tensor, patch_size: int = PATCH) -> torch.Tensor:
    """(C, F, H, W) -> (N, patch * patch * C) patches in (f, h, w) order, each ``(ph, pw, c)`` flattened."""
    c, frames, height, width = latent.shape
    p = patch_size
    grid = latent.reshape(c, frames, 1, height // p, p, width // p, p)
    return grid.permute(1, 3, 5, 2, 4, 6, 0).reshape(frames * (height // p) * (width // p), p * p * c)


def zimage_caption_positions(length: int) -> torch.Tensor:
    """(Lpad, 3) RoPE ids of a caption of ``length`` tokens: row l at (1 + l, 0, 0), the pads continuing."""
    ids = torch.zeros(padded(length), 3, dtype=torch.long)
    ids[:, 0] = torch.arange(1, padded(length) + 1)
    return ids


def zimage_image_positions(caption_padded: int, h_tokens: int, w_tokens: int) -> torch.Tensor:
    """(Npad, 3) RoPE ids of an image of h_tokens x w_tokens patches after a caption padded to ``caption_padded``:
    patch (h, w) at (caption_padded + 1, h, w) in row-major order, the pads at (0, 0, 0)."""
    hh, ww = torch.meshgrid(torch.arange(h_tokens), torch.arange(w_tokens), indexing="ij")
    real = torch.stack([torch.full_like(hh, caption_padded + 1), hh, ww], -1).reshape(-1, 3)
    return torch.cat([real, torch.zeros(padded(len(real)) - len(real), 3, dtype=torch.long)])


def zimage_concept_sequence(transformer, states: torch.Tensor, pooling_span: tuple[int, int] | None = None):
    """A caption's refined sequence, embedded as the forward embeds a caption, alone in its batch.

    states: (L, D_text) text-encoder states (e.g. ``pipe._encode_prompt([text])[0]``, template included).
    ``cap_embedder`` (RMSNorm, Linear), pad rows ``cap_pad_token`` up to Lpad (a multiple of 32), RoPE ids
    (1 + l, 0, 0) through the model's ``rope_embedder``, then every ``context_refiner`` block with no mask.
    ``pooling_span``: optional (start, end) of the tokens a caller will pool; checked to lie within the L real
    tokens (the pad rows carry no text). Returns (Lpad, dim).
    """
    length = states.shape[0]
    if pooling_span is not None:
        start, end = pooling_span
        assert 0 <= start < end <= length, f"span {pooling_span} is not within the {length} real caption tokens"
    norm, linear = transformer.cap_embedder[0], transformer.cap_embedder[1]
    embedded = linear(rms_norm(norm, states))
    pad = transformer.cap_pad_token.expand(padded(length) - length, -1).to(embedded.dtype)
    seq = torch.cat([embedded, pad])[None]  # (1, Lpad, dim)
    freqs = transformer.rope_embedder(zimage_caption_positions(length).to(states.device))[None]
    for block in transformer.context_refiner:
        seq = zimage_block(block, seq, None, freqs)
    return seq[0]


# -- capture ----------------------------------------------------------------------------------------
BLOCK_GROUPS = ("noise_refiner", "context_refiner", "layers")


def capture_zimage_inputs(transformer, run):
    """Run ``run()`` and record, per transformer forward, its arguments and every block's arguments and output.

    Blocks are called positionally (``layer(x, attn_mask, freqs_cis, adaln_input, noise_mask, t_noisy,
    t_clean)``, refiners ``layer(x, attn_mask, freqs_cis)``); their arguments are bound to names by signature.
    Returns (records, result); a record is ``{"forward": {...}, "noise_refiner": [kwargs, ...],
    "context_refiner": [...], "layers": [...], "outputs": {group: [output, ...]}}``.
    """
    records = []

    def on_forward(module, args, kwargs):
        bound = dict(inspect.signature(module.forward).bind(*args, **kwargs).arguments)
        records.append({"forward": bound, **{g: [] for g in BLOCK_GROUPS}, "outputs": {g: [] for g in BLOCK_GROUPS}})

    def on_block(group):
        def hook(module, args, kwargs):
            records[-1][group].append(dict(inspect.signature(module.forward).bind(*args, **kwargs).arguments))

        return hook

    def on_output(group):
        def hook(module, args, kwargs, output):
            records[-1]["outputs"][group].append(output)

        return hook

    handles = [transformer.register_forward_pre_hook(on_forward, with_kwargs=True)]
    for group in BLOCK_GROUPS:
        for block in getattr(transformer, group):
            handles.append(block.register_forward_pre_hook(on_block(group), with_kwargs=True))
            handles.append(block.register_forward_hook(on_output(group), with_kwargs=True))
    try:
        result = run()
    finally:
        for h in handles:
            h.remove()
    return records, result


# -- ConceptAttention through Z-Image's layers, written out -------------------------------------------
CAPTION_HEADER = "<|im_start|>user\n"  # the chat template's tokens before the prompt


def zimage_concept_states(pipe, concepts, pooling: str = "first", length: int = 512):
    """Each concept alone through the pipeline's own ``_encode_prompt`` and the context refiner (its whole templated
    caption, as a one-prompt forward refines it), then its own sub-tokens pooled.

    Returns ((C, dim) concept tokens, (C,) caption index of each concept's first sub-token).
    """
    tok, tr = pipe.tokenizer, pipe.transformer
    start = len(tok(CAPTION_HEADER, add_special_tokens=False).input_ids)
    tokens, starts = [], []
    for concept in concepts:
        states = pipe._encode_prompt([concept], max_sequence_length=length)[0]  # (L, D_text)
        own = len(tok(concept, add_special_tokens=False).input_ids)
        refined = zimage_concept_sequence(tr, states, (start, start + own))[start : start + own]
        tokens.append(refined[0] if pooling == "first" else refined.mean(0))
        starts.append(start)
    return torch.stack(tokens), starts


@torch.no_grad()
def zimage_reference_maps(
    pipe,
    records,
    concepts,
    *,
    single_layers,
    score_space="output",
    concept_keys="both",
    softmax=None,
    pooling="first",
    conditional_half=False,
    per_block=False,
):
    """(B, C, N) reference maps from captured Z-Image forwards (``capture_zimage_inputs``, one record per step).

    Per forward: the concept tokens enter the first layer; in each layer up to the last selected they are modulated
    with the layer's ``adaln_input`` (timestep only), projected by the shared q/k/v, RMS QK-normed and rotated with the
    forward's own RoPE row of the caption token their first sub-token would be (the caption index in its own
    template), attend over the chosen keys among [concepts; the N real image tokens] (image pad tokens and the
    caption are never keys), and are updated with the layer's gates, ``to_out``, norms and feed-forward.
    ``conditional_half``: the forwards batch [cond; uncond]; maps describe the first half.
    """
    import naive_reference as nr

    tr = pipe.transformer
    num_concepts = len(concepts)
    use_softmax = num_concepts > 1 if softmax is None else softmax
    tokens, starts = zimage_concept_states(pipe, concepts, pooling)
    selected = sorted(single_layers)
    total, count, per = 0.0, 0, {}
    for record in records:
        fwd = record["forward"]
        batch = len(fwd["x"])
        keep = slice(0, batch // 2) if conditional_half else slice(None)
        n = zimage_image_token_count(fwd["x"][0])
        n_padded = padded(n)
        c = tokens.unsqueeze(0).expand(len(range(*keep.indices(batch))), -1, -1)
        for j in range(selected[-1] + 1):
            block, inputs = tr.layers[j], record["layers"][j]
            qx, kx, vx, ox = (t[keep] for t in zimage_image_attention(block, inputs, n))
            scale_msa, gate_msa, scale_mlp, gate_mlp = block_modulation(block, inputs["adaln_input"][keep])
            normed = rms_norm(block.attention_norm1, c) * scale_msa
            attn = block.attention
            qc, kc, vc = (heads(f(normed), attn.heads) for f in (attn.to_q, attn.to_k, attn.to_v))
            qc, kc = rms_norm(attn.norm_q, qc), rms_norm(attn.norm_k, kc)
            # the forward's own rotation of caption row `start` (the caption follows the padded image)
            freqs = torch.stack([inputs["freqs_cis"][keep][:, n_padded + s] for s in starts], 1)  # (B, C, D / 2)
            qc, kc = rotate(qc, freqs), rotate(kc, freqs)
            o_c = nr._naive_concept_attention(qc, kc, vc, qx, kx, vx, concept_keys, num_concepts)
            if j in selected:
                s = nr._score(score_space, use_softmax, o_c, ox, qx, kc, vc, vx, n)
                per.setdefault(j, []).append(s)
                total, count = total + s, count + 1
            c = c + gate_msa * rms_norm(block.attention_norm2, attn.to_out[0](o_c))
            c = c + gate_mlp * rms_norm(
                block.ffn_norm2, swiglu(block.feed_forward, rms_norm(block.ffn_norm1, c) * scale_mlp)
            )
    mean = total / count
    if num_concepts == 1:
        low, high = mean.amin(-1, keepdim=True), mean.amax(-1, keepdim=True)
        mean = (mean - low) / (high - low)
    if per_block:
        return mean, torch.stack([sum(v) / len(v) for _, v in sorted(per.items())])
    return mean
