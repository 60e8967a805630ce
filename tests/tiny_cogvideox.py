"""Tiny, randomly initialised CogVideoX pipelines for tests (built in code, no network).

Two layouts, as the released models:

- ``version="1.0"`` (CogVideoX-2B style): no RoPE, sin-cos positional embeddings added to
  [text; video] (zeros on text), patch 1 here, one latent frame per token frame.
- ``version="1.5"`` (CogVideoX-1.5 / 5B style): 3-D RoPE on video tokens, patch 2 and
  ``patch_size_t=2`` (two latent frames per token frame).

The VAE has three blocks: space / 4 and time / 4 (a causal VAE: 4k + 1 frames -> k + 1
latent frames), so a 5-frame 32 x 48 video has 2 latent frames of 8 x 12. The T5 encoder is
the project's tiny T5 (hidden 32); the prompt budget is the transformer's
``max_text_seq_length`` (16 here; 226 in the released models).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel
from tiny_common import cast

from conceptattention.bundled.components import make_t5_encoder, make_t5_tokenizer, seeded

LATENT_CHANNELS = 4
T5_HIDDEN = 32
MAX_TEXT = 16


def make_tiny_cogvideox_transformer(
    *,
    seed: int = 0,
    num_layers: int = 3,
    version: str = "1.0",
    dtype: torch.dtype = torch.float32,
    in_channels: int = LATENT_CHANNELS,
    **extra,
) -> CogVideoXTransformer3DModel:
    """``in_channels=2 * LATENT_CHANNELS`` (+ ``ofs_embed_dim`` for 1.5) is an image-to-video layout."""
    layout = (
        {"patch_size": 1, "use_rotary_positional_embeddings": False}
        if version == "1.0"
        else {"patch_size": 2, "patch_size_t": 2, "use_rotary_positional_embeddings": True}
    )
    model = seeded(
        seed,
        lambda: CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=in_channels,
            out_channels=LATENT_CHANNELS,
            time_embed_dim=8,
            text_embed_dim=T5_HIDDEN,
            num_layers=num_layers,
            sample_width=16,  # latent pixels: 1.5's RoPE covers at most 64 x 64 px here
            sample_height=16,
            sample_frames=9,  # 3 latent frames: the causal VAE decodes an odd latent count to 4k + 1 frames
            max_text_seq_length=MAX_TEXT,
            norm_eps=1e-5,
            **layout,
            **extra,
        ),
    ).eval()
    return cast(model, dtype)


def make_tiny_cogvideox_vae(seed: int = 1) -> AutoencoderKLCogVideoX:
    return seeded(
        seed,
        lambda: AutoencoderKLCogVideoX(
            block_out_channels=(8, 8, 16),
            down_block_types=("CogVideoXDownBlock3D",) * 3,
            up_block_types=("CogVideoXUpBlock3D",) * 3,
            latent_channels=LATENT_CHANNELS,
            layers_per_block=1,
            norm_num_groups=2,
            temporal_compression_ratio=4,
        ),
    ).eval()


def make_tiny_cogvideox_pipeline(
    *, seed: int = 0, dtype: torch.dtype = torch.float32, with_text_encoder: bool = True, **transformer_sizes
) -> CogVideoXPipeline:
    """A complete CogVideoXPipeline of tiny seeded random parts (sizes multiple of 4, or 8 for version 1.5)."""
    transformer = make_tiny_cogvideox_transformer(seed=seed, dtype=dtype, **transformer_sizes)
    tokenizer = make_t5_tokenizer(model_max_length=MAX_TEXT)
    text_encoder = cast(make_t5_encoder(tokenizer, T5_HIDDEN, seed=seed + 2), dtype) if with_text_encoder else None
    scheduler = CogVideoXDDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        set_alpha_to_one=True,
        snr_shift_scale=3.0,
        timestep_spacing="trailing",
    )
    return CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=cast(make_tiny_cogvideox_vae(seed + 1), dtype),
        transformer=transformer,
        scheduler=scheduler,
    )
