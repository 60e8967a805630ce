"""Flux.1 backend (``FluxTransformer2DModel``; FLUX.1-schnell, FLUX.1-dev).

Joint sequence [text, image] in (B, S, H, D) layout; RMS QK-norm per stream; RoPE on the
whole sequence with text position ids 0 (the identity on text, hence on concepts).
Concepts: T5 (``text_encoder_2``), each concept alone. Concept conditioning: the timestep
(+ guidance) embedding with a zero pooled-CLIP input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from conceptattention.adapters.base import (
    Backend,
    BackendSpec,
    ConceptEncoding,
    EncodeInputs,
    EncodeRecipe,
    ForwardRecord,
    first_timestep,
)
from conceptattention.adapters.joint import (
    FluxStyleProcessor,
    FluxStyleSingleProcessor,
    JointPath,
    SinglePath,
    flux_family_layers,
    image_grid,
    packed_latent_forward,
    packed_pixels_per_token,
)
from conceptattention.concepts import ConceptEmbeddings, encode_t5_concepts

DEFAULT_NUM_LAYERS = 10


@dataclass(frozen=True)
class FluxConditioning:
    """Forward inputs the concept conditioning needs: (B,) timestep in [0, 1], (B,) guidance, (B, P) pooled."""

    timestep: torch.Tensor
    guidance: torch.Tensor | None
    pooled: torch.Tensor


@dataclass
class FluxEncodeInputs(EncodeInputs):
    """Encode-mode conditioning: (B, T, D) prompt embeddings, (B, P) pooled, ids, (B,) guidance."""

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    txt_ids: torch.Tensor
    img_ids: torch.Tensor
    guidance: torch.Tensor | None

    batched_fields = ("prompt_embeds", "pooled", "guidance")  # ids are shared by the batch


SPEC = BackendSpec(
    name="Flux.1",
    transformer_classes=("FluxTransformer2DModel",),
    pipeline_classes=("FluxPipeline", "FluxImg2ImgPipeline"),
    processor_classes=("FluxAttnProcessor",),
    concept_encoders=("t5",),
    default_layers=f"the last {DEFAULT_NUM_LAYERS} double-stream blocks (all of them when there are fewer)",
    cfg_layout="separate",
    concept_positions="text position ids 0 (RoPE is the identity on concepts)",
    max_sequence_length=512,
    single_blocks="single_transformer_blocks",
    single_processor_classes=("FluxAttnProcessor",),
)


def encode_concepts(pipe: Any, concepts: Sequence[str], encoding: ConceptEncoding) -> ConceptEmbeddings:
    return encode_t5_concepts(pipe, concepts, encoding.pooling, "tokenizer_2", "text_encoder_2")


def read_forward(transformer: Any, inputs: Mapping[str, Any], batched_cfg: bool) -> ForwardRecord[FluxConditioning]:
    timestep = inputs["timestep"]
    conditioning = FluxConditioning(timestep, inputs.get("guidance"), inputs["pooled_projections"])
    return ForwardRecord(first_timestep(timestep), 1.0, image_grid(inputs), slice(None), conditioning)


def concept_conditioning(transformer: Any, record: ForwardRecord[FluxConditioning], dtype: torch.dtype) -> torch.Tensor:
    """Timestep (+ guidance) embedding with a zero pooled-text input: nothing from the prompt."""
    inputs = record.conditioning
    rows = record.rows
    timestep = inputs.timestep[rows].to(dtype) * 1000
    zeros = torch.zeros_like(inputs.pooled[rows])
    if inputs.guidance is None:
        return transformer.time_text_embed(timestep, zeros)
    return transformer.time_text_embed(timestep, inputs.guidance[rows].to(dtype) * 1000, zeros)


class FluxEncode(EncodeRecipe[FluxEncodeInputs]):
    def pixels_per_token(self, pipe: Any) -> int:
        return packed_pixels_per_token(pipe, default_scale=1)

    def inputs(
        self, pipe: Any, pixels: torch.Tensor, caption: str, guidance_scale: float | None, max_sequence_length: int
    ) -> FluxEncodeInputs:
        device = pipe._execution_device
        latents = self.latents(pipe, pixels)  # (B, c, 2h, 2w)
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

    def forward(self, pipe: Any, inputs: FluxEncodeInputs, noisy_latents: torch.Tensor, t: float) -> None:
        arguments = {
            "encoder_hidden_states": inputs.prompt_embeds,
            "pooled_projections": inputs.pooled,
            "txt_ids": inputs.txt_ids,
            "img_ids": inputs.img_ids,
            "guidance": inputs.guidance,
        }
        packed_latent_forward(pipe, noisy_latents, t, arguments)


BACKEND: Backend[FluxEncodeInputs, FluxConditioning] = Backend(
    spec=SPEC,
    layers=flux_family_layers(DEFAULT_NUM_LAYERS),
    concepts=encode_concepts,
    reader=read_forward,
    stream=JointPath(
        FluxStyleProcessor, forward_conditioning=concept_conditioning, single=SinglePath(FluxStyleSingleProcessor)
    ),
    encoding=FluxEncode(),
)
