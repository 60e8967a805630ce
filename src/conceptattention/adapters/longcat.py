"""LongCat-Image backend (``LongCatImageTransformer2DModel``; LongCat-Image, text-to-image).

Flux.1's layout: double-stream blocks with Flux.1's text path (``norm1_context``, ``add_{q,k,v}_proj``,
RMS ``norm_added_{q,k}``, ``to_add_out``, ``norm2_context``, ``ff_context``), then single-stream
blocks; joint sequence [text, image] in (B, S, H, D) layout. What differs from Flux.1:

* Processor: ``LongCatImageAttnProcessor`` is Flux.1's joint attention up to the output
  projections, which it applies without ``.contiguous()``; mirrored op for op.
* Modulation: ``temb`` is the timestep embedding alone (no pooled text, no guidance), passed to
  every block, so concepts use the block's own ``temb``: nothing from the prompt reaches them.
* RoPE: text ids (0, i, i) for the i-th token of the padded prompt block (the template prefix is
  sliced off, so with right padding a prompt's first token is at 0); image ids
  (1, L + row, L + col) with L = ``pipe.tokenizer_max_length``. Concept position policy: each
  concept at the text position its first sub-token has in its own encoding, i.e. where a one-word
  prompt's first token sits: 0 with right padding, where the rotation is the identity (none is
  applied); a left-padding tokenizer puts it at L - n, rotated with the model's own ``pos_embed``.
* Concepts: Qwen2.5-VL ``hidden_states[-1]`` through the pipeline's own ``_encode_prompt`` (the
  prompt's tokens padded to L with a mask, wrapped in the template, the template sliced off), each
  concept a row of its own; the span is located by token ids in the padded sequence.
* Guidance: a separate negative-prompt forward per step (``guidance_scale`` > 1), not traced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.pipelines.longcat_image.pipeline_longcat_image import prepare_pos_ids, split_quotation

from conceptattention.adapters.base import (
    Backend,
    BackendSpec,
    CallArguments,
    ConceptEncoding,
    EncodeInputs,
    EncodeRecipe,
    ForwardRecord,
    PipelineFacts,
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
from conceptattention.concepts import (
    ConceptEmbeddings,
    ConceptPositions,
    check_concept_tokens,
    pipeline_part,
    pool_spans,
    span_starts,
)
from conceptattention.errors import ConceptAttentionError

DEFAULT_NUM_LAYERS = 10


class LongCatConceptAttnProcessor(FluxStyleProcessor):
    """Stock ``LongCatImageAttnProcessor`` (double blocks) plus the one-way concept attention of one block.

    Up to the output projections it is Flux.1's joint attention (same operations, same order); the
    projections are applied as the stock processor applies them, without ``.contiguous()``.
    """

    contiguous_outputs = False  # as LongCatImageAttnProcessor: no .contiguous() before the projections


def concept_positions(concepts: ConceptEmbeddings, device: torch.device) -> torch.Tensor | None:
    """None at text position 0 (ids (0, 0, 0): the identity); else ids (0, p_c, p_c)."""
    extras = concepts.extras
    assert isinstance(extras, ConceptPositions), "LongCat concepts carry their text positions"
    if not any(extras.positions):
        return None
    positions = torch.tensor(extras.positions, device=device, dtype=torch.float32)
    return torch.stack([torch.zeros_like(positions), positions, positions], dim=-1)  # (C, 3)


def prompt_tokens(tokenizer: Any, text: str) -> list[int]:
    """The token ids ``LongCatImagePipeline._encode_prompt`` gives a text: quoted parts character by character."""
    ids: list[int] = []
    for part, quoted in split_quotation(text):
        for piece in part if quoted else [part]:
            ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
    return ids


@dataclass
class LongCatEncodeInputs(EncodeInputs):
    """Encode-mode conditioning: (B, T, D) prompt embeddings, (T, 3) text ids, (N, 3) image ids."""

    prompt_embeds: torch.Tensor
    txt_ids: torch.Tensor
    img_ids: torch.Tensor

    batched_fields = ("prompt_embeds",)  # ids are shared by the batch


SPEC = BackendSpec(
    name="LongCat-Image",
    transformer_classes=("LongCatImageTransformer2DModel",),
    pipeline_classes=("LongCatImagePipeline",),
    processor_classes=("LongCatImageAttnProcessor",),
    concept_encoders=("qwen2.5-vl",),
    default_layers=f"the last {DEFAULT_NUM_LAYERS} double-stream blocks (all of them when there are fewer)",
    cfg_layout="separate",
    concept_positions="each concept at the text position of its first sub-token in its own padded encoding, "
    "where a one-word prompt's first token sits: text ids (0, 0, 0) with right padding (RoPE is the identity)",
    max_sequence_length=512,
    single_blocks="single_transformer_blocks",
    single_processor_classes=("LongCatImageAttnProcessor",),
)


def prompt_budget(pipe: Any) -> int:
    return int(pipe.tokenizer_max_length)


def encode_concepts(pipe: Any, concepts: Sequence[str], encoding: ConceptEncoding) -> ConceptEmbeddings:
    why = "concepts are encoded with the Qwen2.5-VL prompt encoder"
    tokenizer = pipeline_part(pipe, "tokenizer", why)
    pipeline_part(pipe, "text_encoder", why)
    words = [prompt_tokens(tokenizer, concept) for concept in concepts]  # checked before any encoder runs
    empty = [c for c, word in zip(concepts, words) if not word]
    if empty:
        raise ConceptAttentionError(f"The tokenizer produced no tokens for concept(s) {empty}; use other words")
    check_concept_tokens(concepts, words, tokenizer)
    length = int(pipe.tokenizer_max_length)
    # The token block the pipeline builds (truncated, padded to its budget), in which the spans are located.
    padded = tokenizer.pad(
        {"input_ids": [word[:length] for word in words]},
        max_length=length,
        padding="max_length",
        return_attention_mask=True,
        return_tensors="pt",
    )
    sequences = padded.input_ids.tolist()
    with torch.no_grad():
        hidden = pipe._encode_prompt(list(concepts))  # (C, L, D): one row per concept, each with its own mask
    described = "qwen2.5-vl (text_encoder, last hidden layer), each concept alone in the prompt template"
    embeddings = pool_spans(hidden, sequences, words, tokenizer, encoding.pooling, described)
    return dataclasses.replace(embeddings, extras=ConceptPositions(span_starts(sequences, words)))


def read_forward(transformer: Any, inputs: Mapping[str, Any], batched_cfg: bool) -> ForwardRecord[None]:
    return ForwardRecord(first_timestep(inputs["timestep"]), 1.0, image_grid(inputs), slice(None), None)


def block_conditioning(record: ForwardRecord[None], arguments: CallArguments) -> torch.Tensor:
    """(B_rows, D) the block's ``temb``: the timestep embedding only."""
    return arguments["temb"][record.rows]


