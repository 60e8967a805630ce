"""Flux.2 backend (``Flux2Transformer2DModel``; FLUX.2-dev, FLUX.2 Klein).

Double-stream blocks followed by single blocks, ``Flux2AttnProcessor``, joint sequence
[text, image] in (B, S, H, D) layout, RMS QK-norm per head. What differs from Flux.1:

* Modulation: computed once per forward at model level from the timestep (+ guidance) embedding
  (``double_stream_modulation_txt``) and passed to every block as ``temb_mod_txt``; the blocks'
  ``norm1_context`` is a plain LayerNorm. That text modulation contains nothing from the prompt,
  so concepts use it as is (the method's concept conditioning).
* Text RoPE with real positions: ids (t, h, w, l) with text token j at l = j. Concept position
  policy: each concept at the l its first sub-token has in its own templated encoding, i.e. where
  a prompt's first user token sits (after the chat template's system/user header); the rotation
  uses the model's own ``pos_embed`` and ``apply_rotary_emb``.
* Concepts: through the pipeline's own prompt path (Mistral-3 chat template with the system
  message for dev, Qwen3 chat template without thinking for Klein; hidden layers stacked as the
  pipeline stacks them); the concept's span is located by token ids in the templated sequence.
* Reference images (image-conditioned generation): their latents follow the target latents with
  time coordinate t > 0; concepts attend over all image tokens, maps cover the target grid only.
"""

from __future__ import annotations

import dataclasses
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
    TensorFacts,
    first_timestep,
)
from conceptattention.adapters.joint import (
    FluxStyleProcessor,
    FluxStyleSingleProcessor,
    JointPath,
    SinglePath,
    flux_family_layers,
    packed_pixels_per_token,
)
from conceptattention.concepts import (
    ConceptEmbeddings,
    ConceptPositions,
    concept_token_ids,
    pipeline_part,
    pool_spans,
    span_starts,
    word_in_context,
)
from conceptattention.core import TokenGrid
from conceptattention.errors import ConceptAttentionError

DEFAULT_NUM_LAYERS = 3


@dataclass(frozen=True)
class Flux2Conditioning:
    """Nothing per forward: the text modulation is read from each block's ``temb_mod_txt``."""


class Flux2ConceptAttnProcessor(FluxStyleProcessor):
    """Stock ``Flux2AttnProcessor`` (double blocks) plus the one-way concept attention of one block.

    Up to the output projections Flux.2's joint attention is Flux.1's (same operations, same
    order); it differs in the projections and in rotating the concepts at their text positions.
    """

    contiguous_outputs = False  # as Flux2AttnProcessor: no .contiguous() before the projections


class Flux2SingleConceptAttnProcessor(FluxStyleSingleProcessor):
    """Stock ``Flux2ParallelSelfAttnProcessor`` (single blocks) plus the concept rows of one block.

    One fused projection gives q/k/v and the MLP input; the attention, the SwiGLU branch and the
    parallel output projection follow in the stock order, so the block's output is bit-identical.
    """

    def __call__(  # type: ignore[override]
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        qkv, mlp = fused_branches(attn, hidden_states)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in qkv.chunk(3, dim=-1))  # (B, S, H, D)
        out = self.shared_attention(attn.norm_q(query), attn.norm_k(key), value, attention_mask, image_rotary_emb)
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))


