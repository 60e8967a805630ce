"""Flux.1 backend (``FluxTransformer2DModel``; FLUX.1-schnell, FLUX.1-dev).

Joint sequence [text, image] in (B, S, H, D) layout; RMS QK-norm per stream; RoPE on the
whole sequence with text position ids 0 (the identity on text, hence on concepts).
Concepts: T5 (``text_encoder_2``), each concept alone. Concept conditioning: the timestep
(+ guidance) embedding with a zero pooled-CLIP input.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.embeddings import apply_rotary_emb

from conceptattention.adapters.base import (
    BackendSpec,
    ConceptEncoding,
    EncodeInputs,
    ForwardRecord,
    TensorFacts,
    first_timestep,
)
from conceptattention.adapters.joint import ConceptProcessor, JointBackend, projections
from conceptattention.concepts import ConceptEmbeddings, encode_concepts, pipeline_part
from conceptattention.core import TokenGrid
from conceptattention.errors import ConceptAttentionError

DEFAULT_NUM_LAYERS = 10


@dataclass(frozen=True)
class FluxConditioning:
    """Forward inputs the concept conditioning needs: (B,) timestep in [0, 1], (B,) guidance, (B, P) pooled."""

    timestep: torch.Tensor
    guidance: torch.Tensor | None
    pooled: torch.Tensor


def _grid_of_ids(img_ids: torch.Tensor) -> tuple[int, int]:
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids  # (N, 3): (unused, row, column)
    h, w = (int(v) + 1 for v in ids[-1, 1:3].tolist())
    return h, w


_ids_grid = TensorFacts(_grid_of_ids)


def image_grid(inputs: Mapping[str, Any]) -> TokenGrid:
    """The (h, w) token grid of a Flux-style forward, from its ``img_ids`` (read once per pipeline call)."""
    h, w = _ids_grid(inputs["img_ids"])
    num_tokens = inputs["hidden_states"].shape[1]
    if h * w != num_tokens:
        raise ConceptAttentionError(
            f"The image position ids describe a {h}x{w} grid but there are {num_tokens} image tokens; "
            "image-conditioned variants with extra tokens (Kontext, reference images) are not supported"
        )
    return TokenGrid(h, w)


def flux_joint_attention(
    processor: ConceptProcessor,
    attn: Any,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stock joint attention of Flux.1, Chroma and Flux.2 double blocks, up to the output projections.

    The same operations in the same order as diffusers' ``FluxAttnProcessor`` and
    ``Flux2AttnProcessor`` (which agree up to there), on the user's attention backend.

    Returns:
        query, key, value: (B, T + N, H, D) after QK-norm and RoPE, [text; image];
        text_out (B, T, H * D) and image_out (B, N, H * D): attention outputs before the projections.
    """
    query, key, value = projections(attn, hidden_states, added=False)
    query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))  # (B, N, H, D)
    key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
    value = value.unflatten(-1, (-1, attn.head_dim))

    text_query, text_key, text_value = projections(attn, encoder_hidden_states, added=True)
    text_query = attn.norm_added_q(text_query.unflatten(-1, (-1, attn.head_dim)))  # (B, T, H, D)
    text_key = attn.norm_added_k(text_key.unflatten(-1, (-1, attn.head_dim)))
    text_value = text_value.unflatten(-1, (-1, attn.head_dim))

    query = torch.cat([text_query, query], dim=1)  # (B, T + N, H, D)
    key = torch.cat([text_key, key], dim=1)
    value = torch.cat([text_value, value], dim=1)
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)  # type: ignore[arg-type,assignment]
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)  # type: ignore[arg-type,assignment]

    joint = processor.joint_attention(query, key, value, attention_mask)  # (B, T + N, H * D)
    text_len = encoder_hidden_states.shape[1]
    text_out, image_out = joint.split_with_sizes([text_len, joint.shape[1] - text_len], dim=1)
    return query, key, value, text_out, image_out


