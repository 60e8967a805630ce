"""Z-Image backend (``ZImageTransformer2DModel``; ``ZImagePipeline``, ``ZImageImg2ImgPipeline``).

Made only of single-stream layers: every block of ``layers`` runs one self-attention over the
joint sequence ``[image (padded); caption (padded)]`` of each item. What differs from the
Flux-family single blocks:

* Inputs are lists (one latent (C, F, H, W) and one variable-length caption per item); each
  modality is padded to a multiple of 32 with a learned pad token, and those pad tokens are real
  keys in the stock attention. Concepts never use them as keys and maps never cover them: the
  record names the real image rows (the first N of every row), read from the latents' shapes.
* The caption goes through text-only ``context_refiner`` blocks (no modulation) before the joint
  layers. Each concept's whole templated sequence goes through them alone, padded with the pad
  token as the forward pads a one-prompt caption, with its own positions; its span is pooled
  afterwards (every forward: the refiner takes no timestep, so this is the same each time).
* Blocks are sequential: ``x + tanh(g_a) attention_norm2(to_out(attn(attention_norm1(x) (1 + s_a))))``
  then ``x + tanh(g_m) ffn_norm2(ff(ffn_norm1(x) (1 + s_m)))``, one global modulation from the
  timestep only (``adaln_input``), so concepts use it as is. ``ZSingleStreamAttnProcessor``
  applies ``to_out`` itself: the output-space score is taken inside it, before ``to_out``.
* RoPE is complex (``freqs_cis``): caption token l at (1 + l, 0, 0), image tokens at
  (L_pad + 1, h, w). Concept position policy: each concept at the position its first sub-token
  has in its own templated caption (where a one-word prompt's first token sits: caption index 3,
  after ``<|im_start|>user\\n``), rotated with the model's own ``rope_embedder``; the forward's own
  image positions are reused.
* Classifier-free guidance is batched as [cond; uncond]: maps come from the first half. The
  transformer's time runs the other way (0 = noise, 1 = clean).
* Omni mode (condition images, per-token noise masks, SigLIP tokens) and a CFG truncation that
  changes the batch layout within a call are refused with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from conceptattention.adapters.base import (
    Backend,
    BackendSpec,
    CallArguments,
    ConceptEncoding,
    EncodeInputs,
    EncodeRecipe,
    ForwardRecord,
    LayerRule,
    PipelineFacts,
    all_but_last,
    first_timestep,
    guidance_property,
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

SEQUENCE_MULTIPLE = 32  # the transformer pads image and caption tokens of each item to a multiple of this
FIRST_CAPTION_POSITION = 1  # caption token l sits at RoPE position (1 + l, 0, 0)
OMNI = (
    "Z-Image omni mode (ZImageOmniPipeline: condition images, per-token noise masks, SigLIP tokens) is not "
    "supported; use ZImagePipeline (text-to-image) or ZImageImg2ImgPipeline"
)


@dataclass(frozen=True)
class ZImageConditioning:
    """Nothing per forward: the modulation is read from each block's ``adaln_input``."""


def padded_length(length: int) -> int:
    """``length`` rounded up to a multiple of 32, as the transformer pads each modality."""
    return length + (-length) % SEQUENCE_MULTIPLE


def refine_concepts(transformer: Any, sequences: CaptionSequences, record: ForwardRecord) -> torch.Tensor:
    """(C, D_model) concept tokens: each templated caption embedded, padded with ``cap_pad_token`` to a multiple of 32
    and refined by ``context_refiner`` alone (as the forward refines a one-prompt caption), then its span pooled."""

    def refine(states: list[torch.Tensor], length: int) -> torch.Tensor:
        rows = []
        for caption in states:
            embedded = transformer.cap_embedder(caption)  # (L_c, D)
            pad = transformer.cap_pad_token.to(embedded.dtype).expand(length - embedded.shape[0], -1)
            rows.append(torch.cat([embedded, pad]))
        refined = torch.stack(rows)  # (G, L_pad, D): every row complete, so no mask is needed
        ids = torch.zeros(length, 3, dtype=torch.int32, device=refined.device)
        ids[:, 0] = torch.arange(FIRST_CAPTION_POSITION, FIRST_CAPTION_POSITION + length, device=refined.device)
        freqs = transformer.rope_embedder(ids).unsqueeze(0).expand(len(rows), -1, -1)  # (G, L_pad, D_head / 2)
        for block in transformer.context_refiner:
            refined = block(refined, None, freqs)
        return refined

    return sequences.refine(padded_length, refine)


