"""CogVideoX backend (``CogVideoXTransformer3DModel``; CogVideoX 1.0 2B/5B and 1.5; text-, image- and video-to-video).

One attention and one feed-forward with *shared* weights over [text; video] (``attn1``,
``ff``); text and video differ only in their modulation slot of ``CogVideoXLayerNormZero``
(``norm1``/``norm2``: shift, scale, gate for video, then for text). Concepts therefore go
through the shared ``to_q``/``to_k``/``to_v``, LayerNorm QK-norm, ``to_out`` and ``ff`` with
the *text* slot, one way: they attend over [concepts; video] and nothing attends to them.
No RoPE on text (3-D RoPE on video tokens in 5B and 1.5); CogVideoX 1.0 2B adds sin-cos
positions (zeros on text). ``temb`` is the timestep (+ ``ofs`` for 1.5 I2V) only, so a block's
own ``temb`` is the concepts' conditioning. Classifier-free guidance is batched ([uncond;
cond]): maps describe the conditional half. Concepts: T5, each concept alone, padded to the
prompt budget without a mask exactly as the pipeline encodes a prompt; only the C concept
tokens are keys (no padding slots).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

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
    VideoFacts,
    first_timestep,
)
from conceptattention.adapters.joint import ConceptProcessor, JointPath, TextAttention
from conceptattention.concepts import ConceptEmbeddings, concept_token_ids, pipeline_part, pool_spans
from conceptattention.core import TokenGrid
from conceptattention.errors import ConceptAttentionError

NUM_TRAIN_TIMESTEPS = 1000  # CogVideoX's DDIM / DPM schedulers


class CogVideoXConceptAttnProcessor(ConceptProcessor):
    """Stock ``CogVideoXAttnProcessor2_0`` plus the concept rows of one block.

    Mirrors the stock processor op for op (one projection over [text; video], in-place RoPE on
    the video part, SDPA), so video and text outputs are bit-identical.
    """

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,  # (cos, sin) of the video tokens, or None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        text_length = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # (B, T + N, D)
        batch_size, sequence_length, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, T + N, D)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query[:, :, text_length:] = apply_rotary_emb(query[:, :, text_length:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_length:] = apply_rotary_emb(key[:, :, text_length:], image_rotary_emb)
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)

        if self.stream.runs(self.block_index):
            video = slice(text_length, None)  # the video q/k (after QK-norm and RoPE), v and output, as views
            q_x, k_x, v_x = query[:, :, video], key[:, :, video], value[:, :, video]
            self.stream.concept_rows(self.block_index, q_x, k_x, v_x, hidden_states[:, video])

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_length, hidden_states.size(1) - text_length], dim=1
        )
        return hidden_states, encoder_hidden_states


@dataclass
class CogVideoXEncodeInputs(EncodeInputs):
    """Encode-mode conditioning: (B, T, D) T5 prompt embeddings and the RoPE of the video grid (or None)."""

    prompt_embeds: torch.Tensor
    rotary: tuple[torch.Tensor, torch.Tensor] | None

    batched_fields = ("prompt_embeds",)


SPEC = BackendSpec(
    name="CogVideoX",
    transformer_classes=("CogVideoXTransformer3DModel",),
    pipeline_classes=("CogVideoXPipeline", "CogVideoXImageToVideoPipeline", "CogVideoXVideoToVideoPipeline"),
    processor_classes=("CogVideoXAttnProcessor2_0",),
    attention="attn1",
    concept_encoders=("t5",),
    default_layers="the later half of the blocks, without the last (whose text output the model discards)",
    cfg_layout="batched",
    concept_positions="none (no RoPE on text; CogVideoX 1.0's sin-cos positions are zero on text)",
    max_sequence_length=226,
    modality="video",
)


def later_half_but_last(usable: Sequence[int]) -> tuple[int, ...]:
    """The later half of the blocks without the last (all of them when there are two or fewer)."""
    count = len(usable)
    return tuple(usable[count // 2 : count - 1]) if count > 2 else tuple(usable)


# -- pipeline calls ---------------------------------------------------------------------------
def prompt_budget(pipe: Any) -> int:
    return int(pipe.transformer.config.max_text_seq_length)


def call_defaults(pipe: Any) -> dict[str, Any]:
    """The prompt budget the transformer was built for: its text positions assume it (the pipeline says 226)."""
    return {"max_sequence_length": prompt_budget(pipe)}


def batched_cfg(pipe: Any) -> bool:
    # The pipeline batches [uncond; cond] when `guidance_scale > 1` at the start of the call (it has no
    # `do_classifier_free_guidance` property); read at a run's first forward, before dynamic CFG changes it.
    return float(getattr(pipe, "_guidance_scale", 1.0) or 1.0) > 1.0


# -- concepts ---------------------------------------------------------------------------------
def encode_concepts(pipe: Any, concepts: Sequence[str], encoding: ConceptEncoding) -> ConceptEmbeddings:
    why = "concepts are encoded with the pipeline's T5 encoder"
    tokenizer = pipeline_part(pipe, "tokenizer", why)
    pipeline_part(pipe, "text_encoder", why)
    prompts = list(concepts)
    words = concept_token_ids(prompts, tokenizer)  # checked before the encoder runs
    length = encoding.max_sequence_length or prompt_budget(pipe)
    hidden = pipe._get_t5_prompt_embeds(prompt=prompts, max_sequence_length=length, device=pipe._execution_device)
    ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True).input_ids
    described = f"t5 (text_encoder), each concept alone, padded to {length} tokens (no mask), as the pipeline does"
    return pool_spans(hidden, ids, words, tokenizer, encoding.pooling, described)


# -- forwards and the shared-weight text path -------------------------------------------------
def read_forward(transformer: Any, inputs: Mapping[str, Any], batched_cfg: bool) -> ForwardRecord[None]:
    latents = inputs["hidden_states"]  # (B, F_latent, c, H', W')
    config = transformer.config
    patch, patch_t = int(config.patch_size), int(config.patch_size_t or 1)
    frames = -(-latents.shape[1] // patch_t)
    grid = TokenGrid(latents.shape[-2] // patch, latents.shape[-1] // patch, frames, video=True)
    rows = slice(latents.shape[0] // 2, None) if batched_cfg else slice(None)
    return ForwardRecord(first_timestep(inputs["timestep"]), float(NUM_TRAIN_TIMESTEPS), grid, rows, None)


def block_conditioning(record: ForwardRecord[None], arguments: CallArguments) -> torch.Tensor:
    """Each block's own ``temb``: the timestep embedding, nothing from the prompt."""
    return arguments["temb"][record.rows]


