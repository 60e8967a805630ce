"""Tiny, randomly initialised Flux.2 pipelines for tests (built in code, no network).

``Flux2KleinPipeline`` with a Qwen3 chat-template encoder (28 layers: Klein stacks hidden layers
9, 18, 27) and ``Flux2Pipeline`` (dev) with a Mistral-3 encoder (31 layers: dev stacks 10, 20, 30);
the tokenizers and chat templates come from :mod:`tiny_text_encoders`. The transformer's text width
is 3 x 32 (three stacked layers), RoPE axes (4, 4, 4, 4).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
from tiny_common import cast
from tiny_text_encoders import (
    MISTRAL_CHAT_TEMPLATE,
    MISTRAL_SPECIAL,
    QWEN3_CHAT_TEMPLATE,
    QWEN_SPECIAL,
    TEXT_HIDDEN,
    make_bpe_tokenizer,
    make_mistral3_encoder,
    make_qwen3_encoder,
)

from conceptattention.bundled.components import make_scheduler, seeded

LATENT_CHANNELS = 4
KLEIN_CORPUS = ("<|im_start|>user\nword<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",)
DEV_CORPUS = (f"[SYSTEM_PROMPT]{SYSTEM_MESSAGE}[/SYSTEM_PROMPT][INST]word[/INST]",)



def make_flux2_vae(seed: int = 0) -> AutoencoderKLFlux2:
    return seeded(
        seed,
        lambda: AutoencoderKLFlux2(
            block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1,
            latent_channels=LATENT_CHANNELS,
            norm_num_groups=4,
            sample_size=32,
            mid_block_add_attention=False,
        ),
    ).eval()


def make_tiny_flux2_transformer(
    *, seed: int = 0, num_layers: int = 3, num_single_layers: int = 1, guidance_embeds: bool = False
) -> Flux2Transformer2DModel:
    return seeded(
        seed,
        lambda: Flux2Transformer2DModel(
            patch_size=1,
            in_channels=4 * LATENT_CHANNELS,  # 2x2 patchified latents
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=3 * TEXT_HIDDEN,
            timestep_guidance_channels=32,
            axes_dims_rope=(4, 4, 4, 4),
            guidance_embeds=guidance_embeds,
        ),
    ).eval()


def make_tiny_klein_pipeline(*, seed: int = 0, dtype: torch.dtype = torch.float32, **sizes) -> Flux2KleinPipeline:
    """Flux.2 Klein: Qwen3 chat-template prompts, no guidance embedding, real CFG as a separate forward."""
    tokenizer = make_bpe_tokenizer(KLEIN_CORPUS, QWEN_SPECIAL, QWEN3_CHAT_TEMPLATE)
    pipe = Flux2KleinPipeline(
        scheduler=make_scheduler(),
        vae=cast(make_flux2_vae(seed + 1), dtype),
        text_encoder=cast(make_qwen3_encoder(tokenizer, seed + 2), dtype),
        tokenizer=tokenizer,
        transformer=cast(make_tiny_flux2_transformer(seed=seed, **sizes), dtype),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_tiny_flux2_dev_pipeline(*, seed: int = 0, dtype: torch.dtype = torch.float32, **sizes) -> Flux2Pipeline:
    """Flux.2 dev: Mistral-3 prompts with the system message, guidance-distilled (guidance embedding)."""
    tokenizer = make_bpe_tokenizer(
        DEV_CORPUS, MISTRAL_SPECIAL, MISTRAL_CHAT_TEMPLATE, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    pipe = Flux2Pipeline(
        scheduler=make_scheduler(),
        vae=cast(make_flux2_vae(seed + 1), dtype),
        text_encoder=cast(make_mistral3_encoder(tokenizer, seed + 2), dtype),
        tokenizer=tokenizer,
        transformer=cast(make_tiny_flux2_transformer(seed=seed, guidance_embeds=True, **sizes), dtype),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