def concept_positions(concepts: ConceptEmbeddings, device: torch.device) -> torch.Tensor:
    """(C, 3) ids (1 + l_c, 0, 0): each concept where its first sub-token sits in its own templated caption."""
    extras = concepts.extras
    assert isinstance(extras, CaptionSequences), "Z-Image concepts carry their captions"
    ids = torch.zeros(len(extras.spans), 3, dtype=torch.int32, device=device)
    ids[:, 0] = torch.tensor([FIRST_CAPTION_POSITION + start for start, _ in extras.spans], device=device)
    return ids


def rotate_complex(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Z-Image's RoPE on (B, S, H, D) q/k with (B | 1, S, D / 2) complex frequencies, as ``ZSingleStreamAttnProcessor``:
    consecutive pairs as complex numbers, in float32, cast back."""
    with torch.amp.autocast("cuda", enabled=False):
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * freqs_cis.unsqueeze(2)).flatten(3).type_as(x)


def complex_rotation(transformer: Any, ids: torch.Tensor):
    """The rotation of (B, C, H, D) concept q/k at (C, 3) ids with the model's ``rope_embedder``."""
    freqs = transformer.rope_embedder(ids).unsqueeze(0)  # (1, C, D / 2) complex

    def rotate(x: torch.Tensor) -> torch.Tensor:
        return rotate_complex(x, freqs)

    return rotate


class ZImageConceptAttnProcessor(ConceptProcessor):
    """Stock ``ZSingleStreamAttnProcessor`` plus the concept rows of one block.

    The projections, QK-norm, complex RoPE, attention and ``to_out`` are the stock operations in the
    stock order, so the block's output is bit-identical to an untraced run; the concept rows use the
    attention output before ``to_out``.
    """

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        freqs_cis: torch.Tensor | None = None,
    ) -> torch.Tensor:
        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))  # (B, S, H, D)
        key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if freqs_cis is not None:
            query, key = rotate_complex(query, freqs_cis), rotate_complex(key, freqs_cis)
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]  # (B, 1, 1, S) key mask, as the stock processor
        out = self.joint_attention(query, key, value, attention_mask)  # (B, S, H * D)
        if self.stream.runs(self.block_index):
            q_x, k_x, v_x = (self.stream.image_rows(t).transpose(1, 2) for t in (query, key, value))  # (B, H, N, D)
            rope = self.stream.concept_rope(out.device) if freqs_cis is not None else None
            self.stream.concept_rows(self.block_index, q_x, k_x, v_x, self.stream.image_rows(out), rope)
        output = attn.to_out[0](out)
        if len(attn.to_out) > 1:  # dropout
            output = attn.to_out[1](output)
        return output


