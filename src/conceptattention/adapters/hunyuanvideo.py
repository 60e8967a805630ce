"""HunyuanVideo backend (``HunyuanVideoTransformer3DModel``; ``HunyuanVideoPipeline``, text-to-video).

Dual-stream blocks with diffusers' text-stream names (``norm1_context``, ``add_*_proj``,
``norm_added_*``, ``to_add_out``, ``norm2_context``, ``ff_context``), then single-stream blocks.
Joint sequence [video, text] in (B, S, H, D) layout, RMS QK-norm per stream, RoPE on video tokens
only (none on text, hence none on concepts), text mask ``(B, 1, 1, N + T)``. What differs from Flux.1:

* The transformer calls its blocks positionally: arguments are read by the blocks' signature.
* The context embedder is a token refiner that self-attends over the prompt (with its mask) and
  takes the timestep. Each concept's whole templated sequence goes through it as its own sequence,
  with its own mask and the forward's timestep, at every traced forward (concepts never see each
  other or the prompt); the concept's span is pooled afterwards.
* Concepts are encoded as the pipeline encodes a prompt: Llama-3 in the HunyuanVideo prompt template,
  ``hidden_states[-3]``, the template prefix (``crop_start`` tokens) dropped; the concept's own
  sub-tokens are located by token ids in the cropped sequence.
* Concept conditioning: the timestep + guidance embedding with a zero pooled-CLIP input.
* Classifier-free guidance is a separate forward (``true_cfg_scale``), not traced.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

from conceptattention.adapters.base import (
    Backend,
    BackendSpec,
    ConceptEncoding,
    EncodeInputs,
    EncodeRecipe,
    ForwardRecord,
    LayerRule,
    RunState,
    VideoFacts,
    later_half,
)
from conceptattention.adapters.joint import (
    ConceptProcessor,
    JointPath,
    SinglePath,
    apply_norm,
    dead_last_double_block,
    projections,
)
from conceptattention.concepts import ConceptEmbeddings, concept_token_ids, pipeline_part, pool_spans, span_starts
from conceptattention.config import Pooling
from conceptattention.core import TokenGrid
from conceptattention.errors import ConceptAttentionError

SKIPPED_LAYERS = 2  # the pipeline's `num_hidden_layers_to_skip`: prompts are `hidden_states[-3]`
# The pipeline's default prompt template, and how many of its leading tokens (the system prompt and the
# user header, <|begin_of_text|> included) it drops from the encoder output.
PROMPT_TEMPLATE: str = cast(str, DEFAULT_PROMPT_TEMPLATE["template"])
CROP_START: int = cast(int, DEFAULT_PROMPT_TEMPLATE["crop_start"])


@dataclass(frozen=True)
class HunyuanConditioning:
    """Forward inputs the concepts need: (B,) timestep on the 0-1000 scale, (B,) guidance (x 1000), (B, P) pooled,
    and whether the rows share one timestep by construction (one refiner pass then serves every row)."""

    timestep: torch.Tensor
    guidance: torch.Tensor | None
    pooled: torch.Tensor
    shared_timestep: bool = False  # every row has the same timestep, by construction of the call


@dataclass(frozen=True)
class ConceptSequences:
    """Each concept's whole encoded sequence, for context embedders that take sequences, not vectors.

    HunyuanVideo's context embedder is a token refiner that self-attends over a prompt (with its
    mask) and takes the timestep: each concept's sequence goes through it on its own at every
    traced forward, and the concept's span is pooled afterwards.

    Attributes:
        states: (C, S, D_text) encoder states of each concept's own sequence, right-padded to the longest.
        mask: (C, S) 1 at the valid tokens of each sequence, 0 at padding.
        spans: (start, stop) of each concept's own sub-tokens in its sequence.
        pooling: how a span is pooled into one vector.
    """

    states: torch.Tensor
    mask: torch.Tensor
    spans: tuple[tuple[int, int], ...]
    pooling: Pooling

    def to(self, device: torch.device, dtype: torch.dtype) -> ConceptSequences:
        """States and mask on ``device`` in ``dtype`` (as a pipeline hands its prompt to the transformer)."""
        return replace(self, states=self.states.to(device, dtype), mask=self.mask.to(device, dtype))

    def span_mask(self) -> torch.Tensor:
        """(C, S) bool, True at each concept's own sub-tokens, on the states' device."""
        keep = torch.zeros(self.mask.shape, dtype=torch.bool)
        for row, (start, stop) in enumerate(self.spans):
            keep[row, start:stop] = True
        return keep.to(self.states.device)

    def pool(self, refined: torch.Tensor) -> torch.Tensor:
        """(..., C, S, D) states of these sequences -> (..., C, D), each concept's span pooled."""
        keep = self.span_mask()
        if self.pooling == "first":
            first = torch.tensor([start for start, _ in self.spans], device=refined.device)
            return refined[..., torch.arange(len(self.spans), device=refined.device), first, :]
        weights = keep.to(refined.dtype).unsqueeze(-1)  # (C, S, 1)
        return (refined * weights).sum(dim=-2) / weights.sum(dim=-2)


