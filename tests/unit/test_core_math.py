"""Core math against naive computations and hand-computed cases (no diffusers)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from conceptattention.core import (
    ScoreAccumulator,
    TokenGrid,
    binary_mask,
    block_saliency,
    concept_attention,
    cross_attention_scores,
    finalize_maps,
    gaussian_blur3x3,
    output_space_scores,
    segment,
    tokens_to_grid,
    upsample,
    value_space_scores,
)


def _naive_rows(q_c, k_c, v_c, q_x, k_x, v_x, keys):
    """Full attention for every query of [concepts; image], then the concept rows."""
    q = torch.cat([q_c, q_x], 2)
    k, v = {"both": (torch.cat([k_c, k_x], 2), torch.cat([v_c, v_x], 2)), "image": (k_x, v_x), "concepts": (k_c, v_c)}[
        keys
    ]
    out = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v
    return out[:, :, : q_c.shape[2]]


@pytest.mark.parametrize("keys", ["both", "image", "concepts"])
def test_concept_attention_equals_full_attention_rows(keys):
    g = torch.Generator().manual_seed(0)
    b, h, c, n, d = 2, 3, 4, 10, 8
    q_c, k_c, v_c = (torch.randn(b, h, c, d, generator=g) for _ in range(3))
    q_x, k_x, v_x = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    got = concept_attention(q_c, k_c, v_c, k_x, v_x, keys=keys)
    torch.testing.assert_close(got, _naive_rows(q_c, k_c, v_c, q_x, k_x, v_x, keys), rtol=0, atol=1e-6)


def test_concept_attention_rejects_unknown_keys():
    x = torch.zeros(1, 1, 1, 2)
    with pytest.raises(ValueError, match="`keys` must be"):
        concept_attention(x, x, x, x, x, keys="none")


def test_output_space_scores_hand_case():
    o_c = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # (1, C=2, HD=2)
    o_x = torch.tensor([[[3.0, 4.0], [1.0, -1.0], [0.0, 0.5]]])  # (1, N=3, HD=2)
    expected = torch.tensor([[[3.0, 1.0, 0.0], [8.0, -2.0, 1.0]]])
    torch.testing.assert_close(output_space_scores(o_c, o_x), expected)


def test_value_space_concatenates_heads():
    v_c = torch.tensor([[[[1.0]], [[2.0]]]])  # (B=1, H=2, C=1, D=1)
    v_x = torch.tensor([[[[3.0], [1.0]], [[1.0], [0.0]]]])  # (1, 2, N=2, 1)
    # heads concatenated: c = (1, 2), x0 = (3, 1), x1 = (1, 0)
    torch.testing.assert_close(value_space_scores(v_c, v_x), torch.tensor([[[5.0, 1.0]]]))


def test_cross_attention_hand_case():
    q_x = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # (B=1, H=2, N=1, D=2)
    k_c = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]])  # (1, 2, C=2, 2)
    got = cross_attention_scores(q_x, k_c)
    a = 1 / math.sqrt(2)
    p_head0 = math.exp(a) / (math.exp(a) + 1)
    expected = torch.tensor([[[(p_head0 + 0.5) / 2], [(1 - p_head0 + 0.5) / 2]]])
    torch.testing.assert_close(got, expected)
    raw = cross_attention_scores(q_x, k_c, softmax=False)
    torch.testing.assert_close(raw, torch.tensor([[[a / 2], [0.0]]]))


def test_block_saliency_applies_softmax_over_concepts_once():
    g = torch.Generator().manual_seed(1)
    o_c, o_x = torch.randn(1, 3, 4, generator=g), torch.randn(1, 5, 4, generator=g)
    q_x, k_c = torch.randn(1, 2, 5, 2, generator=g), torch.randn(1, 2, 3, 2, generator=g)
    v_c, v_x = torch.randn(1, 2, 3, 2, generator=g), torch.randn(1, 2, 5, 2, generator=g)
    kw = {"o_c": o_c, "o_x": o_x, "q_x": q_x, "k_c": k_c, "v_c": v_c, "v_x": v_x}
    out = block_saliency("output", softmax=True, **kw)
    torch.testing.assert_close(out, (o_c @ o_x.transpose(1, 2)).softmax(1))
    torch.testing.assert_close(block_saliency("output", softmax=False, **kw), o_c @ o_x.transpose(1, 2))
    torch.testing.assert_close(block_saliency("cross_attention", softmax=True, **kw), cross_attention_scores(q_x, k_c))
    with pytest.raises(ValueError, match="`score_space` must be"):
        block_saliency("post_projection", softmax=True, **kw)


def test_accumulator_means_per_block_and_shape_guard():
    acc = ScoreAccumulator(blocks=(3, 7), per_block=True)
    acc.add(torch.full((1, 2, 4), 1.0), block=3)
    acc.add(torch.full((1, 2, 4), 3.0), block=7)
    acc.add(torch.full((1, 2, 4), 5.0), block=3)
    assert acc.count == 3
    torch.testing.assert_close(acc.mean(), torch.full((1, 2, 4), 3.0))
    torch.testing.assert_close(acc.block_means()[:, 0, 0, 0], torch.tensor([3.0, 3.0]))
    with pytest.raises(ValueError, match="cannot be accumulated"):
        acc.add(torch.zeros(2, 2, 4), block=3)
    acc.reset()
    with pytest.raises(RuntimeError, match="nothing has been accumulated"):
        acc.mean()
    with pytest.raises(RuntimeError, match="per_block=True"):
        ScoreAccumulator(blocks=(0,)).block_means()


def test_finalize_minmax_and_passthrough():
    scores = torch.tensor([[[2.0, 4.0, 6.0]]])
    torch.testing.assert_close(finalize_maps(scores, "minmax"), torch.tensor([[[0.0, 0.5, 1.0]]]))
    torch.testing.assert_close(finalize_maps(scores, "none"), scores)
    assert torch.equal(finalize_maps(torch.ones(1, 1, 3), "minmax"), torch.zeros(1, 1, 3))  # constant: no NaN


def test_grid_upsample_segment_and_mask():
    scores = torch.arange(6.0).view(1, 1, 6)
    grid = tokens_to_grid(scores, TokenGrid(2, 3))
    assert grid.tolist() == [[[[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]]]
    with pytest.raises(ValueError, match="do not fill a 4x2 grid"):
        tokens_to_grid(scores, TokenGrid(4, 2))
    # videos: frame-major, then row-major
    video = tokens_to_grid(torch.arange(12.0).view(1, 1, 12), TokenGrid(2, 3, frames=2))
    assert video.shape == (1, 1, 2, 2, 3) and video[0, 0, 1, 0].tolist() == [6.0, 7.0, 8.0]
    assert TokenGrid(2, 3, frames=2).num_tokens == 12 and str(TokenGrid(2, 3, frames=2)) == "2x2x3"
    const = upsample(torch.full((1, 2, 2, 3), 0.25), (4, 6))
    assert const.shape == (1, 2, 4, 6) and torch.allclose(const, torch.tensor(0.25))
    maps = torch.tensor([[[[0.9, 0.1], [0.2, 0.6]], [[0.1, 0.8], [0.7, 0.3]]]])  # (1, 2, 2, 2)
    assert segment(maps).tolist() == [[[0, 1], [1, 0]]]
    # mean of concept 0's map = 0.45 -> pixels 0.9 and 0.6 are foreground
    assert binary_mask(maps, 0).tolist() == [[[True, False], [False, True]]]


def test_gaussian_blur_hand_case():
    impulse = torch.zeros(1, 1, 3, 3)
    impulse[0, 0, 1, 1] = 1.0
    out = gaussian_blur3x3(impulse)
    w = torch.exp(torch.tensor([-0.5, 0.0, -0.5]))
    w = w / w.sum()
    torch.testing.assert_close(out[0, 0], w[:, None] * w[None, :])
    flat = gaussian_blur3x3(torch.full((2, 3, 4, 5), 2.0))
    torch.testing.assert_close(flat, torch.full((2, 3, 4, 5), 2.0))


def test_core_does_not_import_diffusers():
    code = "import sys, conceptattention.core; assert 'diffusers' not in sys.modules, 'diffusers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_half_precision_scores_upcast_in_chunks_equal_a_whole_float_product(monkeypatch):
    import conceptattention.core.scores as scores

    g = torch.Generator().manual_seed(0)
    o_c, o_x = torch.randn(2, 3, 8, generator=g).bfloat16(), torch.randn(2, 10, 8, generator=g).bfloat16()
    q_x, k_c = torch.randn(2, 2, 10, 4, generator=g).bfloat16(), torch.randn(2, 2, 3, 4, generator=g).bfloat16()
    whole_output = o_c.float() @ o_x.float().transpose(1, 2)
    whole_cross = (q_x.float() @ k_c.float().transpose(-1, -2) / 2).softmax(-1).mean(1).transpose(1, 2)
    monkeypatch.setattr(scores, "CHUNK_TOKENS", 4)  # 10 tokens -> chunks of 4, 4, 2
    torch.testing.assert_close(output_space_scores(o_c, o_x), whole_output, rtol=0, atol=1e-6)
    torch.testing.assert_close(cross_attention_scores(q_x, k_c), whole_cross, rtol=0, atol=1e-6)
    assert output_space_scores(o_c, o_x).dtype == torch.float32


@pytest.mark.parametrize("keys", ["both", "image", "concepts"])
def test_concept_attention_in_head_groups_equals_all_heads_at_once(monkeypatch, keys):
    import conceptattention.core.attention as attention

    g = torch.Generator().manual_seed(1)
    q_c, k_c, v_c = (torch.randn(2, 5, 3, 4, generator=g) for _ in range(3))
    k_x, v_x = torch.randn(2, 5, 7, 4, generator=g), torch.randn(2, 5, 7, 4, generator=g)
    whole = concept_attention(q_c, k_c, v_c, k_x, v_x, keys=keys)
    monkeypatch.setattr(attention, "MAX_LOGITS", 2 * 3 * 10 * 2)  # two heads per group: 2 + 2 + 1
    torch.testing.assert_close(concept_attention(q_c, k_c, v_c, k_x, v_x, keys=keys), whole, rtol=0, atol=1e-6)
