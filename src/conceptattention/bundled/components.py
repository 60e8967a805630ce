"""Small Flux-architecture pipeline parts built in code: tokenizers, text encoders, VAE, transformer.

Used to build the bundled model before training, and by the tests for tiny random
pipelines. Tokenizers are real (a T5-style Unigram model and a CLIP BPE) over a small
English vocabulary, so prompts split into meaningful pieces and survive
``save_pretrained`` / ``from_pretrained``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

# General English words that get one piece each; projects add their own on top.
BASE_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "on", "in", "and", "with", "at", "by", "near",
    "photo", "picture", "painting", "image", "close", "up",
    "dog", "cat", "bird", "horse", "cow", "person", "man", "woman", "child",
    "face", "hair", "eye", "hand",
    "tree", "sky", "grass", "cloud", "sun", "moon", "water", "river", "lake",
    "sea", "beach", "mountain", "field", "flower", "road", "street",
    "car", "bus", "house", "building", "city", "window", "door", "table",
    "chair", "floor", "wall", "background", "ball", "hat",
    "red", "blue", "green", "yellow", "white", "black", "brown", "small",
    "big", "sitting", "running", "standing", "sunny", "day", "night",
)  # fmt: skip
# Non-initial pieces, so that unknown compounds split into several pieces ("▁sky" + "scraper").
SUFFIXES: tuple[str, ...] = ("scraper", "s", "es", "ing", "ed", "er", "ly", "y", "house", "light")
_CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-"
# Unigram log-probabilities: whole words beat suffix splits, which beat spelling out letters.
_WORD_SCORE, _SUFFIX_SCORE, _CHAR_SCORE = -5.0, -6.0, -12.0


def seeded(seed: int, build: Callable[[], Any]) -> Any:
    """Build under a private RNG state so the caller's global torch RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _unique(words: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(words))


def make_t5_tokenizer(words: Sequence[str] = BASE_WORDS, model_max_length: int = 512) -> T5TokenizerFast:
    """T5-convention Unigram tokenizer (<pad>=0, </s>=1, <unk>=2; appends </s>)."""
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces = [("▁" + w, _WORD_SCORE) for w in _unique(words)] + [(s, _SUFFIX_SCORE) for s in SUFFIXES]
    pieces += [("▁", _CHAR_SCORE)] + [(p + c, _CHAR_SCORE) for c in _CHARACTERS for p in ("", "▁")]
    seen = {"<pad>", "</s>", "<unk>"}
    for piece, score in pieces:
        if piece not in seen:
            seen.add(piece)
            vocab.append((piece, score))
    # extra_ids=0: sentinel tokens only matter for span-corruption pretraining.
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def make_clip_tokenizer(words: Sequence[str] = BASE_WORDS) -> CLIPTokenizer:
    """Byte-level-style BPE: every character alone plus a merge chain per word."""
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for special in ("<|startoftext|>", "<|endoftext|>", "<unk>"):
        add(special)
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-":
        add(ch)
        add(ch + "</w>")
    merges: list[tuple[str, str]] = []
    for word in _unique([*words, *SUFFIXES]):
        symbols = [*word[:-1], word[-1] + "</w>"]  # CLIP marks the word end on the last symbol
        left = symbols[0]
        for right in symbols[1:]:
            if (left, right) not in merges:
                merges.append((left, right))
            left += right
            add(left)
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<unk>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=77,
    )


def make_t5_encoder(tokenizer, d_model: int, num_layers: int = 2, num_heads: int = 2, seed: int = 0) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=2 * d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return seeded(seed, lambda: T5EncoderModel(config)).eval()


def make_clip_encoder(
    tokenizer, hidden: int, num_layers: int = 2, seed: int = 0, projection_dim: int | None = None
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A CLIP text encoder; with ``projection_dim`` the variant with a text projection (SD3's)."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection_dim or hidden,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        # The pooler reads the first eos position: it must know the tokenizer's real eos id.
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model_class = CLIPTextModel if projection_dim is None else CLIPTextModelWithProjection
    return seeded(seed, lambda: model_class(config)).eval()


def make_vae(
    block_out_channels: Sequence[int],
    latent_channels: int = 4,
    norm_num_groups: int = 4,
    scaling_factor: float = 0.3611,
    shift_factor: float = 0.1159,
    seed: int = 0,
) -> AutoencoderKL:
    """``len(block_out_channels) == 1`` gives a pixel-space autoencoder (vae_scale_factor 1)."""
    depth = len(block_out_channels)
    return seeded(
        seed,
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * depth,
            up_block_types=("UpDecoderBlock2D",) * depth,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=norm_num_groups,
            sample_size=32,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            use_quant_conv=False,
            use_post_quant_conv=False,
            mid_block_add_attention=False,
        ),
    ).eval()


def rope_axes_for_head_dim(head_dim: int) -> tuple[int, int, int]:
    """Three even RoPE axes (text id, row, column) summing to ``head_dim``; 16 -> (4, 6, 6)."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"attention_head_dim must be even and >= 6, got {head_dim}")
    first = max(2, 2 * (head_dim // 8))
    second = 2 * ((head_dim - first) // 4)
    return first, second, head_dim - first - second


def make_transformer(
    *,
    latent_channels: int,
    text_dim: int,
    pooled_dim: int,
    num_layers: int,
    num_single_layers: int,
    num_attention_heads: int,
    attention_head_dim: int,
    guidance_embeds: bool = False,
    seed: int = 0,
) -> FluxTransformer2DModel:
    return seeded(
        seed,
        lambda: FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * latent_channels,  # Flux packs 2x2 latent patches into channels
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=text_dim,
            pooled_projection_dim=pooled_dim,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=rope_axes_for_head_dim(attention_head_dim),
        ),
    ).eval()


def make_scheduler(dynamic_shifting: bool = True, shift: float = 3.0) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=shift,
        use_dynamic_shifting=dynamic_shifting,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def assemble_pipeline(
    transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, scheduler
) -> FluxPipeline:
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
