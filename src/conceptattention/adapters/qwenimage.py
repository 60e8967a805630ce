"""Qwen-Image backend (``QwenImageTransformer2DModel``; Qwen-Image, Qwen-Image-Edit / Edit-Plus).

Dual-stream blocks only, joint sequence [text, image] in (B, S, H, D) layout, RMS QK-norm per
stream. What differs from Flux.1:

* Text-stream module names: ``txt_mod`` (modulation from the block's ``temb``), ``txt_norm1``,
  ``txt_norm2``, ``txt_mlp``; prompts are embedded by ``txt_in(txt_norm(.))``.
* Text RoPE with real positions: prompt token j sits at ``max(h/2, w/2) + j`` (``QwenEmbedRope``).
  Concept position policy: every concept at the position of the first prompt token (j = 0),
  rotated with the model's own ``apply_rotary_emb_qwen`` and the block's own text frequencies.
* Text mask: ``encoder_hidden_states_mask`` is kept in the real attention; concept queries attend
  over [concepts; image] only, so no prompt key enters their attention.
* The last block's text output feeds nothing (no single blocks follow): it is never scored.
* Edit pipelines: the image sequence holds the target latents followed by reference-image latents
  (``img_shapes[b] = [target, ref, ...]``). Concepts attend over all image tokens, as text does;
  maps cover the target grid only. ``zero_cond_t`` models modulate with the first (target) half
  of ``temb``, as the text stream does.
* Concepts: Qwen2.5-VL with the text-to-image prompt template, the template tokens dropped as the
  pipeline drops them; the concept's span is located by token ids in the templated sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from math import prod
from typing import Any

import torch
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

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
    first_timestep,
    later_half,
)
from conceptattention.adapters.joint import ConceptProcessor, JointPath, packed_pixels_per_token
from conceptattention.concepts import ConceptEmbeddings, concept_token_ids, pipeline_part, pool_spans
from conceptattention.core import TokenGrid
from conceptattention.errors import ConceptAttentionError

# Qwen-Image's text-to-image prompt recipe (QwenImagePipeline): the template, and how many of its
# leading tokens (system prompt and "user" header) the pipeline drops from the encoder output.
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
TEMPLATE_DROP = 34


@dataclass(frozen=True)
class QwenConditioning:
    """Whether the forward's ``temb`` is [target; reference] (``zero_cond_t`` edit models)."""

    zero_cond_t: bool


