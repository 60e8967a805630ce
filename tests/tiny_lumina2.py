"""Tiny, randomly initialised Lumina-Image 2.0 pipelines for tests (built in code, no network).

``Lumina2Pipeline`` of seeded random parts:

* a 4-block ``AutoencoderKL`` (VAE scale 8, the factor the pipeline hard-codes: a ``height x width`` call makes
  a ``height / 8 x width / 8`` latent, so sizes are multiples of 16; Flux-VAE scaling / shift factors, which the
  pipeline's decode uses as ``latents / scale + shift``; no quant convs);
* a byte-level BPE tokenizer with Gemma's special tokens (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3) that,
  like Gemma's, prepends ``<bos>`` and appends nothing; its vocabulary is trained on the pipeline's system prompt
  and ``" <Prompt Start> "``, so each template word is one token (``<Prompt Start>`` is plain text: `` <``,
  ``Prompt``, `` Start``, ``>``; the first prompt token then sits at index 30). The pipeline sets
  ``padding_side = "right"`` and pads to ``max_sequence_length`` (256);
* a 3-layer ``Gemma2Model`` of hidden size 32 (the pipeline reads ``hidden_states[-2]``, the output of the second
  of three layers, before the final norm);
* a ``Lumina2Transformer2DModel`` of width 64 (2 query heads of 32 = RoPE axes 8 + 12 + 12, 1 K/V head by default
  so that the grouped-query path is used, caption width = the encoder's 32, ``sample_size`` 4 = a 32 px default);
* Flow-match Euler with a static shift of 6 (no dynamic shifting; the pipeline's ``mu`` is then unused).

diffusers initialises no Lumina-2 parameter to zeros (there are no pad tokens; the caption pads are masked
instead), but every ``RMSNorm`` weight starts at ones, which would hide a reference that forgets a norm's
weight. Here all RMSNorm weights of the transformer (the blocks' ``norm1`` (``norm1.norm`` in a modulated block),
``norm2``, ``ffn_norm1``, ``ffn_norm2``, the attention's ``norm_q`` / ``norm_k`` and the caption embedder's
norm) get seeded values ``1 + 0.2 * N(0, 1)``. The transformer's Linear weights are drawn ``N(0, 1 / fan_in)``
(biases keep torch's init): torch's default init shrinks every Linear by ~1 / sqrt(3), which leaves each branch
(attention, feed-forward) at ~0.1-0.3 rms, so that the RMSNorm after it (``norm2``, ``ffn_norm2``) would blow up
fp32 rounding (and hide how much the branch contributes).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.transformer_lumina2 import Lumina2Transformer2DModel
from diffusers.pipelines.lumina2.pipeline_lumina2 import Lumina2Pipeline
from tiny_common import cast
from tiny_text_encoders import TEXT_HIDDEN, make_bpe_tokenizer, make_gemma2_encoder
from torch import nn

from conceptattention.bundled.components import make_scheduler, seeded

LATENT_CHANNELS = 4
TEXT_LAYERS = 3  # hidden_states[-2] is then the output of the second of three layers
SYSTEM_PROMPT = (  # Lumina2Pipeline.system_prompt; the pipeline renders SYSTEM_PROMPT + " <Prompt Start> " + prompt
    "You are an assistant designed to generate superior images with the superior degree of image-text alignment "
    "based on textual prompts or user prompts."
)
TEMPLATE_SEPARATOR = " <Prompt Start> "
GEMMA_SPECIAL = ("<pad>", "<eos>", "<bos>", "<unk>")  # ids 0, 1, 2, 3 as in Gemma's vocabulary
LUMINA2_CORPUS = (SYSTEM_PROMPT + TEMPLATE_SEPARATOR + "word", "a red apple on the table")


def make_lumina2_tokenizer():
    """Gemma-like: ``<bos>`` prepended, nothing appended, ``<pad>`` for padding (the pipeline pads on the right)."""
    return make_bpe_tokenizer(
        LUMINA2_CORPUS,
        GEMMA_SPECIAL,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        add_bos_token=True,
        add_eos_token=False,
    )


def make_lumina2_vae(seed: int = 0) -> AutoencoderKL:
    return seeded(
        seed,
        lambda: AutoencoderKL(
            block_out_channels=(8, 8, 16, 16),  # vae scale 8, the factor Lumina2Pipeline hard-codes
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            latent_channels=LATENT_CHANNELS,
            norm_num_groups=4,
            sample_size=32,
            scaling_factor=0.3611,  # Lumina-Image 2.0 uses the Flux.1 VAE: decode(latents / scale + shift)
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
            mid_block_add_attention=False,
        ),
    ).eval()


def make_tiny_lumina2_transformer(
    *,
    seed: int = 0,
    num_layers: int = 2,
    num_refiner_layers: int = 1,
    hidden_size: int = 64,
    num_attention_heads: int = 2,
    num_kv_heads: int = 1,
    axes_dim_rope: tuple[int, int, int] = (8, 12, 12),
    axes_lens: tuple[int, int, int] = (300, 64, 64),
    multiple_of: int = 16,
) -> Lumina2Transformer2DModel:
    """``hidden_size // num_attention_heads`` must equal ``sum(axes_dim_rope)`` (each even); ``num_attention_heads``
    a multiple of ``num_kv_heads``. ``axes_lens``: the first RoPE axis holds the caption positions 0..L-1 and the
    image's L (L = valid caption tokens, at most ``max_sequence_length`` = 256 by default, 512 at most); the other
    two the patch rows / columns (64 patches = 1024 px at VAE scale 8, patch 2)."""

    def build() -> Lumina2Transformer2DModel:
        model = Lumina2Transformer2DModel(
            sample_size=4,  # the pipeline's default size: 4 * 8 = 32 px
            patch_size=2,
            in_channels=LATENT_CHANNELS,
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_refiner_layers=num_refiner_layers,
            num_attention_heads=num_attention_heads,
            num_kv_heads=num_kv_heads,
            multiple_of=multiple_of,
            axes_dim_rope=tuple(axes_dim_rope),
            axes_lens=tuple(axes_lens),
            cap_feat_dim=TEXT_HIDDEN,
        )
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, RMSNorm) and module.weight is not None:  # ones: a forgotten weight would pass
                    module.weight.copy_(1 + 0.2 * torch.randn_like(module.weight))
                elif isinstance(module, nn.Linear):  # variance-preserving, so that branch outputs are O(1)
                    module.weight.normal_(0.0, module.in_features**-0.5)
        return model

    return seeded(seed, build).eval()


def make_tiny_lumina2_pipeline(*, seed: int = 0, dtype: torch.dtype = torch.float32, **sizes) -> Lumina2Pipeline:
    """A complete Lumina2Pipeline of tiny seeded random parts; ``sizes`` go to the transformer."""
    tokenizer = make_lumina2_tokenizer()
    pipe = Lumina2Pipeline(
        scheduler=make_scheduler(dynamic_shifting=False, shift=6.0),
        vae=cast(make_lumina2_vae(seed + 1), dtype),
        text_encoder=cast(make_gemma2_encoder(tokenizer, seed + 2, num_layers=TEXT_LAYERS), dtype),
        tokenizer=tokenizer,
        transformer=cast(make_tiny_lumina2_transformer(seed=seed, **sizes), dtype),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
