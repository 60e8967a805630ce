"""Lumina-Image 2.0 backend (``Lumina2Transformer2DModel``; ``Lumina2Pipeline``).

Made only of single-stream layers: every block of ``layers`` runs one self-attention over the
joint sequence ``[caption (its valid tokens); image]`` of each item, right-padded across the batch
(with a key mask when the items' lengths differ). What differs from Z-Image:

* The caption comes first and its length varies per item, so the image rows of item i start at
  its valid caption length L_i: the record gives per-row indices (read from the caption mask,
  which the model itself reads on the host at every forward).
* Grouped K/V heads (``num_kv_heads`` < heads): repeated per query head before the attention, for
  image and concept keys alike; the stock processor calls PyTorch's attention directly.
* The caption is refined by text-only ``context_refiner`` blocks with its mask (pad rows never keys);
  each concept's templated caption goes through them alone, its valid tokens only; its span is
  pooled afterwards.
* Blocks: ``norm1`` (``LuminaRMSNormZero``: normed x (1 + scale_msa), raw gates), then
  ``x + tanh(g_a) norm2(to_out(attn))``, ``x + tanh(g_m) ffn_norm2(ff(ffn_norm1(x) (1 + s_m)))``, with
  the timestep embedding ``temb`` only (nothing from the caption): concepts use it as is.
* RoPE: complex, caption token l at (l, 0, 0), image tokens at (L_i, h, w). Concept position policy:
  each concept at the position its first sub-token has in its own templated caption (after the
  pipeline's system prompt and ``" <Prompt Start> "``), where a prompt's first token sits; the
  forward's own image positions are reused.
* Classifier-free guidance is a separate unconditional forward after the conditional one (not
  traced); the transformer's time runs 0 (noise) -> 1 (clean).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

from conceptattention.adapters.base import (
    Backend,
    BackendSpec,
    CallArguments,
    ConceptEncoding,
    EncodeInputs,
    EncodeRecipe,
    ForwardRecord,
    LayerRule,
    TensorFacts,
    all_but_last,
    first_timestep,
)
from conceptattention.adapters.joint import (
    ConceptProcessor,
    JointPath,
    SequentialPath,
    TextAttention,
    caption_sequences,
    pre_norm_feedforward_update,
    rope_table_pixels,
)
from conceptattention.concepts import (
    CaptionSequences,
    ConceptEmbeddings,
    concept_token_ids,
    pipeline_part,
    pool_spans,
    span_starts,
    word_in_context,
)
from conceptattention.core import TokenGrid
from conceptattention.errors import ConceptAttentionError

PROMPT_SEPARATOR = " <Prompt Start> "  # the pipeline's template: system prompt, separator, prompt


@dataclass(frozen=True)
class Lumina2Conditioning:
    """Nothing per forward: the modulation is read from each block's ``temb``."""


def caption_freqs(transformer: Any, ids: torch.Tensor) -> torch.Tensor:
    """(B, S, D_head / 2) complex RoPE of (B, S, 3) position ids from the model's own tables."""
    return transformer.rope_embedder._get_freqs_cis(ids)


def refine_concepts(transformer: Any, sequences: CaptionSequences, record: ForwardRecord) -> torch.Tensor:
    """(C, D_model) concept tokens: each templated caption's valid tokens embedded and refined by ``context_refiner``
    alone (the forward masks a caption's padding out of its refiner keys), then its span pooled."""

    def refine(states: list[torch.Tensor], length: int) -> torch.Tensor:
        caption = transformer.time_caption_embed.caption_embedder(torch.stack(states))  # (G, L, D)
        ids = torch.zeros(len(states), length, 3, dtype=torch.int32, device=caption.device)
        ids[..., 0] = torch.arange(length, dtype=torch.int32, device=caption.device)
        freqs = caption_freqs(transformer, ids)
        for block in transformer.context_refiner:
            caption = block(caption, None, freqs)
        return caption

    return sequences.refine(lambda length: length, refine)