def image_rows(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, text_len: int):
    """The image part of [text; image] (B, S, H, D) q/k/v, as (B, H, N, D) each (reused, not recomputed)."""
    return tuple(t[:, text_len:].transpose(1, 2) for t in (query, key, value))


class FluxConceptAttnProcessor(ConceptProcessor):
    """Stock Flux joint attention plus the one-way concept attention of one double block.

    The image and text outputs are computed with the same operations, in the same order,
    as diffusers' ``FluxAttnProcessor`` (on the user's attention backend), so they are
    bit-identical to an untraced run. Returns exactly the two tensors the stock processor returns.
    """

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert encoder_hidden_states is not None  # double blocks always pass the text stream
        query, key, value, text_out, image_out = flux_joint_attention(
            self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb
        )
        if self.stream.runs(self.block_index):
            q_x, k_x, v_x = image_rows(query, key, value, text_out.shape[1])
            rope = self.concept_rope(image_out.device) if image_rotary_emb is not None else None
            self.stream.concept_rows(self.block_index, attn, q_x, k_x, v_x, image_out, rope)
        return self.output_projections(attn, image_out, text_out)

    def concept_rope(self, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The concepts' rotation: none for Flux.1 and Chroma (text position ids 0: the identity)."""
        return None

    def output_projections(self, attn: Any, image_out: torch.Tensor, text_out: torch.Tensor):
        """The stock processor's output projections, as ``FluxAttnProcessor`` applies them."""
        image_out = attn.to_out[0](image_out.contiguous())
        image_out = attn.to_out[1](image_out)
        text_out = attn.to_add_out(text_out.contiguous())
        return image_out, text_out


@dataclass
class FluxEncodeInputs(EncodeInputs):
    """Encode-mode conditioning: (B, T, D) prompt embeddings, (B, P) pooled, ids, (B,) guidance."""

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    txt_ids: torch.Tensor
    img_ids: torch.Tensor
    guidance: torch.Tensor | None

    batched_fields = ("prompt_embeds", "pooled", "guidance")  # ids are shared by the batch


def last_double_block_if_no_singles(backend: JointBackend, transformer: Any) -> dict[int, str]:
    """Flux-family rule: without single-stream blocks after it, the last double block's text output is dead."""
    if transformer.config.num_single_layers > 0:
        return {}
    last = backend.num_blocks(transformer) - 1
    return {last: "with no single-stream blocks after it, its text output feeds nothing, so its text-query "
                  "weights were never trained"}  # fmt: skip


class FluxBackend(JointBackend):
    spec = BackendSpec(
        name="Flux.1",
        transformer_classes=("FluxTransformer2DModel",),
        pipeline_classes=("FluxPipeline", "FluxImg2ImgPipeline"),
        processor_classes=("FluxAttnProcessor",),
        double_blocks="transformer_blocks",
        joint_order=("text", "image"),
        layout="BSHD",
        concept_encoders=("t5",),
        default_layers=f"the last {DEFAULT_NUM_LAYERS} double-stream blocks (all of them when there are fewer)",
        cfg_layout="separate",
        concept_positions="text position ids 0 (RoPE is the identity on concepts)",
        max_sequence_length=512,
    )
    processor_class = FluxConceptAttnProcessor
    t5_parts: tuple[str, str] = ("tokenizer_2", "text_encoder_2")  # the pipeline's T5 (tokenizer, encoder)

    def excluded_blocks(self, transformer) -> dict[int, str]:
        return last_double_block_if_no_singles(self, transformer)

    def default_layers(self, transformer) -> tuple[int, ...]:
        return tuple(self.usable_blocks(transformer)[-DEFAULT_NUM_LAYERS:])

    def encode_concepts(self, pipe: Any, concepts: Sequence[str], encoding: ConceptEncoding) -> ConceptEmbeddings:
        self.concept_encoder(encoding.encoder)
        tokenizer_name, encoder_name = self.t5_parts
        tokenizer = pipeline_part(pipe, tokenizer_name, "concepts are encoded with the T5 prompt encoder")
        encoder = pipeline_part(pipe, encoder_name, "concepts are encoded with the T5 prompt encoder")
        embeddings = encode_concepts(concepts, tokenizer, encoder, pipe._execution_device, encoding.pooling)
        return embeddings.with_encoder(f"t5 ({encoder_name}), each concept alone with an attention mask")

    def read_forward(self, transformer, inputs: Mapping[str, Any], batched_cfg: bool) -> ForwardRecord:
        timestep = inputs["timestep"]
        conditioning = FluxConditioning(timestep, inputs.get("guidance"), inputs["pooled_projections"])
        return ForwardRecord(first_timestep(timestep), 1.0, image_grid(inputs), slice(None), conditioning)

    def concept_conditioning(self, transformer, record: ForwardRecord, dtype: torch.dtype) -> torch.Tensor | None:
        """Timestep (+ guidance) embedding with a zero pooled-text input: nothing from the prompt."""
        inputs: FluxConditioning = record.conditioning
        rows = record.rows
        timestep = inputs.timestep[rows].to(dtype) * 1000
        zeros = torch.zeros_like(inputs.pooled[rows])
        if inputs.guidance is None:
            return transformer.time_text_embed(timestep, zeros)
        return transformer.time_text_embed(timestep, inputs.guidance[rows].to(dtype) * 1000, zeros)

    # -- encode mode ---------------------------------------------------------------------------
    def pixels_per_token(self, pipe: Any) -> int:
        return int(getattr(pipe, "vae_scale_factor", 1)) * 2  # Flux packs 2x2 latent patches

    def encode_inputs(
        self, pipe: Any, pixels: torch.Tensor, caption: str, guidance_scale: float | None, max_sequence_length: int
    ) -> EncodeInputs:
        device = pipe._execution_device
        latents = self.vae_latents(pipe, pixels)  # (B, c, 2h, 2w)
        batch, dtype = latents.shape[0], latents.dtype
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(
            prompt=[caption] * batch, prompt_2=None, device=device, max_sequence_length=max_sequence_length
        )
        height, width = latents.shape[-2:]
        guidance = None
        if pipe.transformer.config.guidance_embeds:
            guidance_scale = 3.5 if guidance_scale is None else guidance_scale  # FLUX.1-dev's default
            guidance = torch.full((batch,), float(guidance_scale), device=device, dtype=torch.float32)
        return FluxEncodeInputs(
            latents=latents,
            guidance_scale=guidance_scale if guidance is not None else None,
            prompt_embeds=prompt_embeds.to(dtype),
            pooled=pooled.to(dtype),
            txt_ids=text_ids,
            img_ids=pipe._prepare_latent_image_ids(batch, height // 2, width // 2, device, dtype),
            guidance=guidance,
        )

    def encode_forward(self, pipe: Any, inputs: EncodeInputs, noisy_latents: torch.Tensor, t: float) -> None:
        batch, channels, height, width = noisy_latents.shape
        packed = pipe._pack_latents(noisy_latents, batch, channels, height, width)  # (B, N, 4c)
        timestep = torch.full((batch,), float(t), device=packed.device, dtype=packed.dtype)
        pipe.transformer(hidden_states=packed, timestep=timestep, **self.conditioning_arguments(inputs),
                         return_dict=False)  # fmt: skip

    def conditioning_arguments(self, inputs: EncodeInputs) -> dict[str, Any]:
        """The transformer's keyword arguments besides latents and timestep, for an encode forward."""
        assert isinstance(inputs, FluxEncodeInputs)
        return {
            "encoder_hidden_states": inputs.prompt_embeds,
            "pooled_projections": inputs.pooled,
            "txt_ids": inputs.txt_ids,
            "img_ids": inputs.img_ids,
            "guidance": inputs.guidance,
        }


BACKEND = FluxBackend()
