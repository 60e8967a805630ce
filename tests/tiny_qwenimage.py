"""Tiny, randomly initialised Qwen-Image pipelines for tests (built in code, no network).

The tokenizer is a real ``Qwen2Tokenizer`` (byte-level BPE with Qwen's pre-tokenizer and chat
special tokens) whose small vocabulary is trained here on the prompt template and the base
words, so the template's system prefix is exactly the 34 tokens the pipeline drops, as with the
real tokenizer. The text encoder is a 2-layer ``Qwen2_5_VLForConditionalGeneration``.
"""

from __future__ import annotations

import json
from functools import cache

import torch
from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from conceptattention.adapters.qwenimage import PROMPT_TEMPLATE
from conceptattention.bundled.components import BASE_WORDS, make_scheduler, seeded

TEXT_HIDDEN = 32
LATENT_CHANNELS = 4
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@cache
def _vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    trainer_tokenizer = Tokenizer(models.BPE())
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    corpus = [PROMPT_TEMPLATE.format(" ".join(BASE_WORDS)), *BASE_WORDS, *(" " + w for w in BASE_WORDS)]
    trainer = trainers.BpeTrainer(
        vocab_size=4000,  # more than needed: every corpus word ends up one token
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    trainer_tokenizer.train_from_iterator(corpus, trainer)
    model = json.loads(trainer_tokenizer.to_str())["model"]
    return model["vocab"], tuple(tuple(m) for m in model["merges"])


def make_qwen_tokenizer() -> Qwen2Tokenizer:
    vocab, merges = _vocab_and_merges()
    return Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges), additional_special_tokens=list(SPECIAL_TOKENS[1:]))


def make_qwen_text_encoder(tokenizer, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    pad = tokenizer.pad_token_id
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 2, 4]},
            "bos_token_id": pad,
            "eos_token_id": pad,
            "pad_token_id": pad,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": TEXT_HIDDEN,
            "fullatt_block_indexes": [0],
        },
    )
    return seeded(seed, lambda: Qwen2_5_VLForConditionalGeneration(config)).eval()


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


def _cast(model, dtype: torch.dtype):
    return model.to(dtype=dtype) if dtype != torch.float32 else model


def make_tiny_qwenimage_pipeline(*, seed: int = 0, dtype: torch.dtype = torch.float32, **sizes) -> QwenImagePipeline:
    """A complete QwenImagePipeline of tiny seeded random parts (VAE scale 2: sizes multiple of 4)."""
    tokenizer = make_qwen_tokenizer()
    pipe = QwenImagePipeline(
        scheduler=make_scheduler(),
        vae=_cast(make_qwen_vae(seed + 1), dtype),
        text_encoder=_cast(make_qwen_text_encoder(tokenizer, seed + 2), dtype),
        tokenizer=tokenizer,
        transformer=_cast(make_tiny_qwenimage_transformer(seed=seed, **sizes), dtype),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
