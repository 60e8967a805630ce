"""SD3 / SD3.5 backend (``SD3Transformer2DModel``; StableDiffusion3 text-to-image and img2img).

Joint sequence [image, text] in (B, H, S, D) layout; optional RMS QK-norm (SD3.5); no RoPE
(positions are added in ``PatchEmbed``), so concepts need no position. The last block is
``context_pre_only``: its text output is discarded and its text-query weights were never
trained, so it is never scored. SD3.5's extra image self-attention (``attn2``) is left alone.
Concepts: the T5 part of SD3's joint prompt embedding (default) or the CLIP-L+G part, each
concept encoded alone by the pipeline's own prompt helpers. Concept conditioning: the
timestep embedding with a zero pooled-CLIP input. Classifier-free guidance is batched
([uncond; cond] in one forward): maps describe the conditional half.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from conceptattention.adapters.base import (
    Backend,
    BackendSpec,
    ConceptEncoding,
    EncodeInputs,
    EncodeRecipe,
    ForwardRecord,
    LayerRule,
    first_timestep,
    later_half,
)
from conceptattention.adapters.joint import ConceptProcessor, JointPath, apply_norm, projections
from conceptattention.concepts import ConceptEmbeddings, concept_token_ids, pipeline_part, pool_spans
from conceptattention.core import TokenGrid


@dataclass(frozen=True)
class SD3Conditioning:
    """Forward inputs the concept conditioning needs: (B,) timestep in [0, 1000], (B, P) pooled CLIP."""

    timestep: torch.Tensor
    pooled: torch.Tensor


def _stream_qkv(attn, states: torch.Tensor, added: bool, head_dim: int) -> tuple[torch.Tensor, ...]:
    """(B, H, S, D) q, k, v of the image (``added=False``) or text stream, QK-normed where the model has norms.

    The same operations, in the same order, as ``JointAttnProcessor2_0``.
    """
    batch = states.shape[0]
    q, k, v = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in projections(attn, states, added))
    norm_q, norm_k = (attn.norm_added_q, attn.norm_added_k) if added else (attn.norm_q, attn.norm_k)
    return apply_norm(norm_q, q), apply_norm(norm_k, k), v


class SD3ConceptAttnProcessor(ConceptProcessor):
    """Stock SD3 joint attention (``JointAttnProcessor2_0``) plus the concept rows of one block.

    Mirrors the stock processor op for op (it calls SDPA directly), so image and text outputs
    are bit-identical; returns exactly the two tensors it returns.
    """

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        assert encoder_hidden_states is not None  # installed on the joint `attn` only, never on `attn2`
        batch_size, num_image = hidden_states.shape[:2]
        head_dim = attn.to_k.out_features // attn.heads
        query, key, value = _stream_qkv(attn, hidden_states, False, head_dim)  # (B, H, N, D)
        text_query, text_key, text_value = _stream_qkv(attn, encoder_hidden_states, True, head_dim)  # (B, H, T, D)

        # Rebinding the names (as the stock processor does) frees the image-only tensors before attention.
        query = torch.cat([query, text_query], dim=2)  # (B, H, N + T, D)
        key = torch.cat([key, text_key], dim=2)
        value = torch.cat([value, text_value], dim=2)
        del text_query, text_key, text_value
        joint = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        joint = joint.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        joint = joint.to(query.dtype)  # (B, N + T, H * D)
        image_out, text_out = joint[:, :num_image], joint[:, num_image:]

        if self.stream.runs(self.block_index):
            # Image q/k/v are the real pass's (after QK-norm), as views; SD3 has no RoPE.
            q_x, k_x, v_x = (t[:, :, :num_image] for t in (query, key, value))  # (B, H, N, D)
            self.stream.concept_rows(self.block_index, q_x, k_x, v_x, image_out)

        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        image_out = attn.to_out[0](image_out)
        image_out = attn.to_out[1](image_out)
        return image_out, text_out


@dataclass
class SD3EncodeInputs(EncodeInputs):
    """Encode-mode conditioning: (B, 77 + T, D) joint prompt embeddings and (B, P) pooled CLIP."""

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor

    batched_fields = ("prompt_embeds", "pooled")


SPEC = BackendSpec(
    name="SD3",
    transformer_classes=("SD3Transformer2DModel",),
    pipeline_classes=("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline"),
    processor_classes=("JointAttnProcessor2_0",),
    concept_encoders=("t5", "clip"),
    default_layers="the later half of the joint blocks, without the context-pre-only last block",
    cfg_layout="batched",
    concept_positions="none (SD3 has no RoPE on text)",
    max_sequence_length=256,
)


def context_pre_only_blocks(transformer: Any, blocks: torch.nn.ModuleList) -> dict[int, str]:
    return {
        i: "it is the `context_pre_only` block, whose text output is discarded, so its text-query weights "
        "were never trained"
        for i, block in enumerate(blocks)
        if block.context_pre_only
    }


def encode_concepts(pipe: Any, concepts: Sequence[str], encoding: ConceptEncoding) -> ConceptEmbeddings:
    choice = encoding.encoder or SPEC.concept_encoders[0]  # resolved once, by the call plan
    device = pipe._execution_device
    prompts = list(concepts)
    if choice == "t5":
        why = "concepts are encoded with T5 by default (`concept_encoder='t5'`); pass `concept_encoder='clip'` to use the CLIP encoders"  # noqa: E501
        tokenizer = pipeline_part(pipe, "tokenizer_3", why)
        pipeline_part(pipe, "text_encoder_3", why)
    else:
        why = "`concept_encoder='clip'` encodes concepts with both CLIP encoders"
        tokenizer = pipeline_part(pipe, "tokenizer", why)
        for name in ("text_encoder", "tokenizer_2", "text_encoder_2"):
            pipeline_part(pipe, name, why)
    words = concept_token_ids(prompts, tokenizer)  # checked before any encoder runs
    if choice == "t5":
        length = encoding.max_sequence_length or SPEC.max_sequence_length
        hidden = pipe._get_t5_prompt_embeds(prompt=prompts, max_sequence_length=length, device=device)
        described = f"t5 (text_encoder_3), each concept alone, padded to {length} tokens as the pipeline does"
    else:
        parts = [pipe._get_clip_prompt_embeds(prompt=prompts, device=device, clip_model_index=i)[0] for i in (0, 1)]
        hidden = torch.cat(parts, dim=-1)  # (C, 77, D_L + D_G), as the pipeline concatenates them
        hidden = F.pad(hidden, (0, pipe.transformer.config.joint_attention_dim - hidden.shape[-1]))
        length = hidden.shape[1]
        described = "clip (CLIP-L + CLIP-G penultimate states, zero-padded to the T5 width), each concept alone"
    ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True).input_ids
    return pool_spans(hidden, ids, words, tokenizer, encoding.pooling, described)


def read_forward(transformer: Any, inputs: Mapping[str, Any], batched_cfg: bool) -> ForwardRecord[SD3Conditioning]:
    latents = inputs["hidden_states"]  # (B, c, H', W'), patchified inside the transformer
    patch = transformer.config.patch_size
    grid = TokenGrid(latents.shape[-2] // patch, latents.shape[-1] // patch)
    timestep = inputs["timestep"]
    batch = latents.shape[0]
    rows = slice(batch // 2, None) if batched_cfg else slice(None)
    conditioning = SD3Conditioning(timestep, inputs["pooled_projections"])
    return ForwardRecord(first_timestep(timestep), 1000.0, grid, rows, conditioning)


def concept_conditioning(transformer: Any, record: ForwardRecord[SD3Conditioning], dtype: torch.dtype) -> torch.Tensor:
    """Timestep embedding with a zero pooled-text input: nothing from the prompt."""
    inputs = record.conditioning
    rows = record.rows
    return transformer.time_text_embed(inputs.timestep[rows], torch.zeros_like(inputs.pooled[rows]))


class SD3Encode(EncodeRecipe[SD3EncodeInputs]):
    def pixels_per_token(self, pipe: Any) -> int:
        return int(getattr(pipe, "vae_scale_factor", 8)) * int(pipe.transformer.config.patch_size)

    def max_pixels_per_side(self, pipe: Any) -> int | None:
        limit = pipe.transformer.config.pos_embed_max_size
        return None if limit is None else int(limit) * self.pixels_per_token(pipe)

    def inputs(
        self, pipe: Any, pixels: torch.Tensor, caption: str, guidance_scale: float | None, max_sequence_length: int
    ) -> SD3EncodeInputs:
        latents = self.latents(pipe, pixels)  # (B, c, H', W')
        prompt_embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=[caption] * latents.shape[0],
            prompt_2=None,
            prompt_3=None,
            device=pipe._execution_device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        return SD3EncodeInputs(latents, None, prompt_embeds.to(latents.dtype), pooled.to(latents.dtype))

    def forward(self, pipe: Any, inputs: SD3EncodeInputs, noisy_latents: torch.Tensor, t: float) -> None:
        batch = noisy_latents.shape[0]
        # SD3 takes the timestep unscaled: the scheduler's t * 1000.
        timestep = torch.full((batch,), float(t) * 1000, device=noisy_latents.device, dtype=torch.float32)
        pipe.transformer(
            hidden_states=noisy_latents,
            timestep=timestep,
            encoder_hidden_states=inputs.prompt_embeds,
            pooled_projections=inputs.pooled,
            return_dict=False,
        )


BACKEND: Backend[SD3EncodeInputs, SD3Conditioning] = Backend(
    spec=SPEC,
    layers=LayerRule(default=later_half, excluded=context_pre_only_blocks),
    concepts=encode_concepts,
    reader=read_forward,
    stream=JointPath(SD3ConceptAttnProcessor, forward_conditioning=concept_conditioning),
    encoding=SD3Encode(),
)