def concept_positions(concepts: ConceptEmbeddings, device: torch.device) -> torch.Tensor:
    """(C, 3) ids (l_c, 0, 0): each concept where its first sub-token sits in its own templated caption."""
    extras = concepts.extras
    assert isinstance(extras, CaptionSequences), "Lumina-2 concepts carry their captions"
    ids = torch.zeros(len(extras.spans), 3, dtype=torch.int32, device=device)
    ids[:, 0] = torch.tensor([start for start, _ in extras.spans], device=device)
    return ids


def complex_rotation(transformer: Any, ids: torch.Tensor):
    """The rotation of (B, C, H, D) concept q/k at (C, 3) ids: the model's tables, diffusers' complex RoPE."""
    freqs = caption_freqs(transformer, ids.unsqueeze(0))  # (1, C, D / 2)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        return apply_rotary_emb(x, freqs, use_real=False)  # type: ignore[return-value]

    return rotate


def repeat_heads(x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """(B, S, H_kv, D) grouped keys or values -> (B, S, H, D): each repeated for its query heads, as the stock
    processor repeats them."""
    repeats = heads // x.shape[2]
    return x.unsqueeze(3).repeat(1, 1, 1, repeats, 1).flatten(2, 3) if repeats >= 1 else x


class Lumina2ConceptAttnProcessor(ConceptProcessor):
    """Stock ``Lumina2AttnProcessor2_0`` plus the concept rows of one block.

    The projections, QK-norm, complex RoPE, grouped-K/V repeat, attention and ``to_out`` are the
    stock operations in the stock order, so the block's output is bit-identical to an untraced run;
    the concept rows use the attention output before ``to_out``.
    """

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
        base_sequence_length: int | None = None,
    ) -> torch.Tensor:
        if base_sequence_length is not None:
            raise ConceptAttentionError(
                "Lumina-2 proportional attention (`base_sequence_length`) is not supported; the pipeline does not "
                "use it"
            )
        batch, _, _ = hidden_states.shape
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = query.shape[-1] // attn.heads
        dtype = query.dtype
        kv_heads = key.shape[-1] // head_dim
        query = query.view(batch, -1, attn.heads, head_dim)
        key = key.view(batch, -1, kv_heads, head_dim)
        value = value.view(batch, -1, kv_heads, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, use_real=False)
            key = apply_rotary_emb(key, image_rotary_emb, use_real=False)
        query, key = query.to(dtype), key.to(dtype)
        key, value = repeat_heads(key, attn.heads, head_dim), repeat_heads(value, attn.heads, head_dim)
        if attention_mask is not None:
            attention_mask = attention_mask.bool().view(batch, 1, 1, -1)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, H, S, D)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=attn.scale)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).type_as(query)  # (B, S, H * D)
        if self.stream.runs(self.block_index):
            stream = self.stream
            q_x, k_x, v_x = (stream.image_rows(t.transpose(1, 2)).transpose(1, 2) for t in (query, key, value))
            rope = stream.concept_rope(out.device) if image_rotary_emb is not None else None
            stream.concept_rows(self.block_index, q_x, k_x, v_x, stream.image_rows(out), rope)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