class QwenImageConceptAttnProcessor(ConceptProcessor):
    """Stock ``QwenDoubleStreamAttnProcessor2_0`` plus the one-way concept attention of one block.

    The image and text outputs are computed with the same operations in the same order as the
    stock processor, so they are bit-identical to an untraced run.
    """

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if encoder_hidden_states is None:
            raise ValueError("QwenDoubleStreamAttnProcessor2_0 requires encoder_hidden_states (text stream)")
        if attention_mask is not None:
            raise ValueError(
                "QwenDoubleStreamAttnProcessor2_0 does not accept an external attention_mask. "
                "Pass encoder_hidden_states_mask to let the processor build the joint mask."
            )
        if encoder_hidden_states_mask is not None:
            seq_img = hidden_states.shape[1]
            image_mask = torch.ones((hidden_states.shape[0], seq_img), dtype=torch.bool, device=hidden_states.device)
            attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]
        seq_txt = encoder_hidden_states.shape[1]

        head_dim = attn.inner_dim // attn.heads
        img_query = attn.to_q(hidden_states).unflatten(-1, (-1, head_dim))  # (B, N, H, D)
        img_key = attn.to_k(hidden_states).unflatten(-1, (-1, head_dim))
        img_value = attn.to_v(hidden_states).unflatten(-1, (-1, head_dim))
        txt_query = attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))  # (B, T, H, D)
        txt_key = attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        txt_value = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        if attn.norm_q is not None:
            img_query = attn.norm_q(img_query)
        if attn.norm_k is not None:
            img_key = attn.norm_k(img_key)
        if attn.norm_added_q is not None:
            txt_query = attn.norm_added_q(txt_query)
        if attn.norm_added_k is not None:
            txt_key = attn.norm_added_k(txt_key)
        concept_rope: Callable[[torch.Tensor], torch.Tensor] | None = None
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img_query = apply_rotary_emb_qwen(img_query, img_freqs, use_real=False)
            img_key = apply_rotary_emb_qwen(img_key, img_freqs, use_real=False)
            txt_query = apply_rotary_emb_qwen(txt_query, txt_freqs, use_real=False)
            txt_key = apply_rotary_emb_qwen(txt_key, txt_freqs, use_real=False)
            first = txt_freqs[:1]  # the concept position: the first prompt token's

            def concept_rope(x: torch.Tensor) -> torch.Tensor:
                return apply_rotary_emb_qwen(x, first, use_real=False)  # type: ignore[return-value]

        joint_query = torch.cat([txt_query, img_query], dim=1)
        joint_key = torch.cat([txt_key, img_key], dim=1)
        joint_value = torch.cat([txt_value, img_value], dim=1)
        joint = self.joint_attention(joint_query, joint_key, joint_value, attention_mask)  # (B, T + N, H * D)
        txt_out = joint[:, :seq_txt, :]
        img_out = joint[:, seq_txt:, :]

        if self.stream.runs(self.block_index):
            # Image q/k/v are reused from the real pass (after QK-norm and RoPE): no second projection.
            q_x, k_x, v_x = (t.transpose(1, 2) for t in (img_query, img_key, img_value))  # (B, H, N, D)
            self.stream.concept_rows(self.block_index, q_x, k_x, v_x, img_out, concept_rope)

        img_out = attn.to_out[0](img_out.contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        txt_out = attn.to_add_out(txt_out.contiguous())
        return img_out, txt_out


@dataclass
class QwenEncodeInputs(EncodeInputs):
    """Encode-mode conditioning: (B, T, D) prompt embeddings, (B, T) mask (None: all valid), the grid."""

    prompt_embeds: torch.Tensor
    prompt_mask: torch.Tensor | None
    grid: tuple[int, int, int]  # (frames, h, w) of the packed latents, as in ``img_shapes``

    batched_fields = ("prompt_embeds", "prompt_mask")


SPEC = BackendSpec(
    name="Qwen-Image",
    transformer_classes=("QwenImageTransformer2DModel",),
    pipeline_classes=(
        "QwenImagePipeline",
        "QwenImageImg2ImgPipeline",
        "QwenImageEditPipeline",
        "QwenImageEditPlusPipeline",
    ),
    processor_classes=("QwenDoubleStreamAttnProcessor2_0",),
    concept_encoders=("qwen2.5-vl",),
    default_layers="the later half of the blocks, without the last one (its text output feeds nothing)",
    cfg_layout="separate",
    concept_positions="every concept at the first prompt token's text position (RoPE index max(h/2, w/2))",
    max_sequence_length=1024,
)


def dead_last_block(transformer: Any, blocks: torch.nn.ModuleList) -> dict[int, str]:
    return {len(blocks) - 1: "it is the last block and no single-stream blocks follow, so its text output feeds "
                             "nothing and its text-query weights were never trained"}  # fmt: skip


# -- the text-stream modules ------------------------------------------------------------------
def embed_concepts(transformer: Any, states: torch.Tensor, record: ForwardRecord[QwenConditioning]) -> torch.Tensor:
    return transformer.txt_in(transformer.txt_norm(states))


def text_modulation(block: Any, hidden: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
    mod_attention, mod_mlp = block.txt_mod(emb).chunk(2, dim=-1)  # (B, 3D) each
    shift, scale, gate = mod_attention.chunk(3, dim=-1)
    shift_mlp, scale_mlp, gate_mlp = mod_mlp.chunk(3, dim=-1)
    normed = block.txt_norm1(hidden) * (1 + scale[:, None]) + shift[:, None]
    return normed, gate, shift_mlp, scale_mlp, gate_mlp


def text_feedforward(block: Any) -> tuple[Callable, Callable]:
    return block.txt_norm2, block.txt_mlp


def block_conditioning(record: ForwardRecord[QwenConditioning], arguments: CallArguments) -> torch.Tensor:
    """(B_rows, D) the ``temb`` the block's text modulation takes: the timestep embedding only."""
    temb = arguments["temb"]
    if record.conditioning.zero_cond_t:
        temb = temb.chunk(2, dim=0)[0]  # [target; reference (t = 0)]: text uses the target half
    return temb[record.rows]


# -- concepts ---------------------------------------------------------------------------------
def encode_concepts(pipe: Any, concepts: Sequence[str], encoding: ConceptEncoding) -> ConceptEmbeddings:
    why = "concepts are encoded with the Qwen2.5-VL prompt encoder"
    tokenizer = pipeline_part(pipe, "tokenizer", why)
    encoder = pipeline_part(pipe, "text_encoder", why)
    words = concept_token_ids(concepts, tokenizer)  # checked before any encoder runs
    texts = [PROMPT_TEMPLATE.format(concept) for concept in concepts]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    device = pipe._execution_device
    with torch.no_grad():
        hidden = encoder(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            output_hidden_states=True,
        ).hidden_states[-1]  # (C, S, D), as the pipeline takes it
    # As the pipeline: each row's valid tokens (whatever the padding side), the template prefix dropped.
    valid = batch.attention_mask.bool()
    rows = [states[mask.to(states.device)][TEMPLATE_DROP:] for states, mask in zip(hidden, valid)]
    sequences = [ids[mask][TEMPLATE_DROP:].tolist() for ids, mask in zip(batch.input_ids, valid)]
    hidden = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # (C, S', D)
    described = "qwen2.5-vl (text_encoder, last hidden layer), each concept alone in the text-to-image template"
    return pool_spans(hidden, sequences, words, tokenizer, encoding.pooling, described)


# -- forwards ---------------------------------------------------------------------------------
def read_forward(transformer: Any, inputs: Mapping[str, Any], batched_cfg: bool) -> ForwardRecord[QwenConditioning]:
    timestep = inputs["timestep"]
    shapes = inputs.get("img_shapes")
    if not shapes:
        raise ConceptAttentionError("QwenImageTransformer2DModel was called without `img_shapes`")
    per_item = shapes[0] if isinstance(shapes[0], list) else shapes  # [target, reference, ...]
    frames, h, w = per_item[0]
    if frames != 1:
        raise ConceptAttentionError(
            f"The target latents have {frames} frames/layers; layered and video variants are not supported"
        )
    num_tokens = inputs["hidden_states"].shape[1]
    expected = sum(prod(shape) for shape in per_item)
    if expected != num_tokens:
        raise ConceptAttentionError(
            f"`img_shapes` describe {expected} image tokens but the forward has {num_tokens}; pass the "
            "pipeline's `img_shapes` unchanged"
        )
    conditioning = QwenConditioning(bool(transformer.config.zero_cond_t))
    grid = TokenGrid(h, w)
    return ForwardRecord(first_timestep(timestep), 1.0, grid, slice(None), conditioning, slice(0, h * w))


def check_call(pipe: Any, call: Mapping[str, Any]) -> None:
    if type(pipe).__name__.startswith("QwenImageEdit") and call.get("image") is None:
        raise ConceptAttentionError(
            f"{type(pipe).__name__} edits a reference image: pass `image=` (the picture to edit) along with the "
            "instruction; the maps then show where the instruction acts on the edited image"
        )


# -- encode mode ------------------------------------------------------------------------------
class QwenImageEncode(EncodeRecipe[QwenEncodeInputs]):
    def pixels_per_token(self, pipe: Any) -> int:
        return packed_pixels_per_token(pipe, default_scale=8)

    def latents(self, pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
        """(B, z, H', W') latents of (B, 3, H, W) pixels: the video VAE on one frame, normalised per channel."""
        vae = pipe.vae
        frames = pixels.to(pipe._execution_device, vae.dtype)[:, :, None]  # (B, 3, 1, H, W)
        latents = vae.encode(frames).latent_dist.mode()  # (B, z, 1, H', W')
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        return ((latents - mean) * inverse_std)[:, :, 0].to(pipe.transformer.dtype)

    def inputs(
        self, pipe: Any, pixels: torch.Tensor, caption: str, guidance_scale: float | None, max_sequence_length: int
    ) -> QwenEncodeInputs:
        device = pipe._execution_device
        latents = self.latents(pipe, pixels)  # (B, z, 2h, 2w)
        batch = latents.shape[0]
        if type(pipe).__name__.startswith("QwenImageEdit"):
            raise ConceptAttentionError(
                f"Encoding a real image is supported with QwenImagePipeline; {type(pipe).__name__} also needs a "
                "reference image. Load the text-to-image pipeline from the same weights (its components are shared: "
                "`QwenImagePipeline(**pipe.components)` without `processor`) or trace the edit pipeline's call"
            )
        prompt_embeds, prompt_mask = pipe.encode_prompt(
            prompt=[caption] * batch, device=device, max_sequence_length=max_sequence_length
        )
        return QwenEncodeInputs(
            latents=latents,
            guidance_scale=None,  # Qwen-Image's CFG is a separate forward (true_cfg_scale)
            prompt_embeds=prompt_embeds.to(latents.dtype),
            prompt_mask=prompt_mask,
            grid=(1, latents.shape[-2] // 2, latents.shape[-1] // 2),
        )

    def forward(self, pipe: Any, inputs: QwenEncodeInputs, noisy_latents: torch.Tensor, t: float) -> None:
        batch, channels, height, width = noisy_latents.shape
        packed = pipe._pack_latents(noisy_latents, batch, channels, height, width)  # (B, N, 4z)
        timestep = torch.full((batch,), float(t), device=packed.device, dtype=packed.dtype)
        pipe.transformer(
            hidden_states=packed,
            timestep=timestep,
            encoder_hidden_states=inputs.prompt_embeds,
            encoder_hidden_states_mask=inputs.prompt_mask,
            img_shapes=[[inputs.grid]] * batch,
            return_dict=False,
        )


BACKEND: Backend[QwenEncodeInputs, QwenConditioning] = Backend(
    spec=SPEC,
    layers=LayerRule(default=later_half, excluded=dead_last_block),
    concepts=encode_concepts,
    reader=read_forward,
    stream=JointPath(
        QwenImageConceptAttnProcessor,
        block_conditioning=block_conditioning,
        embed=embed_concepts,
        modulation=text_modulation,
        feedforward=text_feedforward,
    ),
    encoding=QwenImageEncode(),
    pipeline=PipelineFacts(check_call=check_call),
)
