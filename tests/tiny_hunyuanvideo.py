"""Tiny, randomly initialised HunyuanVideo pipelines for tests (built in code, no network).

The prompt side follows the released recipe at toy scale:

- a Llama-3-style tokenizer: a real ``PreTrainedTokenizerFast`` (byte-level BPE, Llama-3's
  pre-tokenizer, ``<|begin_of_text|>`` prepended, right padding) whose vocabulary is trained on
  the pipeline's prompt template and the base words, so that every template word is one token as
  with the real vocabulary. The template's prefix (everything before the user text) is then
  exactly the 95 tokens the pipeline's default ``crop_start`` drops, so the pipeline runs with its
  default ``prompt_template``;
- a 3-layer ``LlamaModel`` (hidden 16, weights drawn wider than Llama's default so that words give
  distinct states): the pipeline takes ``hidden_states[-3]``;
- CLIP-L's pooled output from the project's tiny CLIP (hidden 12).

The VAE compresses space by 4 and time by 4 (a causal VAE: 4k + 1 frames -> k + 1 latent frames),
so a 5-frame 32 x 48 video has 2 latent frames of 8 x 12, i.e. 2 x 4 x 6 tokens with patch 2.
"""

from __future__ import annotations

from functools import cache

import torch
from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
from tiny_common import cast
from tiny_text_encoders import _vocab_and_merges
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

from conceptattention.bundled.components import (
    BASE_WORDS,
    make_clip_encoder,
    make_clip_tokenizer,
    make_scheduler,
    seeded,
)

LATENT_CHANNELS = 4
TEXT_HIDDEN = 16  # Llama hidden size = the transformer's text_embed_dim
CLIP_HIDDEN = 12  # CLIP-L pooled size = the transformer's pooled_projection_dim
LLAMA3_SPECIAL = ("<pad>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
# Llama-3's pre-tokenizer split (digits in runs of up to three).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


@cache
def _tokenizer_json() -> str:
    vocab, merges = _vocab_and_merges(
        (str(DEFAULT_PROMPT_TEMPLATE["template"]).format(" ".join(BASE_WORDS)),), LLAMA3_SPECIAL
    )
    bpe = Tokenizer(models.BPE(vocab=dict(vocab), merges=[tuple(m) for m in merges]))
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    bos = "<|begin_of_text|>"
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    return bpe.to_str()


def make_llama3_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-3-style tokenizer whose vocabulary covers the HunyuanVideo template and the base words."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<pad>",
        additional_special_tokens=list(LLAMA3_SPECIAL[2:]),
        padding_side="right",
        model_max_length=1024,
    )


def make_llama_encoder(tokenizer, seed: int = 0, num_layers: int = 3) -> LlamaModel:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=1024,
        # Llama's default (0.02) gives states so small that the refiner's input projection bias swamps them
        # and every concept token is nearly the same vector; 0.3 keeps concepts (and prompts) apart.
        initializer_range=0.3,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return seeded(seed, lambda: LlamaModel(config)).eval()


def make_tiny_hunyuanvideo_vae(seed: int = 1) -> AutoencoderKLHunyuanVideo:
    return seeded(
        seed,
        lambda: AutoencoderKLHunyuanVideo(
            latent_channels=LATENT_CHANNELS,
            down_block_types=("HunyuanVideoDownBlock3D",) * 3,
            up_block_types=("HunyuanVideoUpBlock3D",) * 3,
            block_out_channels=(8, 8, 16),
            layers_per_block=1,
            norm_num_groups=4,
            spatial_compression_ratio=4,
            temporal_compression_ratio=4,
            mid_block_add_attention=False,
        ),
    ).eval()


def make_tiny_hunyuanvideo_transformer(
    *,
    seed: int = 0,
    num_layers: int = 2,
    num_single_layers: int = 1,
    num_refiner_layers: int = 1,
    dtype: torch.dtype = torch.float32,
    **extra,
) -> HunyuanVideoTransformer3DModel:
    model = seeded(
        seed,
        lambda: HunyuanVideoTransformer3DModel(
            in_channels=LATENT_CHANNELS,
            out_channels=LATENT_CHANNELS,
            num_attention_heads=2,
            attention_head_dim=16,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            num_refiner_layers=num_refiner_layers,
            mlp_ratio=2.0,
            patch_size=2,
            text_embed_dim=TEXT_HIDDEN,
            pooled_projection_dim=CLIP_HIDDEN,
            rope_axes_dim=(4, 6, 6),
            **{"patch_size_t": 1, "guidance_embeds": True, **extra},
        ),
    ).eval()
    return cast(model, dtype)


def make_tiny_hunyuanvideo_pipeline(
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    num_layers: int = 2,
    num_single_layers: int = 1,
    **transformer_sizes,
) -> HunyuanVideoPipeline:
    """A complete HunyuanVideoPipeline of tiny seeded random parts (sizes multiple of 16; 4k + 1 frames)."""
    transformer = make_tiny_hunyuanvideo_transformer(
        seed=seed, num_layers=num_layers, num_single_layers=num_single_layers, dtype=dtype, **transformer_sizes
    )
    tokenizer = make_llama3_tokenizer()
    tokenizer_2 = make_clip_tokenizer()
    pipe = HunyuanVideoPipeline(
        text_encoder=cast(make_llama_encoder(tokenizer, seed + 2), dtype),
        tokenizer=tokenizer,
        transformer=transformer,
        vae=cast(make_tiny_hunyuanvideo_vae(seed + 1), dtype),
        scheduler=make_scheduler(dynamic_shifting=False, shift=7.0),
        text_encoder_2=cast(make_clip_encoder(tokenizer_2, CLIP_HIDDEN, seed=seed + 3), dtype),
        tokenizer_2=tokenizer_2,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