# -- the block's modules ----------------------------------------------------------------------
def modulation(block: Any, concepts: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``norm1`` (``LuminaRMSNormZero``) on (B, C, D) concepts with the block's (B, D_t) ``temb``: normed, and the
    (B, 1, D) tanh attention gate, 1 + feed-forward scale and tanh feed-forward gate, as the block applies them."""
    normed, gate_msa, scale_mlp, gate_mlp = block.norm1(concepts, emb)
    return normed, gate_msa.unsqueeze(1).tanh(), 1 + scale_mlp.unsqueeze(1), gate_mlp.unsqueeze(1).tanh()


def shared_attention(block: Any) -> TextAttention:
    """The shared projections (grouped keys and values repeated per query head), QK-norm; ``out``: ``to_out`` then
    the block's ``norm2``."""
    attn = block.attn

    def qkv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        query = attn.to_q(x)
        head_dim = query.shape[-1] // attn.heads
        key, value = (
            repeat_heads(f(x).unflatten(-1, (-1, head_dim)), attn.heads, head_dim).flatten(2)
            for f in (attn.to_k, attn.to_v)
        )
        return query, key, value

    def out(attention_out: torch.Tensor) -> torch.Tensor:
        return block.norm2(attn.to_out[1](attn.to_out[0](attention_out)))

    return TextAttention(qkv, attn.norm_q, attn.norm_k, out)


def block_conditioning(record: ForwardRecord[Lumina2Conditioning], arguments: CallArguments) -> torch.Tensor:
    """(B_rows, D_t) the timestep embedding every block modulates with: nothing from the caption."""
    return arguments["temb"][record.rows]


# -- concepts ---------------------------------------------------------------------------------
def encode_concepts(pipe: Any, concepts: Sequence[str], encoding: ConceptEncoding) -> ConceptEmbeddings:
    """Each concept alone in the pipeline's template (its default system prompt), through Gemma as the pipeline
    encodes a prompt (``hidden_states[-2]``); the whole caption's valid tokens are kept for the context refiner."""
    why = "concepts are encoded with the pipeline's Gemma prompt encoder"
    tokenizer = pipeline_part(pipe, "tokenizer", why)
    pipeline_part(pipe, "text_encoder", why)
    concept_token_ids(concepts, tokenizer)  # unknown / identical / empty concepts fail before any encoder runs
    budget = encoding.max_sequence_length or SPEC.max_sequence_length
    texts = [pipe.system_prompt + PROMPT_SEPARATOR + c for c in concepts]
    sequences = [tokenizer(text, truncation=True, max_length=budget).input_ids for text in texts]
    # The encoder is causal and the pipeline pads on the right, so a caption's states do not depend on how far it is
    # padded: pad only to the longest caption instead of the prompt budget.
    length = max(len(ids) for ids in sequences)
    with torch.no_grad():
        hidden, mask = pipe._get_gemma_prompt_embeds(texts, device=pipe._execution_device, max_sequence_length=length)
    if [int(n) for n in mask.sum(dim=1).tolist()] != [len(ids) for ids in sequences]:
        raise ConceptAttentionError(
            f"{type(pipe).__name__}._get_gemma_prompt_embeds returned captions of other lengths than its template "
            "gives; this pipeline's prompt path is not the one ConceptAttention supports (Lumina2Pipeline)"
        )
    words = [word_in_context(tokenizer, c, ids) for c, ids in zip(concepts, sequences)]
    starts = span_starts(sequences, words)
    described = (
        "prompt: gemma-2 (text_encoder, hidden_states[-2]), each concept alone after the pipeline's system prompt, "
        "then through the context refiner as its own caption"
    )
    embeddings = pool_spans(hidden, sequences, words, tokenizer, encoding.pooling, described)
    states = tuple(hidden[i, : len(ids)] for i, ids in enumerate(sequences))
    spans = tuple((start, start + len(word)) for start, word in zip(starts, words))
    return replace(embeddings, extras=CaptionSequences(states, spans, encoding.pooling))


# -- forwards ---------------------------------------------------------------------------------
def _read_caption_lengths(mask: torch.Tensor) -> tuple[tuple[int, ...], torch.Tensor]:
    """Valid caption tokens per item (host, one read) and the same (B,) on the mask's device."""
    lengths = mask.sum(dim=1)
    return tuple(int(n) for n in lengths.tolist()), lengths


_caption_lengths = TensorFacts(_read_caption_lengths)


def read_forward(transformer: Any, inputs: Mapping[str, Any], batched_cfg: bool) -> ForwardRecord[Lumina2Conditioning]:
    latents = inputs["hidden_states"]  # (B, C, H', W')
    patch = int(transformer.config.patch_size)
    grid = TokenGrid(latents.shape[-2] // patch, latents.shape[-1] // patch)
    lengths, on_device = _caption_lengths(inputs["encoder_attention_mask"])
    count = grid.num_tokens
    if len(set(lengths)) == 1:
        image: slice | torch.Tensor = slice(lengths[0], lengths[0] + count)
    else:  # each item's image rows follow its own caption
        image = on_device.to(torch.int64)[:, None] + torch.arange(count, device=on_device.device)
    time = 1.0 - first_timestep(inputs["timestep"])  # the transformer's time runs 0 (noise) -> 1 (clean)
    return ForwardRecord(time, 1.0, grid, slice(None), Lumina2Conditioning(), image=image)


# -- encode mode ------------------------------------------------------------------------------
@dataclass
class Lumina2EncodeInputs(EncodeInputs):
    """Encode-mode conditioning: (B, L, D_text) caption states and their (B, L) mask."""

    prompt_embeds: torch.Tensor
    prompt_mask: torch.Tensor

    batched_fields = ("prompt_embeds", "prompt_mask")


class Lumina2Encode(EncodeRecipe[Lumina2EncodeInputs]):
    def pixels_per_token(self, pipe: Any) -> int:
        return int(getattr(pipe, "vae_scale_factor", 8)) * int(pipe.transformer.config.patch_size)

    def max_pixels_per_side(self, pipe: Any) -> int:
        """The RoPE tables hold ``axes_lens[1]`` rows and ``axes_lens[2]`` columns of patches."""
        return rope_table_pixels(pipe, self.pixels_per_token(pipe))

    def inputs(
        self, pipe: Any, pixels: torch.Tensor, caption: str, guidance_scale: float | None, max_sequence_length: int
    ) -> Lumina2EncodeInputs:
        latents = self.latents(pipe, pixels)  # (B, c, H', W')
        embeds, mask, _, _ = pipe.encode_prompt(
            prompt=[caption] * latents.shape[0],
            do_classifier_free_guidance=False,
            device=pipe._execution_device,
            max_sequence_length=max_sequence_length,
        )
        return Lumina2EncodeInputs(latents, None, embeds.to(latents.dtype), mask)

    def forward(self, pipe: Any, inputs: Lumina2EncodeInputs, noisy_latents: torch.Tensor, t: float) -> None:
        time = torch.full((noisy_latents.shape[0],), 1.0 - float(t), device=noisy_latents.device)
        pipe.transformer(
            hidden_states=noisy_latents,
            timestep=time.to(noisy_latents.dtype),
            encoder_hidden_states=inputs.prompt_embeds,
            encoder_attention_mask=inputs.prompt_mask,
            return_dict=False,
        )


LAST_LAYER = "the last layer's concept maps were the weakest on the trained single-stream-heavy model"


SPEC = BackendSpec(
    name="Lumina-Image 2.0",
    transformer_classes=("Lumina2Transformer2DModel",),
    pipeline_classes=("Lumina2Pipeline",),
    processor_classes=(),
    concept_encoders=("prompt",),
    default_layers=f"every single-stream layer but the last (Lumina-Image 2.0: 0-24 of 0-25; {LAST_LAYER})",
    cfg_layout="separate",
    concept_positions="each concept at the caption position (l, 0, 0) of its first sub-token in its own templated "
    "caption (after the system prompt and ' <Prompt Start> ', where a prompt's first token sits)",
    max_sequence_length=256,
    double_blocks=None,
    single_blocks="layers",
    single_processor_classes=("Lumina2AttnProcessor2_0",),
)


BACKEND: Backend[Lumina2EncodeInputs, Lumina2Conditioning] = Backend(
    spec=SPEC,
    layers=LayerRule(default=all_but_last, single_default=all_but_last),
    concepts=encode_concepts,
    reader=read_forward,
    stream=JointPath(
        Lumina2ConceptAttnProcessor,
        block_conditioning=block_conditioning,
        concept_inputs=caption_sequences,
        embed=refine_concepts,
        concept_positions=concept_positions,
        rotation=complex_rotation,
        embedding_per_forward=False,  # the context refiner takes no timestep
        single=SequentialPath(
            Lumina2ConceptAttnProcessor,
            modulation=modulation,
            attention=shared_attention,
            update=pre_norm_feedforward_update,
        ),
    ),
    encoding=Lumina2Encode(),
)