class LongCatImageEncode(EncodeRecipe[LongCatEncodeInputs]):
    def pixels_per_token(self, pipe: Any) -> int:
        return packed_pixels_per_token(pipe, default_scale=8)

    def inputs(
        self, pipe: Any, pixels: torch.Tensor, caption: str, guidance_scale: float | None, max_sequence_length: int
    ) -> LongCatEncodeInputs:
        length = int(pipe.tokenizer_max_length)
        if max_sequence_length != length:
            raise ConceptAttentionError(
                f"`max_sequence_length`={max_sequence_length} cannot be used with {type(pipe).__name__}: it pads every "
                f"prompt to `pipe.tokenizer_max_length` ({length}) tokens and its image position ids start there; "
                "set that attribute instead"
            )
        device = pipe._execution_device
        latents = self.latents(pipe, pixels)  # (B, c, 2h, 2w)
        batch = latents.shape[0]
        with torch.no_grad():
            prompt_embeds, text_ids = pipe.encode_prompt(prompt=[caption] * batch)
        height, width = (side // 2 for side in latents.shape[-2:])
        image_ids = prepare_pos_ids(modality_id=1, type="image", start=(length, length), height=height, width=width)
        return LongCatEncodeInputs(
            latents=latents,
            guidance_scale=None,  # no guidance embedding; the pipeline's CFG is a separate forward
            prompt_embeds=prompt_embeds.to(device, latents.dtype),
            txt_ids=text_ids.to(device),
            img_ids=image_ids.to(device),
        )

    def forward(self, pipe: Any, inputs: LongCatEncodeInputs, noisy_latents: torch.Tensor, t: float) -> None:
        arguments = {
            "encoder_hidden_states": inputs.prompt_embeds,
            "txt_ids": inputs.txt_ids,
            "img_ids": inputs.img_ids,
        }
        packed_latent_forward(pipe, noisy_latents, t, arguments)


BACKEND: Backend[LongCatEncodeInputs, None] = Backend(
    spec=SPEC,
    layers=flux_family_layers(DEFAULT_NUM_LAYERS),
    concepts=encode_concepts,
    reader=read_forward,
    stream=JointPath(
        LongCatConceptAttnProcessor,
        block_conditioning=block_conditioning,
        concept_positions=concept_positions,
        single=SinglePath(FluxStyleSingleProcessor, block_conditioning=block_conditioning),
    ),
    encoding=LongCatImageEncode(),
    pipeline=PipelineFacts(max_sequence_length=prompt_budget),
)
