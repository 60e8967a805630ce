"""Tiny, randomly initialised LongCat-Image pipelines for tests (built in code, no network).

Text side from :mod:`tiny_text_encoders`: a real ``Qwen2Tokenizer`` whose vocabulary is trained on
the pipeline's prompt template (so every template word is one token, as with the real vocabulary)
and a 2-layer ``Qwen2_5_VLForConditionalGeneration``. The ``text_processor`` (used only by the pipeline's
prompt rewriting, off in the tests: ``enable_prompt_rewrite=False``) is that tokenizer: a ``Qwen2VLProcessor``
cannot be built without torchvision, and diffusers cannot load a saved pipeline without the component.
A tiny ``AutoencoderKL`` with the 16 latent channels the pipeline hard-codes (VAE scale 2).
The prompt budget stays the pipeline's own 512 tokens: the image position ids start there, and a
saved pipeline loads with it.
"""

from __future__ import annotations

import torch
from diffusers import LongCatImagePipeline, LongCatImageTransformer2DModel
from tiny_common import cast
from tiny_text_encoders import QWEN_SPECIAL, TEXT_HIDDEN, make_bpe_tokenizer, make_qwen25vl_encoder

from conceptattention.bundled.components import BASE_WORDS, make_scheduler, make_vae, rope_axes_for_head_dim, seeded

LATENT_CHANNELS = 16  # LongCatImagePipeline.__call__ hard-codes 16 latent channels
# The prompt template of LongCatImagePipeline.__init__ (prefix and suffix), for the tokenizer's vocabulary.
TEMPLATE_PREFIX = (
    "<|im_start|>system\nAs an image captioning expert, generate a descriptive text prompt based on an image "
    "content, suitable for input to a text-to-image model.<|im_end|>\n<|im_start|>user\n"
)
TEMPLATE_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"


def make_longcat_tokenizer():
    return make_bpe_tokenizer([TEMPLATE_PREFIX + " ".join(BASE_WORDS) + TEMPLATE_SUFFIX], QWEN_SPECIAL[:3])


def make_tiny_longcat_transformer(
    *,
    seed: int = 0,
    num_layers: int = 3,
    num_single_layers: int = 1,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
) -> LongCatImageTransformer2DModel:
    return seeded(
        seed,
        lambda: LongCatImageTransformer2DModel(
            patch_size=1,
            in_channels=4 * LATENT_CHANNELS,  # 2x2 packed latent patches
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=TEXT_HIDDEN,
            pooled_projection_dim=TEXT_HIDDEN,
            axes_dims_rope=list(rope_axes_for_head_dim(attention_head_dim)),
        ),
    ).eval()


def make_tiny_longcat_pipeline(
    *, seed: int = 0, dtype: torch.dtype = torch.float32, **transformer_sizes
) -> LongCatImagePipeline:
    """A complete LongCatImagePipeline of tiny seeded random parts (VAE scale 2: sizes multiple of 4)."""
    tokenizer = make_longcat_tokenizer()
    pipe = LongCatImagePipeline(
        scheduler=make_scheduler(),
        vae=cast(make_vae((8, 16), LATENT_CHANNELS, norm_num_groups=4, seed=seed + 1), dtype),
        text_encoder=cast(make_qwen25vl_encoder(tokenizer, seed + 2), dtype),
        tokenizer=tokenizer,
        text_processor=tokenizer,  # the text half of a Qwen2VLProcessor (see above)
        transformer=cast(make_tiny_longcat_transformer(seed=seed, **transformer_sizes), dtype),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
