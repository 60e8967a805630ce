"""Tiny, randomly initialised Chroma pipelines for tests (built in code, no network).

Same recipe as :mod:`tiny_flux` (parts from :mod:`conceptattention.bundled.components`, one
derived seed per part); Chroma has one text encoder (T5) and a small distilled-guidance network.
"""

from __future__ import annotations

import torch
from diffusers import ChromaPipeline, ChromaTransformer2DModel
from tiny_common import cast

from conceptattention.bundled.components import (
    make_scheduler,
    make_t5_encoder,
    make_t5_tokenizer,
    make_vae,
    rope_axes_for_head_dim,
    seeded,
)

TEXT_HIDDEN = 32
LATENT_CHANNELS = 4



def make_tiny_chroma_transformer(
    *,
    seed: int = 0,
    num_layers: int = 3,
    num_single_layers: int = 1,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    dtype: torch.dtype = torch.float32,
) -> ChromaTransformer2DModel:
    model = seeded(
        seed,
        lambda: ChromaTransformer2DModel(
            patch_size=1,
            in_channels=4 * LATENT_CHANNELS,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=TEXT_HIDDEN,
            axes_dims_rope=rope_axes_for_head_dim(attention_head_dim),
            approximator_num_channels=8,
            approximator_hidden_dim=16,
            approximator_layers=1,
        ),
    ).eval()
    return cast(model, dtype)


def make_tiny_chroma_pipeline(*, seed: int = 0, dtype: torch.dtype = torch.float32, **sizes) -> ChromaPipeline:
    """A complete ChromaPipeline of tiny seeded random parts (VAE scale 2: sizes multiple of 4)."""
    tokenizer = make_t5_tokenizer()
    pipe = ChromaPipeline(
        scheduler=make_scheduler(),
        vae=cast(make_vae((8, 16), LATENT_CHANNELS, seed=seed + 1), dtype),
        text_encoder=cast(make_t5_encoder(tokenizer, TEXT_HIDDEN, seed=seed + 3), dtype),
        tokenizer=tokenizer,
        transformer=make_tiny_chroma_transformer(seed=seed, dtype=dtype, **sizes),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