def fused_branches(attn: Any, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(qkv, mlp input) of ``to_qkv_mlp_proj``, split by the stock processor's global ratio."""
    fused = attn.to_qkv_mlp_proj(hidden_states)
    qkv_dim = 3 * attn.inner_dim
    mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
    local_qkv = fused.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
    qkv, mlp = torch.split(fused, [local_qkv, fused.shape[-1] - local_qkv], dim=-1)
    return qkv, mlp


def single_branches(block: Any, normed: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Concept q, k, v and the SwiGLU MLP branch from the block's one fused projection."""
    qkv, mlp = fused_branches(block.attn, normed)
    q, k, v = qkv.chunk(3, dim=-1)
    return q, k, v, block.attn.mlp_act_fn(mlp)


def single_out(block: Any, attention_out: torch.Tensor, mlp: torch.Tensor) -> torch.Tensor:
    return block.attn.to_out(torch.cat([attention_out, mlp], dim=-1))


def single_modulation(block: Any, hidden: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model-level (B, 3D) single-stream modulation on the block's parameter-free ``norm``."""
    shift, scale, gate = emb.chunk(3, dim=-1)
    return (1 + scale[:, None]) * block.norm(hidden) + shift[:, None], gate


def single_block_conditioning(record: ForwardRecord[Flux2Conditioning], arguments: CallArguments) -> torch.Tensor:
    """(B_rows, 3D) the single-stream modulation every block gets: timestep (+ guidance) only."""
    return arguments["temb_mod"][record.rows]


def concept_positions(concepts: ConceptEmbeddings, device: torch.device) -> torch.Tensor:
    """Text ids (0, 0, 0, l_c): each concept at its first sub-token's position in its templated encoding."""
    extras = concepts.extras
    assert isinstance(extras, ConceptPositions), "Flux.2 concepts carry their template positions"
    ids = torch.zeros(len(extras.positions), 4, device=device)
    ids[:, 3] = torch.tensor(extras.positions, device=device, dtype=ids.dtype)
    return ids


@dataclass
class Flux2EncodeInputs(EncodeInputs):
    """Encode-mode conditioning: (B, T, D) prompt embeddings, text and image ids, (B,) guidance."""

    prompt_embeds: torch.Tensor
    txt_ids: torch.Tensor
    img_ids: torch.Tensor
    guidance: torch.Tensor | None

    # The ids are (B, S, 4) but the transformer reads their first row only: shared by every micro-batch, so the
    # target geometry is read from them once per encode call.
    batched_fields = ("prompt_embeds", "guidance")


SPEC = BackendSpec(
    name="Flux.2",
    transformer_classes=("Flux2Transformer2DModel",),
    pipeline_classes=("Flux2Pipeline", "Flux2KleinPipeline"),
    processor_classes=("Flux2AttnProcessor",),
    concept_encoders=("prompt",),
    default_layers=f"the last {DEFAULT_NUM_LAYERS} double-stream blocks (FLUX.2-dev: 5-7 of 0-7)",
    cfg_layout="separate",
    concept_positions="each concept at the text position l of its first sub-token in its own templated "
    "encoding (where a prompt's first user token sits)",
    max_sequence_length=512,
    single_blocks="single_transformer_blocks",
    single_processor_classes=("Flux2ParallelSelfAttnProcessor",),
)


def text_modulation(block: Any, hidden: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Flux.2 splits the model-level (B, 6D) text modulation; ``norm1_context`` has no parameters."""
    (shift, scale, gate), (shift_mlp, scale_mlp, gate_mlp) = (
        tuple(t.flatten(1) for t in params) for params in _split(emb)
    )
    normed = (1 + scale[:, None]) * block.norm1_context(hidden) + shift[:, None]
    return normed, gate, shift_mlp, scale_mlp, gate_mlp


def block_conditioning(record: ForwardRecord[Flux2Conditioning], arguments: CallArguments) -> torch.Tensor:
    """(B_rows, 6D) the text modulation the block gets: timestep (+ guidance) only."""
    return arguments["temb_mod_txt"][record.rows]


def encode_concepts(pipe: Any, concepts: Sequence[str], encoding: ConceptEncoding) -> ConceptEmbeddings:
    why = "concepts are encoded with the pipeline's prompt encoder"
    processor = pipeline_part(pipe, "tokenizer", why)
    encoder = pipeline_part(pipe, "text_encoder", why)
    tokenizer = getattr(processor, "tokenizer", processor)  # FLUX.2-dev passes a Pixtral processor
    length = encoding.max_sequence_length or SPEC.max_sequence_length
    device = pipe._execution_device
    prompts = list(concepts)
    concept_token_ids(prompts, tokenizer)  # unknown / identical / empty concepts fail before any encoder runs
    if hasattr(pipe, "_get_qwen3_prompt_embeds"):  # Klein: Qwen3 chat template, no thinking
        texts = [
            processor.apply_chat_template(
                [{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True, enable_thinking=False
            )
            for c in prompts
        ]
        # The encoder masks padding, so the concept states do not depend on the padded length: pad only
        # to the longest templated concept instead of the prompt budget.
        length = min(length, max(len(ids) for ids in processor(texts).input_ids))
        hidden = pipe._get_qwen3_prompt_embeds(
            text_encoder=encoder, tokenizer=processor, prompt=prompts, device=device, max_sequence_length=length
        )
        ids = processor(texts, padding="max_length", truncation=True, max_length=length).input_ids
        described = "prompt: qwen3 (text_encoder, chat template, hidden layers 9/18/27 stacked), each concept alone"
    elif hasattr(pipe, "_get_mistral_3_small_prompt_embeds"):  # dev: Mistral-3 with the system message
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input

        system = getattr(pipe, "system_message", None)
        options = {} if system is None else {"system_message": system}
        unpadded = processor.apply_chat_template(
            format_input(prompts, **options), add_generation_prompt=False, tokenize=True, return_dict=True
        )["input_ids"]
        length = min(length, max(len(ids) for ids in unpadded))  # as for Klein: padding is masked
        hidden = pipe._get_mistral_3_small_prompt_embeds(
            text_encoder=encoder,
            tokenizer=processor,
            prompt=prompts,
            device=device,
            max_sequence_length=length,
            **options,
        )
        ids = processor.apply_chat_template(
            format_input(prompts, **options),
            add_generation_prompt=False,
            tokenize=True,
            return_dict=True,
            padding="max_length",
            truncation=True,
            max_length=length,
        )["input_ids"]
        described = "prompt: mistral-3 (text_encoder, chat template with the system message, hidden layers "
        described += "10/20/30 stacked), each concept alone"
    else:
        raise ConceptAttentionError(
            f"{type(pipe).__name__} has no Flux.2 prompt encoder (`_get_qwen3_prompt_embeds` or "
            "`_get_mistral_3_small_prompt_embeds`); use Flux2Pipeline or Flux2KleinPipeline"
        )
    sequences = [list(row) for row in (ids.tolist() if torch.is_tensor(ids) else ids)]
    words = [word_in_context(tokenizer, c, seq) for c, seq in zip(prompts, sequences)]
    embeddings = pool_spans(hidden, sequences, words, tokenizer, encoding.pooling, described)
    return dataclasses.replace(embeddings, extras=ConceptPositions(span_starts(sequences, words)))


def read_forward(transformer: Any, inputs: Mapping[str, Any], batched_cfg: bool) -> ForwardRecord[Flux2Conditioning]:
    count, h, w = _target_geometry(inputs["img_ids"])
    if h * w != count:
        raise ConceptAttentionError(f"The target image ids describe a {h}x{w} grid but there are {count} tokens")
    if inputs.get("kv_cache_mode") is not None:
        raise ConceptAttentionError("KV-cached reference forwards (Flux.2 Klein KV) are not supported")
    return ForwardRecord(first_timestep(inputs["timestep"]), 1.0, TokenGrid(h, w), slice(None), Flux2Conditioning(),
                         slice(0, count))  # fmt: skip


class Flux2Encode(EncodeRecipe[Flux2EncodeInputs]):
    def pixels_per_token(self, pipe: Any) -> int:
        return packed_pixels_per_token(pipe, default_scale=8)  # 2x2 patchified latents

    def latents(self, pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 4c, H'/2, W'/2) patchified latents normalised by the VAE's batch-norm statistics."""
        vae = pipe.vae
        latents = vae.encode(pixels.to(pipe._execution_device, vae.dtype)).latent_dist.mode()
        latents = pipe._patchify_latents(latents)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents)
        return ((latents - mean) / std).to(pipe.transformer.dtype)

    def inputs(
        self, pipe: Any, pixels: torch.Tensor, caption: str, guidance_scale: float | None, max_sequence_length: int
    ) -> Flux2EncodeInputs:
        device = pipe._execution_device
        latents = self.latents(pipe, pixels)  # (B, 4c, h, w)
        batch = latents.shape[0]
        prompt_embeds, text_ids = pipe.encode_prompt(
            prompt=[caption] * batch, device=device, max_sequence_length=max_sequence_length
        )
        guidance = None
        if pipe.transformer.config.guidance_embeds:
            guidance_scale = 4.0 if guidance_scale is None else guidance_scale  # FLUX.2-dev's default
            guidance = torch.full((batch,), float(guidance_scale), device=device, dtype=torch.float32)
        return Flux2EncodeInputs(
            latents=latents,
            guidance_scale=guidance_scale if guidance is not None else None,
            prompt_embeds=prompt_embeds.to(latents.dtype),
            txt_ids=text_ids.to(device),
            img_ids=pipe._prepare_latent_ids(latents).to(device),
            guidance=guidance,
        )

    def forward(self, pipe: Any, inputs: Flux2EncodeInputs, noisy_latents: torch.Tensor, t: float) -> None:
        packed = pipe._pack_latents(noisy_latents)  # (B, h * w, 4c)
        timestep = torch.full((packed.shape[0],), float(t), device=packed.device, dtype=packed.dtype)
        pipe.transformer(
            hidden_states=packed,
            timestep=timestep,
            guidance=inputs.guidance,
            encoder_hidden_states=inputs.prompt_embeds,
            txt_ids=inputs.txt_ids,
            img_ids=inputs.img_ids,
            return_dict=False,
        )


def _read_target_geometry(img_ids: torch.Tensor) -> tuple[int, int, int]:
    """(count, h, w) of the target image's tokens in ``img_ids`` (N, 4) or (B, N, 4): (t, h, w, l); one host read."""
    ids = (img_ids[0] if img_ids.ndim == 3 else img_ids)[:, :3].tolist()
    first_t = ids[0][0]  # the target image's tokens come first; references have t > 0
    count = sum(1 for t, _, _ in ids if t == first_t)
    if any(t != first_t for t, _, _ in ids[:count]):
        raise ConceptAttentionError("The target image tokens must come first in the image sequence")
    h = int(max(row for _, row, _ in ids[:count])) + 1
    w = int(max(column for _, _, column in ids[:count])) + 1
    return count, h, w


_target_geometry = TensorFacts(_read_target_geometry)


def _split(mod: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """(B, 6D) -> ((shift, scale, gate), (shift_mlp, scale_mlp, gate_mlp)), as ``Flux2Modulation.split``."""
    chunks = mod.chunk(6, dim=-1)
    return chunks[:3], chunks[3:]


BACKEND: Backend[Flux2EncodeInputs, Flux2Conditioning] = Backend(
    spec=SPEC,
    layers=flux_family_layers(DEFAULT_NUM_LAYERS),
    concepts=encode_concepts,
    reader=read_forward,
    stream=JointPath(
        Flux2ConceptAttnProcessor,
        block_conditioning=block_conditioning,
        modulation=text_modulation,
        concept_positions=concept_positions,
        single=SinglePath(
            Flux2SingleConceptAttnProcessor,
            block_conditioning=single_block_conditioning,
            modulation=single_modulation,
            branches=single_branches,
            out=single_out,
        ),
    ),
    encoding=Flux2Encode(),
)
