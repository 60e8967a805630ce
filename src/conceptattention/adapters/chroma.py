"""Chroma backend (``ChromaTransformer2DModel``; Chroma1-HD / -Base, a FLUX.1-schnell derivative).

The blocks are Flux.1's with the stock ``FluxAttnProcessor`` (same joint order, QK-norm and
RoPE, text position ids 0), so the processor is Flux's. What differs:

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

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from conceptattention.adapters.base import CallArguments, EncodeInputs, ForwardRecord, first_timestep
from conceptattention.adapters.flux import FluxBackend, image_grid


@dataclass
class ChromaEncodeInputs(EncodeInputs):
    """Encode-mode conditioning: (B, T, D) prompt embeddings, (B, T + N) attention mask, ids."""

    prompt_embeds: torch.Tensor
    attention_mask: torch.Tensor
    txt_ids: torch.Tensor
    img_ids: torch.Tensor

    batched_fields = ("prompt_embeds", "attention_mask")


class ChromaBackend(FluxBackend):
    spec = dataclasses.replace(
        FluxBackend.spec,
        name="Chroma",
        transformer_classes=("ChromaTransformer2DModel",),
        pipeline_classes=("ChromaPipeline", "ChromaImg2ImgPipeline"),
    )
    t5_parts = ("tokenizer", "text_encoder")  # Chroma's only encoder: T5, run with its attention mask

    def read_forward(self, transformer, inputs: Mapping[str, Any], batched_cfg: bool) -> ForwardRecord:
        timestep = inputs["timestep"]
        return ForwardRecord(first_timestep(timestep), 1.0, image_grid(inputs), slice(None), None)

    def concept_conditioning(self, transformer, record: ForwardRecord, dtype: torch.dtype) -> None:
        return None  # per block: the block's own text modulation slice

    def block_conditioning(
        self, forward_conditioning: torch.Tensor | None, record: ForwardRecord, arguments: CallArguments
    ) -> torch.Tensor:
        """(B_rows, 6, D) the block's text modulation: a function of the timestep only."""
        temb = arguments["temb"]  # (B, 12, D): [image slice; text slice]
        return temb[record.rows, 6:]

    # -- encode mode ---------------------------------------------------------------------------
    def encode_inputs(
        self, pipe: Any, pixels: torch.Tensor, caption: str, guidance_scale: float | None, max_sequence_length: int
    ) -> ChromaEncodeInputs:
        device = pipe._execution_device
        latents = self.vae_latents(pipe, pixels)  # (B, c, 2h, 2w)
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

    def conditioning_arguments(self, inputs: EncodeInputs) -> dict[str, Any]:
        assert isinstance(inputs, ChromaEncodeInputs)
        return {
            "encoder_hidden_states": inputs.prompt_embeds,
            "txt_ids": inputs.txt_ids,
            "img_ids": inputs.img_ids,
            "attention_mask": inputs.attention_mask,
        }

BACKEND = ChromaBackend()