def _stream_qkv(attn: Any, states: torch.Tensor, added: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, S, H, D) q, k, v of the video (``added=False``) or text stream, QK-normed, as the stock processor."""
    query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in projections(attn, states, added))
    norm_q, norm_k = (attn.norm_added_q, attn.norm_added_k) if added else (attn.norm_q, attn.norm_k)
    return apply_norm(norm_q, query), apply_norm(norm_k, key), value


class HunyuanVideoConceptAttnProcessor(ConceptProcessor):
    """Stock ``HunyuanVideoAttnProcessor2_0`` (its dual-stream path) plus the concept rows of one block.

    The video and text outputs come from the same operations in the same order as the stock
    processor, so they are bit-identical to an untraced run. Installed on traced double blocks only.
    """

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if attn.add_q_proj is None or encoder_hidden_states is None:
            raise ConceptAttentionError("The ConceptAttention processor serves HunyuanVideo's dual-stream blocks only")
        # 1. Video q/k/v, QK-norm, RoPE (video only)
        query, key, value = _stream_qkv(attn, hidden_states, added=False)  # (B, N, H, D)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)  # type: ignore[arg-type,assignment]
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)  # type: ignore[arg-type,assignment]
        # 2. Text q/k/v and QK-norm
        text_query, text_key, text_value = _stream_qkv(attn, encoder_hidden_states, added=True)  # (B, T, H, D)
        video_qkv = (query, key, value)
        query = torch.cat([query, text_query], dim=1)  # (B, N + T, H, D)
        key = torch.cat([key, text_key], dim=1)
        value = torch.cat([value, text_value], dim=1)
        # 3. Joint attention with the text mask
        joint = self.joint_attention(query, key, value, attention_mask)  # (B, N + T, H * D)
        text_len = encoder_hidden_states.shape[1]
        video_out, text_out = joint[:, :-text_len], joint[:, -text_len:]

        if self.stream.runs(self.block_index):
            # Video q/k/v reused from the real pass (after QK-norm and RoPE): no second projection.
            q_x, k_x, v_x = (t.transpose(1, 2) for t in video_qkv)  # (B, H, N, D)
            self.stream.concept_rows(self.block_index, q_x, k_x, v_x, video_out)

        # 4. Output projections, as the stock processor
        if getattr(attn, "to_out", None) is not None:
            video_out = attn.to_out[0](video_out)
            video_out = attn.to_out[1](video_out)
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return video_out, text_out


class HunyuanVideoSingleConceptAttnProcessor(ConceptProcessor):
    """Stock ``HunyuanVideoAttnProcessor2_0`` (its single-stream path: shared weights over [video; text]) plus the
    concept rows of one block.

    The same operations in the same order as the stock processor (RoPE on the video tokens only, the
    text mask), so the block's outputs are bit-identical to an untraced run.
    """

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if attn.add_q_proj is not None or encoder_hidden_states is None:
            raise ConceptAttentionError("The single-stream processor serves HunyuanVideo's single-stream blocks only")
        text_len = encoder_hidden_states.shape[1]
        joint = torch.cat([hidden_states, encoder_hidden_states], dim=1)  # (B, N + T, D)
        query, key, value = _stream_qkv(attn, joint, added=False)  # (B, N + T, H, D)
        if image_rotary_emb is not None:  # video tokens only
            rotary: Any = image_rotary_emb
            video_q = apply_rotary_emb(query[:, :-text_len], rotary, sequence_dim=1)
            video_k = apply_rotary_emb(key[:, :-text_len], rotary, sequence_dim=1)
            query = torch.cat([video_q, query[:, -text_len:]], dim=1)  # type: ignore[list-item]
            key = torch.cat([video_k, key[:, -text_len:]], dim=1)  # type: ignore[list-item]
        out = self.joint_attention(query, key, value, attention_mask)  # (B, N + T, H * D)
        video_out, text_out = out[:, :-text_len], out[:, -text_len:]
        if self.stream.runs(self.block_index):
            q_x, k_x, v_x = (t[:, :-text_len].transpose(1, 2) for t in (query, key, value))  # (B, H, N, D)
            self.stream.concept_rows(self.block_index, q_x, k_x, v_x, video_out)
        return video_out, text_out


@dataclass
class HunyuanEncodeInputs(EncodeInputs):
    """Encode-mode conditioning: (B, T, D) Llama prompt states, (B, T) mask, (B, P) CLIP pooled, (B,) guidance."""

    prompt_embeds: torch.Tensor
    prompt_mask: torch.Tensor
    pooled: torch.Tensor
    guidance: torch.Tensor

    batched_fields = ("prompt_embeds", "prompt_mask", "pooled", "guidance")


def _call_default(pipe: Any, name: str, fallback: Any) -> Any:
    """The default of an argument of the pipeline's ``__call__``."""
    parameter = inspect.signature(type(pipe).__call__).parameters.get(name)
    return fallback if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


