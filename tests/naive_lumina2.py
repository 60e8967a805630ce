"""A plain, written-out reference of Lumina-Image 2.0's transformer pieces for tests, independent of the library.

Facts read from diffusers 0.42.1 (``transformer_lumina2.py``, ``pipeline_lumina2.py``) and checked by
``tests/integration/test_lumina2_reference.py``:

Pipeline (``Lumina2Pipeline``)

* prompt template: ``system_prompt + " <Prompt Start> " + prompt`` with ``system_prompt`` = "You are an assistant
  designed to generate superior images with the superior degree of image-text alignment based on textual prompts
  or user prompts."; the negative prompt (default ``""``) gets *no* template. The tokenizer (Gemma: ``<bos>``
  first, no ``<eos>``) pads on the right (the pipeline sets ``padding_side = "right"``) to ``max_length =
  max_sequence_length`` (256 by default, at most 512), with truncation and an attention mask. The caption is
  then ``[<bos>; system prompt; " <Prompt Start>"; prompt; <pad>...]``: the first prompt token sits at index
  ``len(tokenizer(system_prompt + " <Prompt Start>").input_ids)`` (<bos> included; 30 with the tiny tokenizer of
  ``tests/tiny_lumina2.py``: 1 <bos> + 25 system-prompt tokens + 4 for " <Prompt Start>"), see
  :func:`lumina2_prompt_start`.
* text states: ``Gemma2Model(ids, attention_mask, output_hidden_states=True).hidden_states[-2]``, the output of
  the second-to-last decoder layer (``hidden_states[-1]`` is the last layer after the final norm). All
  ``max_length`` rows (pads too) are passed on, with the tokenizer's (int64) attention mask.
* CFG (``guidance_scale > 1``) is *not* a batched ``[cond; uncond]`` / ``[uncond; cond]`` call: every step runs the
  transformer twice, first on the conditional batch (the B prompts), then on the unconditional one (the B
  negative prompts), each a batch of B; ``cfg_trunc_ratio`` (default 1.0) drops the second call once
  ``(i + 1) / steps > cfg_trunc_ratio`` (never with the default); ``cfg_normalization`` (default True) rescales
  the guided prediction to the conditional one's norm over the last (width) axis.
* timestep: the transformer receives ``1 - t / 1000`` (= 1 - sigma) per batch row: **0 = noise, 1 = clean**. The
  transformer's output is negated before the scheduler step (it predicts the velocity noise -> image).
* latents: ``(B, C, 2 * (height // 16), 2 * (width // 16))`` (VAE factor hard-coded to 8); decode with
  ``latents / scaling_factor + shift_factor``.

Transformer (``Lumina2Transformer2DModel``), per batch item ``i`` with ``L_i = encoder_attention_mask[i].sum()``
valid caption tokens (the mask is assumed right-padded: valid rows first) and ``N = (H / 2) * (W / 2)`` patches:

* ``time_caption_embed``: ``temb = timestep_embedder(time_proj(t))`` (B, min(dim, 1024)); every caption row (pads
  too) through ``caption_embedder`` = ``[RMSNorm, Linear]``.
* image: ``(C, H, W)`` cut into 2 x 2 patches in row-major (h, w) order, each flattened as ``(ph, pw, c)``, then
  ``x_embedder`` (Linear).
* positions (3 RoPE axes ``axes_dim_rope``, theta 10000, float64 tables, so ``freqs`` are complex128): caption row
  ``l < L_i`` at ``(l, 0, 0)``; image patch ``(h, w)`` at ``(L_i, h, w)``.
* ``context_refiner`` (``modulation=False`` blocks): the whole padded caption ``(B, max_length, dim)`` with the
  tokenizer mask as key mask and caption freqs that are the rope of ``(l, 0, 0)`` on valid rows and **zero** on
  pad rows (so q and k of pad rows are zero; pad rows are still computed as queries but are dropped below).
* ``noise_refiner`` (modulated): the image rows alone, no mask, image freqs.
* ``layers`` (modulated): per item ``[caption (L_i valid rows); image (N rows)]``, right-padded with zeros to
  ``S = max_i(L_i) + N``; freqs of the whole padded row from positions that are ``(0, 0, 0)`` on the padding
  (rope 1, not 0); the key mask ``(B, S)`` bool (True on the first ``L_i + N`` rows) is passed only when the items'
  lengths differ, otherwise ``None``.
* ``norm_out`` then unpatchify the image rows ``L_i : L_i + N`` of each item.

One ``Lumina2TransformerBlock`` (``block.attn`` an ``Attention`` with ``Lumina2AttnProcessor2_0``; ``block.norm1``
``LuminaRMSNormZero`` (modulated: ``.linear``, ``.norm``) or ``RMSNorm``; ``block.norm2``, ``block.ffn_norm1``,
``block.ffn_norm2`` RMSNorms; ``block.feed_forward`` ``LuminaFeedForward`` (``linear_1``, ``linear_2``,
``linear_3``)), with ``scale_msa, gate_msa, scale_mlp, gate_mlp = norm1.linear(silu(temb)).chunk(4)``::

    x = x + tanh(gate_msa) * norm2(attn(norm1.norm(x) * (1 + scale_msa)))
    x = x + tanh(gate_mlp) * ffn_norm2(ffn(ffn_norm1(x) * (1 + scale_mlp)))

(without modulation: ``x = x + norm2(attn(norm1(x)))``, ``x = x + ffn_norm2(ffn(ffn_norm1(x)))``). ``attn``: q, k, v
projections (no bias; K/V have ``num_kv_heads`` heads, grouped: query head h reads K/V head ``h // (H / H_kv)``),
per-head RMS QK-norm (``attn.norm_q`` / ``attn.norm_k`` over the head dim), complex RoPE on consecutive pairs
(``use_real=False``; computed in the freqs' complex128 and cast back), ``softmax(q k^T * attn.scale) v`` with the
boolean key mask, and **``to_out`` (Linear, no bias, then Dropout) applied inside the processor**, so the block's
``attn(...)`` output is already projected. ``ffn(x) = linear_2(silu(linear_1 x) * linear_3 x)``.

Everything here uses torch and the model's own weights (Linear layers, the norms' weights and eps, the config's
``axes_dim_rope``); RMSNorm, RoPE (tables included), the modulation and the attention are written out.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

PATCH = 2
ROPE_THETA = 10000.0
BLOCK_GROUPS = ("noise_refiner", "context_refiner", "layers")
TEMPLATE_SEPARATOR = " <Prompt Start> "


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


def rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Complex RoPE written with real arithmetic: consecutive pairs ``(a, b)`` of the head dim become
    ``(a cos - b sin, a sin + b cos)`` with ``cos + i sin = freqs``, computed in the freqs' precision (float64 for
    Lumina-2's complex128 freqs) and cast back. A zero ``freqs`` row gives zeros.

    x: (B, H, S, D); freqs: (B, S, D / 2) complex.
    """
    cos, sin = freqs.real[:, None], freqs.imag[:, None]  # (B, 1, S, D / 2)
    pairs = x.to(cos.dtype).unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2).to(x.dtype)


