"""Tiny, randomly initialised FLUX pipeline for tests.

Everything is built in code from seeded random weights, so tests never touch a
model hub and run in well under a second per denoising step on CPU.  The
components mirror the real FLUX.1 layout (CLIP pooled text + T5 sequence text,
2x2-packed latents, flow-matching scheduler) at toy sizes.

The T5 tokenizer is a real Unigram model over a small English vocabulary, so
prompts tokenize into meaningful word pieces, ``</s>`` is appended like real T5,
and out-of-vocabulary compounds (``"skyscraper"``) split into several pieces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

__all__ = [
    "T5_WORDS",
    "TinyFluxConfig",
    "make_tiny_clip",
    "make_tiny_flux_pipeline",
    "make_tiny_flux_transformer",
    "make_tiny_scheduler",
    "make_tiny_t5",
    "make_tiny_vae",
    "rope_axes_for_head_dim",
    "tiny_flux_config",
]

# Shared by both text encoders: the transformer's joint_attention_dim and
# pooled_projection_dim must match these.
TEXT_HIDDEN = 32
LATENT_CHANNELS = 4

# Words that get a single "▁word" piece in the T5 vocab (and a single BPE token
# in the CLIP vocab).  Tests pick concepts from this list.
T5_WORDS: tuple[str, ...] = (
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

# Sub-word (non-initial) pieces so unknown compounds get multi-piece splits
# rather than collapsing to letters or <unk>.
_T5_SUFFIXES: tuple[str, ...] = (
    "scraper", "s", "es", "ing", "ed", "er", "ly", "y", "house", "light",
)  # fmt: skip

# Unigram log-probs: whole words beat suffix splits, which beat spelling out
# letters, so segmentation is "▁sky" + "scraper" and never letter soup.
_WORD_SCORE = -5.0
_SUFFIX_SCORE = -6.0
_CHAR_SCORE = -12.0


@dataclass(frozen=True)
class TinyFluxConfig:
    """Sizes of the tiny FLUX components; defaults give a ~145k-param transformer."""

    num_layers: int = 3
    num_single_layers: int = 1
    num_attention_heads: int = 2
    attention_head_dim: int = 16
    guidance_embeds: bool = False

    def transformer_kwargs(self) -> dict[str, Any]:
        return {
            "patch_size": 1,
            # FLUX packs 2x2 latent patches into the channel dim before the transformer.
            "in_channels": 4 * LATENT_CHANNELS,
            "num_layers": self.num_layers,
            "num_single_layers": self.num_single_layers,
            "attention_head_dim": self.attention_head_dim,
            "num_attention_heads": self.num_attention_heads,
            "joint_attention_dim": TEXT_HIDDEN,
            "pooled_projection_dim": TEXT_HIDDEN,
            "guidance_embeds": self.guidance_embeds,
            "axes_dims_rope": rope_axes_for_head_dim(self.attention_head_dim),
        }


def tiny_flux_config(
    *,
    num_layers: int = 3,
    num_single_layers: int = 1,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    guidance_embeds: bool = False,
) -> TinyFluxConfig:
    return TinyFluxConfig(
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        guidance_embeds=guidance_embeds,
    )


def rope_axes_for_head_dim(head_dim: int) -> tuple[int, int, int]:
    """Split ``head_dim`` into three even RoPE axes (text-id, row, col).

    Each axis must be even (RoPE rotates pairs) and they must sum to the head dim;
    16 -> (4, 6, 6), roughly the proportions of real FLUX's (16, 56, 56).
    """
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"attention_head_dim must be even and >= 6, got {head_dim}")
    first = max(2, 2 * (head_dim // 8))
    rest = head_dim - first
    second = 2 * ((rest // 2) // 2)
    return (first, second, rest - second)


def _cast(model: Any, dtype: torch.dtype) -> Any:
    # Models are born float32; skipping the no-op cast avoids diffusers'
    # "modules should be kept in float32" warning on every build.
    if dtype != torch.float32:
        model = model.to(dtype=dtype)
    return model.eval()


def _seeded(seed: int, build: Any) -> Any:
    # fork_rng keeps the caller's global torch RNG untouched, so building a
    # pipeline inside a test never perturbs other seeded code.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def make_tiny_flux_transformer(
    *,
    seed: int = 0,
    num_layers: int = 3,
    num_single_layers: int = 1,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    guidance_embeds: bool = False,
    dtype: torch.dtype = torch.float32,
) -> FluxTransformer2DModel:
    cfg = tiny_flux_config(
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        guidance_embeds=guidance_embeds,
    )
    model = _seeded(seed, lambda: FluxTransformer2DModel(**cfg.transformer_kwargs()))
    return _cast(model, dtype)


def make_tiny_vae(*, seed: int = 0, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    def build() -> AutoencoderKL:
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            # Two blocks -> vae_scale_factor 2, so a 64x48 image is a 32x24 latent.
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=LATENT_CHANNELS,
            norm_num_groups=4,
            sample_size=32,
            # Real FLUX VAE constants; the pipeline un-shifts/un-scales with them.
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )

    return _cast(_seeded(seed, build), dtype)


def make_tiny_scheduler() -> FlowMatchEulerDiscreteScheduler:
    # Dynamic shifting mirrors FLUX.1-dev; the pipeline computes mu from the
    # image sequence length using these base/max settings.
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocab: every letter/digit alone plus a merge chain per word."""
    vocab: dict[str, int] = {}

    def add(tok: str) -> None:
        if tok not in vocab:
            vocab[tok] = len(vocab)

    for special in ("<|startoftext|>", "<|endoftext|>", "<unk>"):
        add(special)
    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"
    for ch in chars:
        add(ch)
        add(ch + "</w>")

    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in T5_WORDS + _T5_SUFFIXES:
        # CLIP BPE marks word ends with "</w>" on the final symbol, so the chain
        # merges left-to-right and the last step absorbs the end-marked char.
        symbols = [*list(word[:-1]), word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            pair = (left, right)
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            left = left + right
            add(left)
    return vocab, merges


def make_tiny_clip(*, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[CLIPTextModel, CLIPTokenizer]:
    vocab, merges = _clip_vocab_and_merges()
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<unk>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=77,
    )
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=TEXT_HIDDEN,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        # The pooler picks the hidden state at the first eos position; it must
        # use the tokenizer's real eos id, not CLIP's legacy id 2 argmax trick.
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = _seeded(seed, lambda: CLIPTextModel(config))
    return _cast(model, dtype), tokenizer


def _t5_vocab() -> list[tuple[str, float]]:
    # T5 convention: <pad>=0, </s>=1, <unk>=2.
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    seen = {piece for piece, _ in vocab}

    def add(piece: str, score: float) -> None:
        if piece not in seen:
            seen.add(piece)
            vocab.append((piece, score))

    for word in T5_WORDS:
        add("▁" + word, _WORD_SCORE)
    for suffix in _T5_SUFFIXES:
        add(suffix, _SUFFIX_SCORE)
    # Single characters (with and without the word-start marker) guarantee any
    # lowercase/uppercase/digit input segments without <unk>.
    add("▁", _CHAR_SCORE)
    for ch in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-":
        add(ch, _CHAR_SCORE)
        add("▁" + ch, _CHAR_SCORE)
    return vocab


def make_tiny_t5(*, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[T5EncoderModel, T5TokenizerFast]:
    vocab = _t5_vocab()
    # extra_ids=0: sentinel tokens are only for span-corruption pretraining and
    # would just bloat the embedding table.
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)
    config = T5Config(
        vocab_size=len(vocab),
        d_model=TEXT_HIDDEN,
        d_kv=16,
        d_ff=37,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    model = _seeded(seed, lambda: T5EncoderModel(config))
    return _cast(model, dtype), tokenizer


def make_tiny_flux_pipeline(
    *,
    seed: int = 0,
    num_layers: int = 3,
    num_single_layers: int = 1,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    guidance_embeds: bool = False,
    dtype: torch.dtype = torch.float32,
) -> FluxPipeline:
    """Build a complete FluxPipeline with tiny seeded random components.

    Each component gets its own derived seed, so changing transformer sizes
    leaves the VAE and text encoders bit-identical.
    """
    transformer = make_tiny_flux_transformer(
        seed=seed,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        guidance_embeds=guidance_embeds,
        dtype=dtype,
    )
    vae = make_tiny_vae(seed=seed + 1, dtype=dtype)
    text_encoder, tokenizer = make_tiny_clip(seed=seed + 2, dtype=dtype)
    text_encoder_2, tokenizer_2 = make_tiny_t5(seed=seed + 3, dtype=dtype)
    pipe = FluxPipeline(
        scheduler=make_tiny_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
