"""The bundled model's training code: a few steps on a fixed batch reduce the loss."""

from __future__ import annotations

import json

import numpy as np
import torch

from conceptattention.bundled.model import BundledModelConfig, build_untrained
from conceptattention.bundled.train import encode_batch, flow_matching_loss, scene_batch


def test_few_training_steps_reduce_the_flow_matching_loss():
    config = BundledModelConfig(num_layers=2, num_attention_heads=2, attention_head_dim=16, text_dim=32)
    pipe = build_untrained(config, seed=0)
    pixels, captions = scene_batch(np.arange(8), config.image_size)
    assert pixels.shape == (8, 3, 32, 32) and captions[0].startswith("a photo of ")
    batch = encode_batch(pipe, pixels, captions, config.max_sequence_length)
    transformer = pipe.transformer.train()
    optimizer = torch.optim.Adam(transformer.parameters(), lr=1e-3)

    def loss_now():
        return flow_matching_loss(pipe, transformer, *batch, torch.Generator().manual_seed(0))

    with torch.no_grad():
        before = float(loss_now())
    for _ in range(25):
        optimizer.zero_grad()
        loss_now().backward()
        optimizer.step()
    with torch.no_grad():
        after = float(loss_now())
    assert after < 0.8 * before


def test_training_batches_are_seeded_by_step():
    a = scene_batch(np.random.default_rng([0, 1, 7]).integers(0, 1000, 4), 32)
    b = scene_batch(np.random.default_rng([0, 1, 7]).integers(0, 1000, 4), 32)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


def _tiny_config(**options) -> BundledModelConfig:
    return BundledModelConfig(num_layers=1, num_attention_heads=2, attention_head_dim=16, text_dim=32, **options)


def test_without_pooled_text_the_transformer_ignores_the_pooled_vector_and_keeps_ignoring_it():
    pipe = build_untrained(_tiny_config(pooled_text=False), seed=0)
    pixels, captions = scene_batch(np.arange(2), 32)
    latents, prompt_embeds, pooled, text_ids = encode_batch(pipe, pixels, captions, 16)
    transformer = pipe.transformer.train()
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=1e-2, weight_decay=0.01)
    flow_matching_loss(pipe, transformer, latents, prompt_embeds, pooled, text_ids, torch.Generator()).backward()
    optimizer.step()
    temb = transformer.time_text_embed
    timestep = torch.tensor([500.0, 500.0])
    assert torch.equal(temb(timestep, pooled), temb(timestep, torch.zeros_like(pooled)))
    assert not torch.equal(pooled, torch.zeros_like(pooled))
    # The Flux-like option does read it.
    default = build_untrained(_tiny_config(pooled_text=True), seed=0).transformer.time_text_embed
    assert not torch.allclose(default(timestep, pooled), default(timestep, torch.zeros_like(pooled)))


def test_token_wise_text_encodes_a_word_alone_as_inside_a_caption():
    for context, expected in ((False, True), (True, False)):
        pipe = build_untrained(_tiny_config(text_context=context), seed=0)
        tokenizer, encoder = pipe.tokenizer_2, pipe.text_encoder_2
        with torch.no_grad():
            caption = tokenizer("a photo of apple, plum and grass", return_tensors="pt").input_ids
            alone = tokenizer("plum", return_tensors="pt").input_ids
            in_caption = encoder(caption).last_hidden_state[0, 5]
            by_itself = encoder(alone).last_hidden_state[0, 0]
        assert tokenizer.convert_ids_to_tokens(caption[0])[5] == "▁plum"
        assert torch.allclose(in_caption, by_itself, atol=1e-6) is expected


def test_a_training_run_keeps_the_architecture_it_started_with(tmp_path):
    from conceptattention.bundled.train import work_config

    first = work_config(tmp_path, _tiny_config(pooled_text=False))
    assert json.loads((tmp_path / "config.json").read_text())["pooled_text"] is False
    assert work_config(tmp_path, _tiny_config(pooled_text=True)) == first


def test_held_out_grounding_is_measured_at_the_training_resolution():
    from conceptattention.bundled.train import TrainSettings, grounding
    from conceptattention.eval.config import EvalConfig
    from conceptattention.eval.datasets import SceneDataset
    from conceptattention.eval.harness import score_dataset

    config = _tiny_config()
    pipe = build_untrained(config, seed=0)
    pipe.set_progress_bar_config(disable=True)
    scenes = SceneDataset("val", 3)

    def miou(resolution):
        settings = EvalConfig(dataset="scenes", resolution=resolution)
        return score_dataset(pipe, scenes, settings, max_sequence_length=16)[0]["miou"]

    val = grounding(pipe, pipe.transformer, TrainSettings(val_scenes=3), config)
    assert val["miou"] == miou(32)
    assert miou(None) == miou(32)  # the built pipeline's default size is the scenes' size
    assert val["miou"] != miou(128)  # FluxPipeline's own default, which the criterion once used
    assert len(val["blocks"]) == config.num_layers
