"""The bundled model's training code: a few steps on a fixed batch reduce the loss."""

from __future__ import annotations

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
