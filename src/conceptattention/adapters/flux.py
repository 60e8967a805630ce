"""Flux.1 adapter: concept stream through the text-stream weights of each double block.

Hooks installed on a stock ``FluxTransformer2DModel`` (no model code copied):

- a forward pre-hook on the transformer: decides whether this forward is traced and
  records its conditioning inputs;
- a forward pre-hook on each double block up to the last selected one: builds the concept
  stream (first block) and modulates it with ``norm1_context``;
- :class:`FluxConceptAttnProcessor` on those blocks: the stock joint attention, unchanged,
  plus the C concept query rows and the block's saliency;
- a forward post-hook on those blocks: the concept residual update (``to_add_out``, gates,
  ``norm2_context``, ``ff_context``), exactly as the text stream is updated.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from conceptattention.adapters.base import ArchitectureSpec, StopForward, TraceState, argument
from conceptattention.core import block_saliency, concept_attention
from conceptattention.errors import ConceptAttentionError

FLUX_SPEC = ArchitectureSpec(
    name="Flux.1",
    transformer_class="FluxTransformer2DModel",
    double_blocks="transformer_blocks",
    concept_tokenizer="tokenizer_2",
    concept_encoder="text_encoder_2",
    default_num_layers=10,
    joint_order=("text", "image"),
    layout="BSHD",
    latent_patch=2,
)


def _projections(attn, hidden_states: torch.Tensor, added: bool) -> tuple[torch.Tensor, ...]:
    """q, k, v of the image stream (``added=False``) or the text stream (``added=True``)."""
    if getattr(attn, "fused_projections", False):
        fused = attn.to_added_qkv if added else attn.to_qkv
        return tuple(fused(hidden_states).chunk(3, dim=-1))
    if added:
        return attn.add_q_proj(hidden_states), attn.add_k_proj(hidden_states), attn.add_v_proj(hidden_states)
    return attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)


class FluxConceptAttnProcessor:
    """Stock Flux joint attention plus the one-way concept attention of one double block.

    The image and text outputs are computed with the same operations, in the same order,
    as diffusers' ``FluxAttnProcessor``, so they are bit-identical to an untraced run.
    Returns exactly the two tensors the stock processor returns.
    """

    def __init__(self, block_index: int, state: TraceState, original: Any) -> None:
        self.block_index = block_index
        self.state = state
        # Keep whatever attention backend / parallel config the user selected on the original.
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        query, key, value = _projections(attn, hidden_states, added=False)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))  # (B, N, H, D)
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))

        text_query, text_key, text_value = _projections(attn, encoder_hidden_states, added=True)
        text_query = attn.norm_added_q(text_query.unflatten(-1, (-1, attn.head_dim)))  # (B, T, H, D)
        text_key = attn.norm_added_k(text_key.unflatten(-1, (-1, attn.head_dim)))
        text_value = text_value.unflatten(-1, (-1, attn.head_dim))

        query = torch.cat([text_query, query], dim=1)  # (B, T + N, H, D)
        key = torch.cat([text_key, key], dim=1)
        value = torch.cat([text_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        joint = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        joint = joint.flatten(2, 3).to(query.dtype)  # (B, T + N, H * D)
        text_len = encoder_hidden_states.shape[1]
        text_out, image_out = joint.split_with_sizes([text_len, joint.shape[1] - text_len], dim=1)

        if self.state.runs_block(self.block_index):
            # Image q/k/v are reused from the real pass (after QK-norm and RoPE): no second projection.
            self._concept_attention(attn, query[:, text_len:], key[:, text_len:], value[:, text_len:], image_out)

        image_out = attn.to_out[0](image_out.contiguous())
        image_out = attn.to_out[1](image_out)
        text_out = attn.to_add_out(text_out.contiguous())
        return image_out, text_out

    def _concept_attention(
        self,
        attn,
        q_x: torch.Tensor,
        k_x: torch.Tensor,
        v_x: torch.Tensor,
        o_x: torch.Tensor,
    ) -> None:
        """Concept rows of the block; stores o_c for the post-hook and adds the block's saliency.

        Args:
            q_x, k_x, v_x: (B, N, H, D) image queries, keys, values of the real pass.
            o_x: (B, N, H * D) image attention output before ``to_out``.
        """
        state = self.state
        config = state.config
        normed = state.block_cache["normed_concepts"]  # (B, C, D_model)
        q_c, k_c, v_c = _projections(attn, normed, added=True)
        q_c = attn.norm_added_q(q_c.unflatten(-1, (-1, attn.head_dim))).transpose(1, 2)  # (B, H, C, D)
        k_c = attn.norm_added_k(k_c.unflatten(-1, (-1, attn.head_dim))).transpose(1, 2)
        v_c = v_c.unflatten(-1, (-1, attn.head_dim)).transpose(1, 2)
        # Flux gives text (and so concept) tokens position id 0: RoPE is the identity on them.
        q_x, k_x, v_x = (t.transpose(1, 2) for t in (q_x, k_x, v_x))  # (B, H, N, D)
        if config.score_space == "value":
            o_c = v_c  # value-space ablation: the concept "attention output" is its value
        else:
            o_c = concept_attention(q_c, k_c, v_c, k_x, v_x, keys=config.concept_keys)  # (B, H, C, D)
        o_c = o_c.transpose(1, 2).flatten(2).to(o_x.dtype)  # (B, C, H * D)
        state.block_cache["concept_attn_out"] = o_c
        if self.block_index in state.accumulator.blocks:
            saliency = block_saliency(
                config.score_space, o_c=o_c, o_x=o_x, q_x=q_x, k_c=k_c, v_c=v_c, v_x=v_x, softmax=state.softmax
            )  # (B, C, N)
            state.accumulator.add(saliency, self.block_index)


def _start_concept_stream(transformer, state: TraceState, hidden_states: torch.Tensor) -> None:
    """Concept tokens and their conditioning for the current forward (run at the first block).

    Done here rather than in the transformer pre-hook so that offloading hooks have already
    moved the weights to the execution device.
    """
    inputs = state.forward_inputs
    batch = hidden_states.shape[0]
    dtype = hidden_states.dtype
    concepts = transformer.context_embedder(state.concept_states.to(hidden_states.device, dtype))  # (C, D_model)
    state.concept_hidden = concepts.unsqueeze(0).expand(batch, -1, -1)  # (B, C, D_model)
    timestep = inputs["timestep"].to(dtype) * 1000
    pooled = inputs["pooled_projections"]
    # Concept conditioning: timestep (+ guidance) embedding with a zero pooled-text input.
    zeros = torch.zeros_like(pooled)
    guidance = inputs.get("guidance")
    if guidance is None:
        temb = transformer.time_text_embed(timestep, zeros)
    else:
        temb = transformer.time_text_embed(timestep, guidance.to(dtype) * 1000, zeros)
    state.concept_temb = temb  # (B, D_model)


def _make_block_pre_hook(transformer, state: TraceState, index: int):
    def pre_hook(block, args, kwargs):
        if not state.runs_block(index):
            return None
        if index == 0 or state.concept_hidden is None:
            _start_concept_stream(transformer, state, argument(args, kwargs, "hidden_states", 0))
        normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(
            state.concept_hidden, emb=state.concept_temb
        )
        state.block_cache.update(
            normed_concepts=normed, gate_msa=gate_msa, shift_mlp=shift_mlp, scale_mlp=scale_mlp, gate_mlp=gate_mlp
        )
        return None

    return pre_hook


def _make_block_post_hook(state: TraceState, index: int):
    def post_hook(block, args, kwargs, output):
        if not state.runs_block(index):
            return None
        cache = state.block_cache
        concepts = state.concept_hidden
        attn_update = block.attn.to_add_out(cache.pop("concept_attn_out"))  # (B, C, D_model)
        concepts = concepts + cache["gate_msa"].unsqueeze(1) * attn_update
        normed = block.norm2_context(concepts) * (1 + cache["scale_mlp"][:, None]) + cache["shift_mlp"][:, None]
        concepts = concepts + cache["gate_mlp"].unsqueeze(1) * block.ff_context(normed)
        if concepts.dtype == torch.float16:
            concepts = concepts.clip(-65504, 65504)
        state.concept_hidden = concepts
        cache.clear()
        if index == state.last_block and state.stop_after_last_block:
            raise StopForward
        return None

    return post_hook


def install_flux(transformer, state: TraceState, stack: contextlib.ExitStack, on_forward_start) -> None:
    """Install processors and hooks on the double blocks 0..last selected block.

    Args:
        transformer: a ``FluxTransformer2DModel``.
        state: the session's state.
        stack: the undo stack of this attach.
        on_forward_start: ``callable(transformer, args, kwargs)`` run before each transformer forward.
    """
    originals = transformer.attn_processors
    processors = dict(originals)
    for index in range(state.last_block + 1):
        name = f"{FLUX_SPEC.double_blocks}.{index}.attn.processor"
        if not isinstance(originals[name], FluxAttnProcessor):
            raise ConceptAttentionError(
                f"`{name}` is a {type(originals[name]).__name__}; ConceptAttention replaces only the stock "
                "FluxAttnProcessor (IP-Adapter and custom processors are not supported). Restore it with "
                "`transformer.set_attn_processor(FluxAttnProcessor())` or unload the adapter first."
            )
        processors[name] = FluxConceptAttnProcessor(index, state, originals[name])
    transformer.set_attn_processor(processors)
    stack.callback(transformer.register_forward_pre_hook(on_forward_start, with_kwargs=True, prepend=True).remove)
    blocks = getattr(transformer, FLUX_SPEC.double_blocks)
    for index in range(state.last_block + 1):
        block = blocks[index]
        stack.callback(
            block.register_forward_pre_hook(_make_block_pre_hook(transformer, state, index), with_kwargs=True).remove
        )
        stack.callback(block.register_forward_hook(_make_block_post_hook(state, index), with_kwargs=True).remove)


# -- encode mode (real images) ------------------------------------------------------------------


def flux_encode_inputs(
    pipe, pixels: torch.Tensor, caption: str, guidance_scale: float, max_sequence_length: int
) -> dict[str, Any]:
    """Clean latents and conditioning for encoding real images with a Flux pipeline.

    Args:
        pipe: a ``FluxPipeline``.
        pixels: (B, 3, height, width) float in [-1, 1].

    Returns:
        ``latents`` (B, c, 2h, 2w) scaled clean latents, and the transformer kwargs
        (prompt embeddings, pooled projections, ids, guidance).
    """
    device = pipe._execution_device
    vae = pipe.vae
    batch = pixels.shape[0]
    latents = vae.encode(pixels.to(device, vae.dtype)).latent_dist.mode()  # (B, c, 2h, 2w)
    latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
    prompt_embeds, pooled, text_ids = pipe.encode_prompt(
        prompt=[caption] * batch, prompt_2=None, device=device, max_sequence_length=max_sequence_length
    )
    dtype = pipe.transformer.dtype
    height, width = latents.shape[-2:]
    guidance = None
    if pipe.transformer.config.guidance_embeds:
        guidance = torch.full((batch,), float(guidance_scale), device=device, dtype=torch.float32)
    return {
        "latents": latents.to(dtype),
        "forward": {
            "encoder_hidden_states": prompt_embeds.to(dtype),
            "pooled_projections": pooled.to(dtype),
            "txt_ids": text_ids,
            "img_ids": pipe._prepare_latent_image_ids(batch, height // 2, width // 2, device, dtype),
            "guidance": guidance,
        },
    }


def flux_encode_forward(pipe, inputs: dict[str, Any], noisy_latents: torch.Tensor, t: float) -> None:
    """One transformer forward on noisy latents (B, c, 2h, 2w) at flow-matching time ``t``."""
    batch, channels, height, width = noisy_latents.shape
    packed = pipe._pack_latents(noisy_latents, batch, channels, height, width)  # (B, N, 4c)
    timestep = torch.full((batch,), float(t), device=packed.device, dtype=packed.dtype)
    pipe.transformer(hidden_states=packed, timestep=timestep, return_dict=False, **inputs["forward"])