SPEC = BackendSpec(
    name="HunyuanVideo",
    transformer_classes=("HunyuanVideoTransformer3DModel",),
    pipeline_classes=("HunyuanVideoPipeline",),
    processor_classes=("HunyuanVideoAttnProcessor2_0",),
    concept_encoders=("llama",),
    default_layers="the later half of the double-stream blocks (10-19 of 0-19; single-stream blocks follow, "
    "so none is dead)",
    cfg_layout="separate",
    concept_positions="none (no RoPE on text)",
    max_sequence_length=256,
    modality="video",
    single_blocks="single_transformer_blocks",
    single_processor_classes=("HunyuanVideoAttnProcessor2_0",),
)


def check_install(transformer: Any, state: RunState) -> None:
    if transformer.config.image_condition_type == "token_replace":
        raise ConceptAttentionError(
            "This HunyuanVideo transformer replaces the first frame's tokens with an image (image_condition_type="
            "'token_replace', HunyuanVideo-I2V); ConceptAttention supports the text-to-video model "
            "(HunyuanVideoPipeline)"
        )
    if not isinstance(state.concepts.extras, ConceptSequences):
        raise ConceptAttentionError(
            "HunyuanVideo concepts must be encoded as whole sequences (for the token refiner); encode them with "
            "this backend's concept encoder"
        )


# -- concepts ---------------------------------------------------------------------------------
def encode_concepts(pipe: Any, concepts: Sequence[str], encoding: ConceptEncoding) -> ConceptEmbeddings:
    """Each concept alone in the pipeline's prompt template, through Llama as the pipeline encodes a prompt.

    The states of each concept's cropped sequence are kept whole (:class:`ConceptSequences`, padding
    beyond the longest concept trimmed): the token refiner runs on them at every traced forward.
    """
    why = "concepts are encoded with the Llama prompt encoder"
    tokenizer = pipeline_part(pipe, "tokenizer", why)
    encoder = pipeline_part(pipe, "text_encoder", why)
    words = concept_token_ids(concepts, tokenizer)  # checked before any encoder runs
    template, crop = PROMPT_TEMPLATE, CROP_START
    length = (encoding.max_sequence_length or SPEC.max_sequence_length) + crop
    texts = [template.format(c) for c in concepts]
    batch = tokenizer(texts, max_length=length, padding=True, truncation=True, return_tensors="pt")
    device = pipe._execution_device
    with torch.no_grad():
        hidden = encoder(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            output_hidden_states=True,
        ).hidden_states[-(SKIPPED_LAYERS + 1)]
    # As the pipeline: the template prefix dropped (right padding); then padding beyond the longest trimmed.
    mask = batch.attention_mask[:, crop:]
    longest = int(mask.sum(dim=1).max())
    mask, hidden, ids = (
        mask[:, :longest],
        hidden[:, crop : crop + longest],
        batch.input_ids[:, crop : crop + longest],
    )
    sequences = [row[valid.bool()].tolist() for row, valid in zip(ids, mask)]
    described = (
        f"llama (text_encoder, hidden_states[-{SKIPPED_LAYERS + 1}]), each concept alone in the HunyuanVideo "
        f"prompt template with the first {crop} tokens dropped as the pipeline does, then through the token "
        "refiner (context_embedder) as its own sequence at every traced step"
    )
    embeddings = pool_spans(hidden, sequences, words, tokenizer, encoding.pooling, described)
    spans = tuple((start, start + len(word)) for start, word in zip(span_starts(sequences, words), words))
    return replace(embeddings, extras=ConceptSequences(hidden, mask.to(device), spans, encoding.pooling))