def embed_concepts(transformer: Any, states: torch.Tensor, record: ForwardRecord[None]) -> torch.Tensor:
    # As the prompt: `patch_embed.text_proj`; the positions added after it are zero on text.
    return transformer.patch_embed.text_proj(states)


def shared_attention(attn: Any) -> TextAttention:
    """The shared attention weights: concepts use the same q/k/v, QK-norm and output projection as video."""
    return TextAttention(
        lambda x: (attn.to_q(x), attn.to_k(x), attn.to_v(x)),
        attn.norm_q,
        attn.norm_k,
        lambda o: attn.to_out[1](attn.to_out[0](o)),
    )


def text_modulation(block: Any, hidden: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The text slots of ``norm1`` (attention) and ``norm2`` (feed-forward) applied to concepts."""
    _, _, _, shift, scale, gate = block.norm1.linear(block.norm1.silu(emb)).chunk(6, dim=1)
    _, _, _, shift_mlp, scale_mlp, gate_mlp = block.norm2.linear(block.norm2.silu(emb)).chunk(6, dim=1)
    normed = block.norm1.norm(hidden) * (1 + scale)[:, None] + shift[:, None]
    return normed, gate, shift_mlp, scale_mlp, gate_mlp


def text_feedforward(block: Any) -> tuple[Callable, Callable]:
    return block.norm2.norm, block.ff


# -- video ------------------------------------------------------------------------------------
class CogVideoXFrames(VideoFacts):
    def frame_layout(self, pipe: Any) -> tuple[int, int]:
        return int(pipe.vae_scale_factor_temporal), int(pipe.transformer.config.patch_size_t or 1)

    def fps(self, pipe: Any) -> float:
        """8 frames/s for CogVideoX 1.0 and 16 for 1.5 (``patch_size_t``), as the model cards export them."""
        return 16.0 if pipe.transformer.config.patch_size_t else 8.0

    def default_num_frames(self, pipe: Any) -> int:
        return int(pipe.transformer.config.sample_frames)

    def decoded_frames(self, pipe: Any, token_frames: int) -> int:
        """Decoded frames of a generated video; with ``patch_size_t`` the pipeline padded one latent frame at the
        start (odd latent counts, as the model's 8k + 1-frame videos have) and dropped it before decoding.
        """
        r, p_t = self.frame_layout(pipe)
        latent = token_frames * p_t - (1 if p_t > 1 else 0)
        return (latent - 1) * r + 1


# -- encode mode ------------------------------------------------------------------------------
def training_timestep(t: float) -> int:
    return min(NUM_TRAIN_TIMESTEPS - 1, round(float(t) * NUM_TRAIN_TIMESTEPS))


class CogVideoXEncode(EncodeRecipe[CogVideoXEncodeInputs]):
    def default_size(self, pipe: Any) -> tuple[int, int]:
        config, scale = pipe.transformer.config, int(pipe.vae_scale_factor_spatial)
        return int(config.sample_height) * scale, int(config.sample_width) * scale

    def pixels_per_token(self, pipe: Any) -> int:
        return int(pipe.vae_scale_factor_spatial) * int(pipe.transformer.config.patch_size)

    def inputs(
        self, pipe: Any, pixels: torch.Tensor, caption: str, guidance_scale: float | None, max_sequence_length: int
    ) -> CogVideoXEncodeInputs:
        transformer = pipe.transformer
        if transformer.config.in_channels != pipe.vae.config.latent_channels:
            raise ConceptAttentionError(
                f"This CogVideoX transformer takes {transformer.config.in_channels} input channels (an image-to-video "
                "model: video latents plus the conditioning image's); encode mode runs text-to-video models. Load the "
                "text-to-video checkpoint of the same family (e.g. THUDM/CogVideoX-5b) for `encode_video`"
            )
        vae = pipe.vae
        device = pipe._execution_device
        latents = vae.encode(pixels.to(device, vae.dtype)).latent_dist.mode()  # (B, c, F', H', W')
        latents = (latents * pipe.vae_scaling_factor_image).permute(0, 2, 1, 3, 4).to(transformer.dtype)
        patch_t = transformer.config.patch_size_t
        if patch_t is not None and latents.shape[1] % patch_t:
            # 1.5 patches latent frames in pairs: pad at the start with copies of the first latent frame, as the
            # image-to-video pipeline pads its image latents (text-to-video pads with noise it then discards).
            latents = torch.cat([latents[:, : patch_t - latents.shape[1] % patch_t], latents], dim=1)
        prompt_embeds, _ = pipe.encode_prompt(
            prompt=[caption] * latents.shape[0],
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
            device=device,
        )
        rotary = None
        if transformer.config.use_rotary_positional_embeddings:
            height, width = pixels.shape[-2:]
            rotary = pipe._prepare_rotary_positional_embeddings(height, width, latents.shape[1], device)
        return CogVideoXEncodeInputs(latents, None, prompt_embeds.to(latents.dtype), rotary)

    def noised(self, pipe: Any, clean: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
        """x_t at training timestep ``round(t * 1000)``: ``sqrt(a) x0 + sqrt(1 - a) eps`` (the scheduler's ``a``)."""
        alpha = float(pipe.scheduler.alphas_cumprod[training_timestep(t)])
        return alpha**0.5 * clean + (1 - alpha) ** 0.5 * noise

    def forward(self, pipe: Any, inputs: CogVideoXEncodeInputs, noisy_latents: torch.Tensor, t: float) -> None:
        batch = noisy_latents.shape[0]
        transformer = pipe.transformer
        timestep = torch.full((batch,), training_timestep(t), device=noisy_latents.device, dtype=torch.long)
        ofs = None if transformer.config.ofs_embed_dim is None else noisy_latents.new_full((1,), 2.0)
        transformer(
            hidden_states=noisy_latents,
            encoder_hidden_states=inputs.prompt_embeds,
            timestep=timestep,
            ofs=ofs,
            image_rotary_emb=inputs.rotary,
            return_dict=False,
        )


BACKEND: Backend[CogVideoXEncodeInputs, None] = Backend(
    spec=SPEC,
    layers=LayerRule(default=later_half_but_last),
    concepts=encode_concepts,
    reader=read_forward,
    stream=JointPath(
        CogVideoXConceptAttnProcessor,
        block_conditioning=block_conditioning,
        embed=embed_concepts,
        attention=shared_attention,
        modulation=text_modulation,
        feedforward=text_feedforward,
    ),
    encoding=CogVideoXEncode(),
    pipeline=PipelineFacts(batched_cfg=batched_cfg, max_sequence_length=prompt_budget, call_defaults=call_defaults),
    video=CogVideoXFrames(),
)