def repeat_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, H_kv, S, D) -> (B, num_heads, S, D): query head h reads K/V head ``h // (num_heads / H_kv)``."""
    return x.repeat_interleave(num_heads // x.shape[1], dim=1)


def plain_attention(q, k, v, scale: float, key_mask=None):
    """softmax(q k^T * scale) v with no SDPA; ``key_mask`` (B, S) (bool or 0/1) drops the keys where it is False.

    The softmax is normalised after the product with v (``exp(l - max) @ v / sum exp(l - max)``), the order of
    the fused CPU kernel, which keeps the fp32 difference to it small (the context refiner has no gate to damp
    it). q: (B, H, Sq, D); k, v: (B, H, S, D) -> (B, H, Sq, D).
    """
    logits = (q @ k.transpose(-1, -2)) * scale
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    weights = torch.exp(logits - logits.amax(-1, keepdim=True))
    return (weights @ v) / weights.sum(-1, keepdim=True)


def swiglu(ff, x: torch.Tensor) -> torch.Tensor:
    """``LuminaFeedForward``: ``linear_2(silu(linear_1 x) * linear_3 x)`` (no biases; silu in fp32)."""
    return ff.linear_2(F.silu(ff.linear_1(x).float()).to(x.dtype) * ff.linear_3(x))


# -- one block --------------------------------------------------------------------------------------
def block_modulation(block, temb: torch.Tensor | None):
    """(1 + scale_msa, tanh(gate_msa), 1 + scale_mlp, tanh(gate_mlp)), each (B, 1, dim), of a modulated block;
    ``None`` for a ``modulation=False`` (context refiner) block.

    ``norm1.linear`` (with bias) on ``silu(temb)`` (B, min(dim, 1024)); its 4 * dim output splits into
    scale_msa, gate_msa, scale_mlp, gate_mlp (no shifts).
    """
    if not block.modulation:
        return None
    scale_msa, gate_msa, scale_mlp, gate_mlp = block.norm1.linear(F.silu(temb))[:, None].chunk(4, dim=-1)
    return 1 + scale_msa, gate_msa.tanh(), 1 + scale_mlp, gate_mlp.tanh()


def attention_input(block, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
    """What the attention reads: ``norm1(x)`` (refiner) or ``norm1.norm(x) * (1 + scale_msa)``. (B, S, dim)."""
    mod = block_modulation(block, temb)
    if mod is None:
        return rms_norm(block.norm1, x)
    return rms_norm(block.norm1.norm, x) * mod[0]


def attention_parts(block, normed: torch.Tensor, mask: torch.Tensor | None, freqs: torch.Tensor):
    """The block's self-attention on ``normed`` (B, S, dim), written out.

    Returns (q, k, v, o): q and k (B, H, S, D) after the per-head RMS QK-norm and RoPE, k and v widened from the
    ``num_kv_heads`` K/V heads to the H query heads (as the kernel reads them), and o (B, S, H * D), the attention
    output before ``to_out``. ``mask``: (B, S) key mask or None.
    """
    attn = block.attn
    q = heads(attn.to_q(normed), attn.heads)
    head_dim = q.shape[-1]
    k = heads(attn.to_k(normed), attn.to_k.out_features // head_dim)
    v = heads(attn.to_v(normed), attn.to_v.out_features // head_dim)
    q, k = rms_norm(attn.norm_q, q), rms_norm(attn.norm_k, k)  # over D, per head
    q, k = rotate(q, freqs), rotate(k, freqs)
    k, v = repeat_kv(k, attn.heads), repeat_kv(v, attn.heads)
    return q, k, v, merge(plain_attention(q, k, v, 1 / math.sqrt(head_dim), mask))


def block_from_attention(block, x: torch.Tensor, o: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
    """The block's output rows from its input rows ``x`` (B, n, dim) and their attention output ``o`` (B, n, H * D)
    before ``to_out``: everything after the attention is row-wise."""
    mod = block_modulation(block, temb)
    attn_out = rms_norm(block.norm2, block.attn.to_out[0](o))
    x = x + (attn_out if mod is None else mod[1] * attn_out)
    normed = rms_norm(block.ffn_norm1, x)
    if mod is not None:
        normed = normed * mod[2]
    ff_out = rms_norm(block.ffn_norm2, swiglu(block.feed_forward, normed))
    return x + (ff_out if mod is None else mod[3] * ff_out)


def lumina2_block(block, x, mask, freqs, temb=None) -> torch.Tensor:
    """One ``Lumina2TransformerBlock``, written out (formula in the module docstring).

    x: (B, S, dim); mask: (B, S) key mask or None; freqs: (B, S, D / 2) complex; temb: (B, min(dim, 1024)) for a
    modulated block (ignored by a context-refiner block). Returns (B, S, dim).
    """
    o = attention_parts(block, attention_input(block, x, temb), mask, freqs)[3]
    return block_from_attention(block, x, o, temb)


def lumina2_image_attention(block, inputs: dict, image_slice: slice | Sequence[slice]):
    """(q_x, k_x, v_x, o_x) of the image rows of the block's real attention.

    ``inputs``: the block's captured arguments (``hidden_states``, ``attention_mask``, ``image_rotary_emb``,
    ``temb``). ``image_slice``: the image rows, one slice for every item (``slice(0, N)`` in the noise refiner) or
    one per item (``slice(L_i, L_i + N)`` in the main layers). q_x, k_x, v_x (B, H, N, D) (k, v widened to the
    query heads, q and k after QK-norm and RoPE), o_x (B, N, H * D) before ``to_out``. The keys of that attention
    are every row the mask keeps (caption and image).
    """
    normed = attention_input(block, inputs["hidden_states"], inputs.get("temb"))
    parts = attention_parts(block, normed, inputs.get("attention_mask"), inputs["image_rotary_emb"])
    if isinstance(image_slice, slice):
        image_slice = [image_slice] * normed.shape[0]
    q, k, v, o = (torch.stack([t[i, ..., s, :] for i, s in enumerate(image_slice)]) for t in parts)
    return q, k, v, o


# -- sequences and positions ------------------------------------------------------------------------
def lumina2_prompt_start(tokenizer, system_prompt: str) -> int:
    """Index of the first prompt token in a templated caption: the length of ``system_prompt + " <Prompt Start>"``
    tokenised (the tokenizer's ``<bos>`` included)."""
    return len(tokenizer(system_prompt + TEMPLATE_SEPARATOR.rstrip()).input_ids)


def lumina2_patchify(latent: torch.Tensor, patch_size: int = PATCH) -> torch.Tensor:
    """(C, H, W) -> (N, patch * patch * C) patches in row-major (h, w) order, each ``(ph, pw, c)`` flattened."""
    c, height, width = latent.shape
    p = patch_size
    grid = latent.reshape(c, height // p, p, width // p, p)
    return grid.permute(1, 3, 2, 4, 0).reshape((height // p) * (width // p), p * p * c)


def lumina2_caption_positions(length: int) -> torch.Tensor:
    """(length, 3) RoPE ids of the valid caption rows: row l at (l, 0, 0)."""
    ids = torch.zeros(length, 3, dtype=torch.long)
    ids[:, 0] = torch.arange(length)
    return ids


def lumina2_image_positions(caption_length: int, h_tokens: int, w_tokens: int) -> torch.Tensor:
    """(N, 3) RoPE ids of an image of h_tokens x w_tokens patches after ``caption_length`` valid caption tokens:
    patch (h, w) at (caption_length, h, w), row-major."""
    hh, ww = torch.meshgrid(torch.arange(h_tokens), torch.arange(w_tokens), indexing="ij")
    return torch.stack([torch.full_like(hh, caption_length), hh, ww], -1).reshape(-1, 3)


def lumina2_joint_positions(caption_length: int, h_tokens: int, w_tokens: int, total: int) -> torch.Tensor:
    """(total, 3) ids of one item's main-layer row: caption, image, then (0, 0, 0) on the batch padding."""
    ids = torch.cat(
        [lumina2_caption_positions(caption_length), lumina2_image_positions(caption_length, h_tokens, w_tokens)]
    )
    return torch.cat([ids, torch.zeros(total - len(ids), 3, dtype=torch.long)])


def lumina2_rope(ids: torch.Tensor, axes_dim: Sequence[int], theta: float = ROPE_THETA) -> torch.Tensor:
    """(..., 3) integer ids -> (..., sum(axes_dim) / 2) complex128: per axis of width d, ``exp(i * pos * w_j)`` with
    ``w_j = theta ** (-2j / d)``, j < d / 2, in float64; the axes concatenated."""
    out = []
    for axis, d in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        angle = ids[..., axis : axis + 1].to(torch.float64) * omega
        out.append(torch.polar(torch.ones_like(angle), angle))
    return torch.cat(out, dim=-1)


def lumina2_caption_freqs(mask_row: torch.Tensor, axes_dim: Sequence[int]) -> torch.Tensor:
    """(L, D / 2) context-refiner freqs of one caption row: rope of (l, 0, 0) on the valid rows, zero on the pads."""
    length = int(mask_row.sum())
    assert bool(mask_row[:length].all()), "the caption mask must be right-padded"
    freqs = torch.zeros(mask_row.shape[0], sum(axes_dim) // 2, dtype=torch.complex128)
    freqs[:length] = lumina2_rope(lumina2_caption_positions(length), axes_dim)
    return freqs


def lumina2_concept_sequence(transformer, states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """A caption's refined sequence, as the forward embeds a one-caption batch.

    states: (L, D_text) text-encoder states (e.g. a row of ``pipe.encode_prompt``'s prompt embeds, template and
    pads included); mask: (L,) the tokenizer's attention mask (right-padded), None = all rows valid.
    ``caption_embedder`` (RMSNorm, Linear) on every row, then every ``context_refiner`` block with the mask as key
    mask and freqs that are the rope of (l, 0, 0) on valid rows and zero on pads. Returns (L, dim); only the
    first ``mask.sum()`` rows enter the joint sequence.
    """
    if mask is None:
        mask = torch.ones(states.shape[0], dtype=torch.long, device=states.device)
    norm, linear = transformer.time_caption_embed.caption_embedder
    seq = linear(rms_norm(norm, states))[None]
    freqs = lumina2_caption_freqs(mask.cpu(), transformer.config.axes_dim_rope).to(states.device)[None]
    for block in transformer.context_refiner:
        seq = lumina2_block(block, seq, mask[None], freqs)
    return seq[0]


# -- capture ----------------------------------------------------------------------------------------
def capture_lumina2_inputs(transformer, run):
    """Run ``run()`` and record, per transformer forward, its arguments and every block's arguments and output.

    Blocks are called positionally (``layer(hidden_states, attention_mask, image_rotary_emb[, temb])``); their
    arguments are bound to names by signature (a context-refiner record has no ``temb``). Returns (records,
    result); a record is ``{"forward": {...}, "noise_refiner": [kwargs, ...], "context_refiner": [...],
    "layers": [...], "outputs": {group: [output, ...]}}``. With CFG the forwards alternate cond, uncond.
    """
    records = []

    def bind(module, args, kwargs):
        return dict(inspect.signature(module.forward).bind(*args, **kwargs).arguments)

    def on_forward(module, args, kwargs):
        records.append({"forward": bind(module, args, kwargs), **{g: [] for g in BLOCK_GROUPS}})
        records[-1]["outputs"] = {g: [] for g in BLOCK_GROUPS}

    def on_block(group):
        def hook(module, args, kwargs):
            records[-1][group].append(bind(module, args, kwargs))

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


# -- ConceptAttention through Lumina-2's layers, written out ------------------------------------------
def lumina2_concept_states(pipe, concepts, pooling: str = "first", length: int = 256):
    """Each concept alone through the pipeline's own ``encode_prompt`` (its template) and the context refiner, as a
    one-prompt forward refines it; the concept is the caption's last valid tokens, pooled.

    Returns ((C, dim) concept tokens, caption index of the first prompt token).
    """
    tr = pipe.transformer
    start = lumina2_prompt_start(pipe.tokenizer, pipe.system_prompt)
    tokens = []
    for concept in concepts:
        embeds, mask, _, _ = pipe.encode_prompt(
            [concept], do_classifier_free_guidance=False, max_sequence_length=length
        )
        refined = lumina2_concept_sequence(tr, embeds[0], mask[0])[start : int(mask[0].sum())]
        tokens.append(refined[0] if pooling == "first" else refined.mean(0))
    return torch.stack(tokens), start


@torch.no_grad()
def lumina2_reference_maps(
    pipe,
    records,
    concepts,
    *,
    single_layers,
    score_space="output",
    concept_keys="both",
    softmax=None,
    pooling="first",
    per_block=False,
):
    """(B, C, N) reference maps from captured conditional Lumina-2 forwards (one record per step).

    Per forward: the concept tokens enter the first layer; in each layer up to the last selected they are modulated
    with the layer's ``temb``, projected by the shared q/k/v (K/V widened to the query heads), RMS QK-normed and
    rotated with the forward's own RoPE of the caption row where a prompt's first token sits, attend over the chosen
    keys among [concepts; each item's N image rows] (the caption never), and are updated with the layer's own
    gates, ``to_out``, norms and feed-forward.
    """
    import naive_reference as nr

    tr = pipe.transformer
    num_concepts = len(concepts)
    use_softmax = num_concepts > 1 if softmax is None else softmax
    tokens, start = lumina2_concept_states(pipe, concepts, pooling)
    selected = sorted(single_layers)
    total, count, per = 0.0, 0, {}
    for record in records:
        fwd = record["forward"]
        latents = fwd["hidden_states"]
        n = (latents.shape[-2] // PATCH) * (latents.shape[-1] // PATCH)
        lengths = [int(v) for v in fwd["encoder_attention_mask"].sum(1)]
        image = [slice(length, length + n) for length in lengths]
        c = tokens.unsqueeze(0).expand(latents.shape[0], -1, -1)
        for j in range(selected[-1] + 1):
            block, inputs = tr.layers[j], record["layers"][j]
            qx, kx, vx, ox = lumina2_image_attention(block, inputs, image)
            temb = inputs["temb"]
            attn = block.attn
            normed = attention_input(block, c, temb)
            qc = heads(attn.to_q(normed), attn.heads)
            head_dim = qc.shape[-1]
            kc = heads(attn.to_k(normed), attn.to_k.out_features // head_dim)
            vc = heads(attn.to_v(normed), attn.to_v.out_features // head_dim)
            qc, kc = rms_norm(attn.norm_q, qc), rms_norm(attn.norm_k, kc)
            freqs = inputs["image_rotary_emb"][:, start : start + 1].expand(-1, num_concepts, -1)  # (B, C, D / 2)
            qc, kc = rotate(qc, freqs), rotate(kc, freqs)
            kc, vc = repeat_kv(kc, attn.heads), repeat_kv(vc, attn.heads)
            o_c = nr._naive_concept_attention(qc, kc, vc, qx, kx, vx, concept_keys, num_concepts)
            if j in selected:
                s = nr._score(score_space, use_softmax, o_c, ox, qx, kc, vc, vx, n)
                per.setdefault(j, []).append(s)
                total, count = total + s, count + 1
            c = block_from_attention(block, c, o_c, temb)
    mean = total / count
    if num_concepts == 1:
        low, high = mean.amin(-1, keepdim=True), mean.amax(-1, keepdim=True)
        mean = (mean - low) / (high - low)
    if per_block:
        return mean, torch.stack([sum(v) / len(v) for _, v in sorted(per.items())])
    return mean