def concept_sequences(concepts: ConceptEmbeddings, device: torch.device, dtype: torch.dtype) -> ConceptSequences:
    """Each concept's whole sequence (its ``extras``), for the token refiner."""
    sequences: ConceptSequences = concepts.extras
    return sequences.to(device, dtype)


def embed_concepts(transformer: Any, states: Any, record: ForwardRecord[HunyuanConditioning]) -> torch.Tensor:
    """Each concept's sequence through the token refiner with its own mask and the forward's timestep, pooled.

    Returns (C, D_model) when the rows share one timestep by construction (a timestep given once for the
    batch, as the pipeline and encode mode give it), else (B_rows, C, D_model). Decided from the call's
    tensor layout, never by reading the timesteps on the host.
    """
    sequences: ConceptSequences = states
    conditioning: HunyuanConditioning = record.conditioning
    timestep = conditioning.timestep[record.rows]  # (B_rows,)
    count = sequences.states.shape[0]
    if conditioning.shared_timestep:
        refined = transformer.context_embedder(sequences.states, timestep[:1].expand(count), sequences.mask)
        return sequences.pool(refined)  # (C, D)
    rows = timestep.shape[0]
    refined = transformer.context_embedder(
        sequences.states.repeat(rows, 1, 1), timestep.repeat_interleave(count), sequences.mask.repeat(rows, 1)
    )
    return sequences.pool(refined.unflatten(0, (rows, count)))  # (B_rows, C, D)


