"""Tiny, randomly initialised Qwen-Image pipelines for tests (built in code, no network).

Text side from :mod:`tiny_text_encoders`: a real ``Qwen2Tokenizer`` whose vocabulary is trained
on the prompt template (so the system prefix is the 34 tokens the pipeline drops) and a 2-layer
``Qwen2_5_VLForConditionalGeneration``.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
from tiny_common import cast
from tiny_text_encoders import QWEN_SPECIAL, TEXT_HIDDEN, make_bpe_tokenizer, make_qwen25vl_encoder

from conceptattention.adapters.qwenimage import PROMPT_TEMPLATE
from conceptattention.bundled.components import BASE_WORDS, make_scheduler, seeded

LATENT_CHANNELS = 4


def make_qwen_tokenizer():
    return make_bpe_tokenizer([PROMPT_TEMPLATE.format(" ".join(BASE_WORDS))], QWEN_SPECIAL[:3])


def make_qwen_vae(seed: int = 0) -> AutoencoderKLQwenImage:
    return seeded(
        seed,
        lambda: AutoencoderKLQwenImage(
            base_dim=8,
            z_dim=LATENT_CHANNELS,
            dim_mult=[1, 2],
            num_res_blocks=1,
            temperal_downsample=[False],  # spatial scale 2: sizes multiple of 4
            latents_mean=[0.1, -0.2, 0.3, 0.0],
            latents_std=[1.5, 0.8, 1.2, 1.0],
        ),
    ).eval()


def make_tiny_qwenimage_transformer(
    *, seed: int = 0, num_layers: int = 4, num_attention_heads: int = 2, attention_head_dim: int = 16, **extra
) -> QwenImageTransformer2DModel:
    return seeded(
        seed,
        lambda: QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=4 * LATENT_CHANNELS,
            out_channels=LATENT_CHANNELS,
            num_layers=num_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=TEXT_HIDDEN,
            axes_dims_rope=(4, 6, 6),
            **extra,
        ),
    ).eval()



def make_tiny_qwenimage_pipeline(*, seed: int = 0, dtype: torch.dtype = torch.float32, **sizes) -> QwenImagePipeline:
    """A complete QwenImagePipeline of tiny seeded random parts (VAE scale 2: sizes multiple of 4)."""
    tokenizer = make_qwen_tokenizer()
    pipe = QwenImagePipeline(
        scheduler=make_scheduler(),
        vae=cast(make_qwen_vae(seed + 1), dtype),
        text_encoder=cast(make_qwen25vl_encoder(tokenizer, seed + 2), dtype),
        tokenizer=tokenizer,
        transformer=cast(make_tiny_qwenimage_transformer(seed=seed, **sizes), dtype),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
