"""Architecture of the bundled model and how to build it untrained."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import FluxPipeline

from conceptattention.bundled.components import (
    BASE_WORDS,
    assemble_pipeline,
    make_clip_encoder,
    make_clip_tokenizer,
    make_scheduler,
    make_t5_encoder,
    make_t5_tokenizer,
    make_transformer,
    make_vae,
)
from conceptattention.data.scenes import CLASSES

SCENE_WORDS = (*CLASSES, "a", "photo", "of", "and", ",")


@dataclass(frozen=True)
class BundledModelConfig:
    """Sizes of the bundled Flux-architecture model (pixel-space autoencoder, 16x16 token grid)."""

    image_size: int = 32
    latent_channels: int = 4
    vae_channels: int = 32
    text_dim: int = 64
    pooled_dim: int = 32
    num_layers: int = 4
    num_single_layers: int = 1  # >= 1: the last double block's text path must receive gradient
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    max_sequence_length: int = 16
    # False: the frozen text encoder's self-attention outputs are zeroed, so each token's state
    # depends on that token alone and a concept encoded alone equals the same word in a caption.
    text_context: bool = False
    # False: the transformer's pooled-text input weights are zero and frozen, so the caption reaches
    # the image only through joint attention, and concept tokens are conditioned exactly as in
    # training (ConceptAttention conditions them with a zero pooled input).
    pooled_text: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of_model(cls, folder: str | Path) -> BundledModelConfig:
        """The architecture recorded in a pipeline folder's ``conceptattention.json``."""
        return cls(**json.loads((Path(folder) / "conceptattention.json").read_text())["architecture"])


def _text_encoder(tokenizer, config: BundledModelConfig, seed: int):
    encoder = make_t5_encoder(tokenizer, config.text_dim, seed=seed)
    if not config.text_context:
        for block in encoder.encoder.block:
            torch.nn.init.zeros_(block.layer[0].SelfAttention.o.weight)
    return encoder


def _transformer(config: BundledModelConfig, seed: int):
    transformer = make_transformer(
        latent_channels=config.latent_channels,
        text_dim=config.text_dim,
        pooled_dim=config.pooled_dim,
        num_layers=config.num_layers,
        num_single_layers=config.num_single_layers,
        num_attention_heads=config.num_attention_heads,
        attention_head_dim=config.attention_head_dim,
        seed=seed,
    )
    if not config.pooled_text:
        pooled_input = transformer.time_text_embed.text_embedder.linear_1.weight
        torch.nn.init.zeros_(pooled_input)
        pooled_input.requires_grad_(False)
    return transformer


def build_untrained(config: BundledModelConfig, seed: int = 0) -> FluxPipeline:
    """All parts with seeded random weights; text encoders stay frozen at these weights."""
    words = (*SCENE_WORDS, *BASE_WORDS)
    tokenizer = make_clip_tokenizer(words)
    tokenizer_2 = make_t5_tokenizer(words, model_max_length=config.max_sequence_length)
    pipe = assemble_pipeline(
        transformer=_transformer(config, seed),
        vae=make_vae((config.vae_channels,), config.latent_channels, norm_num_groups=8, seed=seed + 1),
        text_encoder=make_clip_encoder(tokenizer, config.pooled_dim, seed=seed + 2),
        tokenizer=tokenizer,
        text_encoder_2=_text_encoder(tokenizer_2, config, seed + 3),
        tokenizer_2=tokenizer_2,
        scheduler=make_scheduler(dynamic_shifting=False, shift=1.0),
    )
    # FluxPipeline defaults to FLUX.1's size; a saved model gets its size from conceptattention.json,
    # a pipeline built here (training, references) from this.
    pipe.default_sample_size = config.image_size // pipe.vae_scale_factor
    return pipe
