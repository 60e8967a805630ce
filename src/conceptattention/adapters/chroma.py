"""Chroma backend (``ChromaTransformer2DModel``; Chroma1-HD / -Base, a FLUX.1-schnell derivative).

The blocks are Flux.1's with the stock ``FluxAttnProcessor`` (same joint order, QK-norm and
RoPE, text position ids 0), so the processor is the shared Flux-family one. What differs:

* Modulation: no pooled text and no timestep MLP per block; a "distilled guidance" network maps
  the timestep to one modulation slice per block, passed to the block as ``temb`` (B, 12, D):
  image slice ``[:, :6]``, text slice ``[:, 6:]``. The text slice is a function of the timestep
  alone, which is exactly the concept conditioning of the method, so concepts use the block's own
  text slice.
* Text mask: the pipeline passes ``attention_mask`` (prompt tokens + one padding token valid).
  Concept queries attend over [concepts; image] only, so no prompt key (padding or not) is in
  their attention; image queries keep the real, masked attention (their outputs are the real ones).
* Concepts: T5 (``text_encoder``), each concept alone with its attention mask, as the pipeline
  encodes a prompt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


@dataclass
class ChromaEncodeInputs(EncodeInputs):
    """Encode-mode conditioning: (B, T, D) prompt embeddings, (B, T + N) attention mask, ids."""

    prompt_embeds: torch.Tensor
    attention_mask: torch.Tensor
    txt_ids: torch.Tensor
    img_ids: torch.Tensor

    batched_fields = ("prompt_embeds", "attention_mask")


SPEC = BackendSpec(
    name="Chroma",
    transformer_classes=("ChromaTransformer2DModel",),
    pipeline_classes=("ChromaPipeline", "ChromaImg2ImgPipeline"),
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
    # Chroma's only encoder: T5, run with its attention mask
    return encode_t5_concepts(pipe, concepts, encoding.pooling, "tokenizer", "text_encoder")


def read_forward(transformer: Any, inputs: Mapping[str, Any], batched_cfg: bool) -> ForwardRecord[None]:
    return ForwardRecord(first_timestep(inputs["timestep"]), 1.0, image_grid(inputs), slice(None), None)


def block_conditioning(record: ForwardRecord[None], arguments: CallArguments) -> torch.Tensor:
    """(B_rows, 6, D) the block's text modulation: a function of the timestep only."""
    temb = arguments["temb"]  # (B, 12, D): [image slice; text slice]
    return temb[record.rows, 6:]


def single_block_conditioning(record: ForwardRecord[None], arguments: CallArguments) -> torch.Tensor:
    """(B_rows, 3, D) the single-stream block's modulation slice, shared by all its tokens: the timestep only."""
    return arguments["temb"][record.rows]


class ChromaEncode(EncodeRecipe[ChromaEncodeInputs]):
    def pixels_per_token(self, pipe: Any) -> int:
        return packed_pixels_per_token(pipe, default_scale=1)

    def inputs(
        self, pipe: Any, pixels: torch.Tensor, caption: str, guidance_scale: float | None, max_sequence_length: int
    ) -> ChromaEncodeInputs:
        device = pipe._execution_device
        latents = self.latents(pipe, pixels)  # (B, c, 2h, 2w)
        batch, dtype = latents.shape[0], latents.dtype
        prompt_embeds, text_ids, prompt_mask, *_ = pipe.encode_prompt(
            prompt=[caption] * batch,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        height, width = (side // 2 for side in latents.shape[-2:])
        attention_mask = pipe._prepare_attention_mask(batch, height * width, dtype, prompt_mask)
        return ChromaEncodeInputs(
            latents=latents,
            guidance_scale=None,  # Chroma has no embedded guidance; its CFG is a separate forward
            prompt_embeds=prompt_embeds.to(dtype),
            attention_mask=attention_mask,
            txt_ids=text_ids,
            img_ids=pipe._prepare_latent_image_ids(batch, height, width, device, dtype),
        )

    def forward(self, pipe: Any, inputs: ChromaEncodeInputs, noisy_latents: torch.Tensor, t: float) -> None:
        arguments = {
            "encoder_hidden_states": inputs.prompt_embeds,
            "txt_ids": inputs.txt_ids,
            "img_ids": inputs.img_ids,
            "attention_mask": inputs.attention_mask,
        }
        packed_latent_forward(pipe, noisy_latents, t, arguments)


BACKEND: Backend[ChromaEncodeInputs, None] = Backend(
    spec=SPEC,
    layers=flux_family_layers(DEFAULT_NUM_LAYERS),
    concepts=encode_concepts,
    reader=read_forward,
    stream=JointPath(
        FluxStyleProcessor,
        block_conditioning=block_conditioning,
        single=SinglePath(FluxStyleSingleProcessor, block_conditioning=single_block_conditioning),
    ),
    encoding=ChromaEncode(),
)