# -- forwards ---------------------------------------------------------------------------------
def read_forward(transformer: Any, inputs: Mapping[str, Any], batched_cfg: bool) -> ForwardRecord[HunyuanConditioning]:
    latents = inputs["hidden_states"]  # (B, c, F', H', W')
    config = transformer.config
    patch, patch_t = int(config.patch_size), int(config.patch_size_t)
    frames = latents.shape[2] // patch_t
    grid = TokenGrid(latents.shape[-2] // patch, latents.shape[-1] // patch, frames, video=True)
    given = torch.as_tensor(inputs["timestep"], device=latents.device)
    # A timestep given once for the batch (a number, or a tensor expanded over it): every row shares it, known
    # without reading it on the host.
    shared = given.numel() == 1 or all(stride == 0 for stride in given.stride())
    timestep = given.flatten().expand(latents.shape[0])
    conditioning = HunyuanConditioning(timestep, inputs.get("guidance"), inputs["pooled_projections"], shared)
    return ForwardRecord(timestep[0], 1000.0, grid, slice(None), conditioning)


def concept_conditioning(
    transformer: Any, record: ForwardRecord[HunyuanConditioning], dtype: torch.dtype
) -> torch.Tensor:
    """Timestep + guidance embedding with a zero pooled-CLIP input: nothing from the prompt."""
    inputs: HunyuanConditioning = record.conditioning
    rows = record.rows
    guidance = None if inputs.guidance is None else inputs.guidance[rows]
    zeros = torch.zeros_like(inputs.pooled[rows])
    return transformer.time_text_embed(inputs.timestep[rows], zeros, guidance=guidance)[0]


# -- video ------------------------------------------------------------------------------------
class HunyuanVideoFrames(VideoFacts):
    def frame_layout(self, pipe: Any) -> tuple[int, int]:
        return int(pipe.vae_scale_factor_temporal), int(pipe.transformer.config.patch_size_t)

    def default_num_frames(self, pipe: Any) -> int:
        """The pipeline's default ``num_frames`` (129), lowered to the nearest count encode mode takes."""
        r, p_t = self.frame_layout(pipe)
        count = int(_call_default(pipe, "num_frames", 129))
        while count > 1 and not ((count - 1) % r == 0 and ((count - 1) // r + 1) % p_t == 0):
            count -= 1
        return count

    def fps(self, pipe: Any) -> float:
        """24 frames/s: HunyuanVideo's 129 default frames are about 5 s of video."""
        return 24.0


# -- encode mode ------------------------------------------------------------------------------
class HunyuanVideoEncode(EncodeRecipe[HunyuanEncodeInputs]):
    def default_size(self, pipe: Any) -> tuple[int, int]:
        """The pipeline's default (height, width): (720, 1280)."""
        return int(_call_default(pipe, "height", 720)), int(_call_default(pipe, "width", 1280))

    def pixels_per_token(self, pipe: Any) -> int:
        return int(pipe.vae_scale_factor_spatial) * int(pipe.transformer.config.patch_size)

    def inputs(
        self, pipe: Any, pixels: torch.Tensor, caption: str, guidance_scale: float | None, max_sequence_length: int
    ) -> HunyuanEncodeInputs:
        """(B, c, F', H', W') VAE-mode latents x scaling factor, as the pipeline's; the caption as its prompt."""
        transformer, vae = pipe.transformer, pipe.vae
        if transformer.config.in_channels != vae.config.latent_channels:
            raise ConceptAttentionError(
                f"This HunyuanVideo transformer takes {transformer.config.in_channels} input channels (an "
                "image-to-video model); encode mode runs the text-to-video model (HunyuanVideoPipeline)"
            )
        device = pipe._execution_device
        latents = vae.encode(pixels.to(device, vae.dtype)).latent_dist.mode() * vae.config.scaling_factor
        latents = latents.to(transformer.dtype)
        batch = latents.shape[0]
        prompt_embeds, pooled, mask = pipe.encode_prompt(
            prompt=[caption] * batch, device=device, max_sequence_length=max_sequence_length
        )
        guidance_scale = float(_call_default(pipe, "guidance_scale", 6.0)) if guidance_scale is None else guidance_scale
        guidance = torch.full((batch,), float(guidance_scale), device=device, dtype=transformer.dtype) * 1000.0
        return HunyuanEncodeInputs(
            latents=latents,
            guidance_scale=guidance_scale if transformer.config.guidance_embeds else None,
            prompt_embeds=prompt_embeds.to(transformer.dtype),
            prompt_mask=mask.to(transformer.dtype),
            pooled=pooled.to(transformer.dtype),
            guidance=guidance,
        )

    def forward(self, pipe: Any, inputs: HunyuanEncodeInputs, noisy_latents: torch.Tensor, t: float) -> None:
        """One forward as the pipeline's: timestep on the 0-1000 scale (float32), guidance x 1000."""
        batch = noisy_latents.shape[0]
        # One timestep for the batch, expanded as the pipeline expands it (rows then share the refiner pass).
        timestep = torch.full((1,), float(t) * 1000, device=noisy_latents.device, dtype=torch.float32).expand(batch)
        pipe.transformer(
            hidden_states=noisy_latents.to(pipe.transformer.dtype),
            timestep=timestep,
            encoder_hidden_states=inputs.prompt_embeds,
            encoder_attention_mask=inputs.prompt_mask,
            pooled_projections=inputs.pooled,
            guidance=inputs.guidance,
            return_dict=False,
        )


BACKEND: Backend[HunyuanEncodeInputs, HunyuanConditioning] = Backend(
    spec=SPEC,
    # No dead double block in the released model (40 single blocks follow).
    layers=LayerRule(default=later_half, excluded=dead_last_double_block),
    concepts=encode_concepts,
    reader=read_forward,
    stream=JointPath(
        HunyuanVideoConceptAttnProcessor,
        forward_conditioning=concept_conditioning,
        concept_inputs=concept_sequences,
        embed=embed_concepts,
        check=check_install,
        single=SinglePath(HunyuanVideoSingleConceptAttnProcessor, clip=False),
    ),
    encoding=HunyuanVideoEncode(),
    video=HunyuanVideoFrames(),
)