# -- the block's modules ----------------------------------------------------------------------
def modulation(block: Any, concepts: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The block's global modulation of (B, C, D) concepts from its (B, 256) ``adaln_input``: normed, and the
    (B, 1, D) attention gate, feed-forward scale and gate (tanh gates, 1 + scales)."""
    scale_msa, gate_msa, scale_mlp, gate_mlp = block.adaLN_modulation(emb).unsqueeze(1).chunk(4, dim=2)
    return block.attention_norm1(concepts) * (1.0 + scale_msa), gate_msa.tanh(), 1.0 + scale_mlp, gate_mlp.tanh()


def shared_attention(block: Any) -> TextAttention:
    """The shared q/k/v projections and QK-norm; ``out``: ``to_out`` then the block's ``attention_norm2``."""
    attn = block.attention

    def out(attention_out: torch.Tensor) -> torch.Tensor:
        projected = attn.to_out[0](attention_out)
        if len(attn.to_out) > 1:
            projected = attn.to_out[1](projected)
        return block.attention_norm2(projected)

    return TextAttention(lambda x: (attn.to_q(x), attn.to_k(x), attn.to_v(x)), attn.norm_q, attn.norm_k, out)


def block_conditioning(record: ForwardRecord[ZImageConditioning], arguments: CallArguments) -> torch.Tensor:
    """(B_rows, 256) the timestep embedding every block modulates with: nothing from the prompt."""
    emb = arguments["adaln_input"]
    if emb is None:
        raise ConceptAttentionError(OMNI)
    return emb[record.rows]


# -- concepts ---------------------------------------------------------------------------------
def chat_caption(tokenizer: Any, text: str) -> str:
    """The pipeline's prompt template: the user turn, then the assistant header (``_encode_prompt``)."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )


def encode_concepts(pipe: Any, concepts: Sequence[str], encoding: ConceptEncoding) -> ConceptEmbeddings:
    """Each concept alone as the pipeline encodes a prompt (Qwen3 chat template, ``hidden_states[-2]``, padding
    removed); the whole caption is kept for the context refiner, the concept's span located by token ids."""
    why = "concepts are encoded with the pipeline's Qwen3 prompt encoder"
    tokenizer = pipeline_part(pipe, "tokenizer", why)
    pipeline_part(pipe, "text_encoder", why)
    concept_token_ids(concepts, tokenizer)  # unknown / identical / empty concepts fail before any encoder runs
    budget = encoding.max_sequence_length or SPEC.max_sequence_length
    sequences = [tokenizer(chat_caption(tokenizer, c), truncation=True, max_length=budget).input_ids for c in concepts]
    # The encoder is causal and masks padding, so a caption's states do not depend on how far it is padded:
    # pad only to the longest caption instead of the prompt budget.
    length = max(len(ids) for ids in sequences)
    with torch.no_grad():
        states = pipe._encode_prompt(list(concepts), device=pipe._execution_device, max_sequence_length=length)
    if [s.shape[0] for s in states] != [len(ids) for ids in sequences]:
        raise ConceptAttentionError(
            f"{type(pipe).__name__}._encode_prompt returned captions of other lengths than its template gives; this "
            "pipeline's prompt path is not the one ConceptAttention supports (ZImagePipeline)"
        )
    words = [word_in_context(tokenizer, c, ids) for c, ids in zip(concepts, sequences)]
    starts = span_starts(sequences, words)
    described = (
        "prompt: qwen3 (text_encoder, chat template, hidden_states[-2]), each concept alone, then through the "
        "context refiner as its own caption"
    )
    hidden = torch.nn.utils.rnn.pad_sequence(list(states), batch_first=True)  # (C, L, D_text), for the record
    embeddings = pool_spans(hidden, sequences, words, tokenizer, encoding.pooling, described)
    spans = tuple((start, start + len(word)) for start, word in zip(starts, words))
    return replace(embeddings, extras=CaptionSequences(tuple(states), spans, encoding.pooling))


# -- forwards ---------------------------------------------------------------------------------
def read_forward(transformer: Any, inputs: Mapping[str, Any], batched_cfg: bool) -> ForwardRecord[ZImageConditioning]:
    latents = inputs["x"]
    if isinstance(latents[0], list) or inputs.get("siglip_feats") is not None:
        raise ConceptAttentionError(OMNI)
    patch, frame_patch = int(inputs.get("patch_size", 2)), int(inputs.get("f_patch_size", 1))
    shapes = {tuple(x.shape) for x in latents}
    if len(shapes) != 1:
        raise ConceptAttentionError(
            f"The forward's latents have different shapes {sorted(shapes)}; ConceptAttention maps a batch of "
            "images of one size"
        )
    _, frames, height, width = shapes.pop()
    grid = TokenGrid(height // patch, width // patch)
    count = (frames // frame_patch) * grid.num_tokens
    if frames // frame_patch != 1:
        raise ConceptAttentionError(f"The latents have {frames} frames; Z-Image maps single images")
    batch = len(latents)
    rows = slice(None)
    if batched_cfg:  # [cond; uncond]: the conditional half comes first
        if batch % 2:
            raise ConceptAttentionError(
                f"Classifier-free guidance is on but the forward has {batch} items (not [cond; uncond]); the "
                "guidance layout changed within the call (`cfg_truncation` below 1 does this)"
            )
        rows = slice(0, batch // 2)
    time = 1.0 - first_timestep(inputs["t"])  # the transformer's time runs 0 (noise) -> 1 (clean)
    return ForwardRecord(time, 1.0, grid, rows, ZImageConditioning(), image=slice(0, count))


def _truncation_error(truncation: Any) -> ConceptAttentionError:
    return ConceptAttentionError(
        f"`cfg_truncation={truncation}` turns classifier-free guidance off for the later steps of the call, so the "
        "forwards change from [cond; uncond] to [cond] mid-call; ConceptAttention needs one layout per call: use "
        "cfg_truncation=1.0 (the default), or guidance_scale=0 (Z-Image-Turbo)"
    )


def batched_cfg(pipe: Any) -> bool:
    """The pipeline batches [cond; uncond] (``guidance_scale > 0``) in every forward of the call."""
    batched = guidance_property(pipe)
    truncation = getattr(pipe, "_cfg_truncation", None)
    if batched and truncation is not None and float(truncation) < 1:
        raise _truncation_error(truncation)
    return batched


def check_call(pipe: Any, call: Mapping[str, Any]) -> None:
    truncation = call.get("cfg_truncation")
    if truncation is not None and float(truncation) < 1 and float(call.get("guidance_scale", 5.0)) > 0:
        raise _truncation_error(truncation)


# -- encode mode ------------------------------------------------------------------------------
@dataclass
class ZImageEncodeInputs(EncodeInputs):
    """Encode-mode conditioning: the caption's (L, D_text) states, shared by every image of the call."""

    caption: torch.Tensor


class ZImageEncode(EncodeRecipe[ZImageEncodeInputs]):
    def pixels_per_token(self, pipe: Any) -> int:
        return int(getattr(pipe, "vae_scale_factor", 8)) * 2  # the VAE, then 2x2 patches

    def default_size(self, pipe: Any) -> tuple[int, int]:
        """The pipeline's default height and width (1024), or the largest side the model's position table takes."""
        side = min(1024, self.max_pixels_per_side(pipe))
        return side, side

    def max_pixels_per_side(self, pipe: Any) -> int:
        """The RoPE tables hold ``axes_lens[1]`` rows and ``axes_lens[2]`` columns of patches."""
        return rope_table_pixels(pipe, self.pixels_per_token(pipe))

    def inputs(
        self, pipe: Any, pixels: torch.Tensor, caption: str, guidance_scale: float | None, max_sequence_length: int
    ) -> ZImageEncodeInputs:
        latents = self.latents(pipe, pixels)  # (B, c, H', W')
        states = pipe._encode_prompt([caption], device=pipe._execution_device, max_sequence_length=max_sequence_length)
        return ZImageEncodeInputs(latents=latents, guidance_scale=None, caption=states[0].to(latents.dtype))

    def forward(self, pipe: Any, inputs: ZImageEncodeInputs, noisy_latents: torch.Tensor, t: float) -> None:
        batch = noisy_latents.shape[0]
        latents = list(noisy_latents.unsqueeze(2).unbind(dim=0))  # B x (c, 1, H', W'), as the pipeline passes them
        time = torch.full((batch,), 1.0 - float(t), device=noisy_latents.device, dtype=noisy_latents.dtype)
        pipe.transformer(latents, time, [inputs.caption] * batch, return_dict=False)


LAST_LAYER = "the last layer's concept maps were the weakest on the trained single-stream-heavy model"


SPEC = BackendSpec(
    name="Z-Image",
    transformer_classes=("ZImageTransformer2DModel",),
    pipeline_classes=("ZImagePipeline", "ZImageImg2ImgPipeline"),
    processor_classes=(),
    concept_encoders=("prompt",),
    default_layers=f"every single-stream layer but the last (Z-Image: 0-28 of 0-29; {LAST_LAYER})",
    cfg_layout="batched",
    concept_positions="each concept at the caption position (1 + l, 0, 0) of its first sub-token in its own "
    "templated caption (where a prompt's first token sits: l = 3)",
    max_sequence_length=512,
    double_blocks=None,
    attention="attention",
    single_blocks="layers",
    single_processor_classes=("ZSingleStreamAttnProcessor",),
)


BACKEND: Backend[ZImageEncodeInputs, ZImageConditioning] = Backend(
    spec=SPEC,
    layers=LayerRule(default=all_but_last, single_default=all_but_last),
    concepts=encode_concepts,
    reader=read_forward,
    stream=JointPath(
        ZImageConceptAttnProcessor,
        block_conditioning=block_conditioning,
        concept_inputs=caption_sequences,
        embed=refine_concepts,
        concept_positions=concept_positions,
        rotation=complex_rotation,
        embedding_per_forward=False,  # the context refiner takes no timestep
        hidden_argument="x",
        single=SequentialPath(
            ZImageConceptAttnProcessor,
            modulation=modulation,
            attention=shared_attention,
            update=pre_norm_feedforward_update,
        ),
    ),
    encoding=ZImageEncode(),
    pipeline=PipelineFacts(batched_cfg=batched_cfg, check_call=check_call),
)
