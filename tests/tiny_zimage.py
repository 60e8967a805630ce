"""Tiny, randomly initialised Z-Image pipelines for tests (built in code, no network).

``ZImagePipeline`` of seeded random parts: a 2-block ``AutoencoderKL`` (VAE scale 2, so sizes are multiples
of 4; Flux-VAE scaling / shift factors, no quant convs), the chat-template Qwen3 tokenizer of the Flux.2 Klein
factory with a 3-layer Qwen3 encoder (Z-Image reads ``hidden_states[-2]``), a ``ZImageTransformer2DModel``
of width 64 (2 heads of 32 = RoPE axes 8 + 12 + 12, caption width = the encoder's 32) and Z-Image-Turbo's
scheduler (static shift 3, no dynamic shifting).

The transformer pads the image and caption tokens of every item to a multiple of 32 with the learned
``x_pad_token`` / ``cap_pad_token``; these pad tokens are not masked out of the attention. diffusers
initialises them to zeros, so here they get seeded random values: a test can then tell whether pad tokens
are used as keys (or mapped) by something that should skip them.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from diffusers.models.transformers.transformer_z_image import ZImageTransformer2DModel
from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline
from tiny_common import cast
from tiny_flux2 import KLEIN_CORPUS
from tiny_text_encoders import QWEN3_CHAT_TEMPLATE, QWEN_SPECIAL, TEXT_HIDDEN, make_bpe_tokenizer, make_qwen3_encoder

from conceptattention.bundled.components import make_scheduler, seeded

LATENT_CHANNELS = 4
TEXT_LAYERS = 3  # hidden_states[-2] is then the output of the second of three layers


def make_zimage_tokenizer():
    """Klein's tokenizer; Z-Image renders ``<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n``."""
    return make_bpe_tokenizer(KLEIN_CORPUS, QWEN_SPECIAL, QWEN3_CHAT_TEMPLATE)


def make_zimage_vae(seed: int = 0) -> AutoencoderKL:
    return seeded(
        seed,
        lambda: AutoencoderKL(
            block_out_channels=(8, 16),  # vae_scale_factor 2
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1,
            latent_channels=LATENT_CHANNELS,
            norm_num_groups=4,
            sample_size=32,
            scaling_factor=0.3611,  # Z-Image's (Flux.1) VAE factors: decode(latents / scale + shift)
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
            mid_block_add_attention=False,
        ),
    ).eval()


def make_tiny_zimage_transformer(
    *,
    seed: int = 0,
    n_layers: int = 2,
    n_refiner_layers: int = 1,
    dim: int = 64,
    n_heads: int = 2,
    axes_dims: tuple[int, int, int] = (8, 12, 12),
    axes_lens: tuple[int, int, int] = (1024, 64, 64),
) -> ZImageTransformer2DModel:
    """``dim // n_heads`` must equal ``sum(axes_dims)`` (each even). ``axes_lens``: the first RoPE axis holds the
    caption positions 1..L (L padded to 32, at most ``max_sequence_length`` = 512) and the image's frame
    position L + 1; the other two hold the patch rows / columns (64 patches = 256 px at VAE scale 2)."""

    def build() -> ZImageTransformer2DModel:
        model = ZImageTransformer2DModel(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=LATENT_CHANNELS,
            dim=dim,
            n_layers=n_layers,
            n_refiner_layers=n_refiner_layers,
            n_heads=n_heads,
            n_kv_heads=n_heads,
            cap_feat_dim=TEXT_HIDDEN,
            axes_dims=list(axes_dims),
            axes_lens=list(axes_lens),
        )
        with torch.no_grad():  # zeros in diffusers: random, so that using a pad token shows
            model.x_pad_token.normal_()
            model.cap_pad_token.normal_()
        return model

    return seeded(seed, build).eval()


def make_tiny_zimage_pipeline(*, seed: int = 0, dtype: torch.dtype = torch.float32, **sizes) -> ZImagePipeline:
    """A complete ZImagePipeline of tiny seeded random parts; ``sizes`` go to the transformer."""
    tokenizer = make_zimage_tokenizer()
    pipe = ZImagePipeline(
        scheduler=make_scheduler(dynamic_shifting=False, shift=3.0),
        vae=cast(make_zimage_vae(seed + 1), dtype),
        text_encoder=cast(make_qwen3_encoder(tokenizer, seed + 2, num_layers=TEXT_LAYERS), dtype),
        tokenizer=tokenizer,
        transformer=cast(make_tiny_zimage_transformer(seed=seed, **sizes), dtype),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
