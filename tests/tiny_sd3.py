"""Tiny, randomly initialised SD3 / SD3.5 pipelines for tests (built in code, no network).

Same recipe as :mod:`tiny_flux`: parts from :mod:`conceptattention.bundled.components`, one
derived seed per part. SD3's text side: CLIP-L and CLIP-G (hidden 16 + 16, projections
8 + 8 = the pooled width 16) and T5 (width 48 = ``joint_attention_dim``, wider than the
CLIP concatenation so the pipeline's zero padding is exercised).
"""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from tiny_common import cast

from conceptattention.bundled.components import (
    make_clip_encoder,
    make_clip_tokenizer,
    make_scheduler,
    make_t5_encoder,
    make_t5_tokenizer,
    make_vae,
    seeded,
)

LATENT_CHANNELS = 4
CLIP_HIDDEN, CLIP_PROJECTION, T5_HIDDEN = 16, 8, 48



def make_tiny_sd3_transformer(
    *,
    seed: int = 0,
    num_layers: int = 4,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    sd35: bool = False,
    dtype: torch.dtype = torch.float32,
) -> SD3Transformer2DModel:
    """SD3 layout; ``sd35=True`` adds RMS QK-norm and dual attention (``attn2``) on the first two blocks."""
    extra = {"qk_norm": "rms_norm", "dual_attention_layers": (0, 1)} if sd35 else {}
    model = seeded(
        seed,
        lambda: SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=LATENT_CHANNELS,
            out_channels=LATENT_CHANNELS,
            num_layers=num_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=T5_HIDDEN,
            caption_projection_dim=num_attention_heads * attention_head_dim,
            pooled_projection_dim=2 * CLIP_PROJECTION,
            pos_embed_max_size=32,
            **extra,
        ),
    ).eval()
    return cast(model, dtype)


def make_tiny_sd3_pipeline(
    *, seed: int = 0, dtype: torch.dtype = torch.float32, with_t5: bool = True, **transformer_sizes
) -> StableDiffusion3Pipeline:
    """A complete StableDiffusion3Pipeline of tiny seeded random parts (VAE scale 2: sizes multiple of 4)."""
    transformer = make_tiny_sd3_transformer(seed=seed, dtype=dtype, **transformer_sizes)
    vae = cast(make_vae((8, 16), LATENT_CHANNELS, scaling_factor=1.5305, shift_factor=0.0609, seed=seed + 1), dtype)
    tokenizer, tokenizer_2, tokenizer_3 = make_clip_tokenizer(), make_clip_tokenizer(), make_t5_tokenizer()
    text_encoder = cast(
        make_clip_encoder(tokenizer, CLIP_HIDDEN, seed=seed + 2, projection_dim=CLIP_PROJECTION), dtype
    )
    text_encoder_2 = cast(
        make_clip_encoder(tokenizer_2, CLIP_HIDDEN, seed=seed + 3, projection_dim=CLIP_PROJECTION), dtype
    )
    text_encoder_3 = cast(make_t5_encoder(tokenizer_3, T5_HIDDEN, seed=seed + 4), dtype) if with_t5 else None
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=make_scheduler(dynamic_shifting=False),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3 if with_t5 else None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
