"""Tiny, randomly initialised Flux pipelines for tests (built in code, no network).

The parts come from :mod:`conceptattention.bundled.components`; this module only fixes
test sizes and seeds. Each part gets its own derived seed, so changing the
transformer's size leaves the VAE and text encoders identical.
"""

from __future__ import annotations

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from tiny_common import cast

from conceptattention.bundled.components import (
    assemble_pipeline,
    make_clip_encoder,
    make_clip_tokenizer,
    make_scheduler,
    make_t5_encoder,
    make_t5_tokenizer,
    make_transformer,
    make_vae,
)

TEXT_HIDDEN = 32
LATENT_CHANNELS = 4



def make_tiny_flux_transformer(
    *,
    seed: int = 0,
    num_layers: int = 3,
    num_single_layers: int = 1,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    guidance_embeds: bool = False,
    dtype: torch.dtype = torch.float32,
) -> FluxTransformer2DModel:
    model = make_transformer(
        latent_channels=LATENT_CHANNELS,
        text_dim=TEXT_HIDDEN,
        pooled_dim=TEXT_HIDDEN,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        guidance_embeds=guidance_embeds,
        seed=seed,
    )
    return cast(model, dtype)


def make_tiny_flux_pipeline(*, seed: int = 0, dtype: torch.dtype = torch.float32, **transformer_sizes) -> FluxPipeline:
    """A complete FluxPipeline of tiny seeded random parts (VAE scale 2: sizes multiple of 4)."""
    transformer = make_tiny_flux_transformer(seed=seed, dtype=dtype, **transformer_sizes)
    vae = cast(make_vae((8, 16), LATENT_CHANNELS, seed=seed + 1), dtype)
    tokenizer = make_clip_tokenizer()
    tokenizer_2 = make_t5_tokenizer()
    text_encoder = cast(make_clip_encoder(tokenizer, TEXT_HIDDEN, seed=seed + 2), dtype)
    text_encoder_2 = cast(make_t5_encoder(tokenizer_2, TEXT_HIDDEN, seed=seed + 3), dtype)
    return assemble_pipeline(transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, make_scheduler())
