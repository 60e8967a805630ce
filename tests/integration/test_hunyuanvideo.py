"""HunyuanVideo specifics beyond the contract suite: concepts through the token refiner alone, temporal patches.

Maps equal to the naive reference (masked prompts of different lengths, every variant) and bfloat16 are
checked for every backend in ``tests/contract/``.
"""

from __future__ import annotations

import pytest
import torch
from naive_reference import HUNYUAN_VIDEO, capture_forward_inputs, reference_maps
from tiny_hunyuanvideo import make_tiny_hunyuanvideo_pipeline, make_tiny_hunyuanvideo_transformer

import conceptattention as ca
from conceptattention.adapters import backend_for
from conceptattention.adapters.base import ConceptEncoding, ForwardRecord
from conceptattention.adapters.hunyuanvideo import ConceptSequences, HunyuanConditioning
from conceptattention.core import TokenGrid
from conceptattention.errors import ConceptAttentionError

RUN = {"height": 32, "width": 48, "num_frames": 5, "num_inference_steps": 2, "output_type": "pt",
       "max_sequence_length": 16}  # fmt: skip
PROMPTS = ["a dog", "a small brown dog sitting on the green grass under the blue sky"]  # different lengths: masked
GRID = (2, 4, 6)  # token frames, rows, columns of a 5-frame 32 x 48 video (VAE /4 in space and time, patch 2)


@pytest.fixture(scope="module")
def pipe():
    return make_tiny_hunyuanvideo_pipeline(seed=0, num_layers=2, num_single_layers=1)


def _run(pipe, prompt=PROMPTS, **extra):
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(3), **{**RUN, **extra}).frames


def _block_outputs(blocks):
    records = []

    def keep(module, args, out):
        records.append([o.clone() for o in out])

    return records, [b.register_forward_hook(keep) for b in blocks]


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({}, id="batch2"),
        pytest.param({"height": 48, "width": 16, "true_cfg_scale": 3.0, "negative_prompt": "grass"}, id="true-cfg"),
    ],
)
def test_video_and_text_streams_are_bit_identical(pipe, extra):
    """Every double and single block's video and text outputs and the decoded video, with and without tracing."""
    blocks = [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]
    records, handles = _block_outputs(blocks)
    try:
        plain = _run(pipe, **extra)
        plain_blocks = list(records)
        records.clear()
        with ca.trace(pipe, ["dog", "grass", "sky"], layers=[0, 1]) as tc:
            traced = _run(pipe, **extra)
        traced_blocks = list(records)
    finally:
        for handle in handles:
            handle.remove()
    forwards = 2 * (2 if "true_cfg_scale" in extra else 1)  # steps x (prompt [+ negative prompt])
    assert len(plain_blocks) == len(traced_blocks) == forwards * len(blocks)
    assert all(torch.equal(x, y) for a, b in zip(plain_blocks, traced_blocks) for x, y in zip(a, b))
    assert torch.equal(plain, traced) and plain.shape[:2] == (2, 5)
    maps = tc.maps()
    height, width = extra.get("height", 32), extra.get("width", 48)
    assert maps.maps.shape == (2, 3, 2, height // 8, width // 8)  # one map set per video, frame-major tokens
    assert maps.metadata["cfg"].startswith("first forward of each step")


def test_temporal_patches_give_fewer_token_frames():
    """patch_size_t = 2: two latent frames form one token frame; maps still equal the reference."""
    pipe = make_tiny_hunyuanvideo_pipeline(seed=4, num_layers=2, num_single_layers=1, patch_size_t=2)
    assert backend_for(pipe.transformer).frames.frame_layout(pipe) == (4, 2)
    records, plain = capture_forward_inputs(pipe.transformer, lambda: _run(pipe, "a dog", num_frames=13))
    expected = reference_maps(HUNYUAN_VIDEO, pipe, records, ["dog", "sky"], layers=[0, 1])
    with ca.trace(pipe, ["dog", "sky"], layers=[0, 1]) as tc:
        traced = _run(pipe, "a dog", num_frames=13)
    assert torch.equal(plain, traced)
    assert tc.maps().maps.shape == (1, 2, 2, 4, 6)  # 13 frames: 4 latent frames, 2 token frames
    torch.testing.assert_close(tc.maps().maps.flatten(2), expected, rtol=0, atol=1e-5)


def test_concept_conditioning_is_time_and_guidance_with_a_zero_pooled_input(pipe):
    calls = []
    hook = pipe.transformer.time_text_embed.register_forward_hook(
        lambda m, args, kwargs, out: calls.append((args, kwargs, out[0])), with_kwargs=True
    )
    try:
        with ca.trace(pipe, ["dog", "sky"], layers=[0, 1]):
            _run(pipe, num_inference_steps=1, guidance_scale=4.5)
    finally:
        hook.remove()
    (real_args, _, real), (concept_args, concept_kwargs, concept) = calls
    assert real_args[1].abs().sum() > 0  # the prompt's pooled CLIP
    assert torch.equal(concept_args[1], torch.zeros_like(real_args[1]))
    assert torch.equal(concept_args[0], real_args[0])  # the forward's timestep (0-1000 scale)
    assert torch.equal(concept_kwargs["guidance"], real_args[2]) and float(real_args[2][0]) == 4500.0
    assert (concept - real).abs().max() > 1e-3


def _refined_alone(pipe, concept, timestep, pooling="first"):
    """One concept through the pipeline's prompt path and the refiner on its own, its span pooled."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    hidden, mask = pipe._get_llama_prompt_embeds([concept], DEFAULT_PROMPT_TEMPLATE, max_sequence_length=256)
    refined = pipe.transformer.context_embedder(hidden, torch.tensor([timestep]), mask)[0]
    own = refined[: len(pipe.tokenizer(concept, add_special_tokens=False).input_ids)]
    return own[0] if pooling == "first" else own.mean(0)


def _embedded(pipe, concepts, timesteps, pooling="first"):
    backend = backend_for(pipe.transformer)
    embeddings = backend.concepts(pipe, concepts, ConceptEncoding(pooling=pooling))
    assert isinstance(embeddings.extras, ConceptSequences)
    timestep = torch.tensor(timesteps)
    shared = len(timesteps) == 1  # one timestep given for the batch: every row shares it
    conditioning = HunyuanConditioning(timestep, None, torch.zeros(len(timesteps), 12), shared_timestep=shared)
    record = ForwardRecord(timestep[0], 1000.0, TokenGrid(4, 6, 2), slice(None), conditioning)
    with torch.no_grad():
        return backend.stream.embed(pipe.transformer, embeddings.extras, record), embeddings


@pytest.mark.parametrize("pooling", ["first", "mean"])
def test_each_concept_goes_through_the_refiner_alone_at_the_forwards_timestep(pipe, pooling):
    concepts = ["skyscraper", "dog", "traffic light"]
    tokens, embeddings = _embedded(pipe, concepts, [700.0], pooling)
    assert tokens.shape == (3, 32)
    sequences = embeddings.extras
    assert sequences.states.shape[1] == int(sequences.mask.sum(1).max())  # padding beyond the longest trimmed
    assert [stop - start for start, stop in sequences.spans] == [len(t) for t in embeddings.tokens]
    assert [start for start, _ in sequences.spans] == [0, 0, 0]  # the template prefix is cropped away
    for row, concept in enumerate(concepts):
        torch.testing.assert_close(tokens[row], _refined_alone(pipe, concept, 700.0, pooling), rtol=0, atol=1e-5)
    later, _ = _embedded(pipe, concepts, [100.0], pooling)
    assert (later - tokens).abs().max() > 1e-3  # the refiner takes the timestep


def test_rows_at_different_timesteps_get_their_own_concept_tokens(pipe):
    tokens, _ = _embedded(pipe, ["dog", "sky"], [700.0, 100.0])
    assert tokens.shape == (2, 2, 32)
    for row, t in enumerate((700.0, 100.0)):
        for col, concept in enumerate(["dog", "sky"]):
            torch.testing.assert_close(tokens[row, col], _refined_alone(pipe, concept, t), rtol=0, atol=1e-5)


def test_the_refiner_runs_on_the_concepts_at_every_traced_forward(pipe):
    calls = []
    hook = pipe.transformer.context_embedder.register_forward_pre_hook(lambda m, args: calls.append(args))
    try:
        with ca.trace(pipe, ["dog", "grass", "skyscraper"], layers=[0, 1]):
            _run(pipe, "a dog")
    finally:
        hook.remove()
    assert len(calls) == 4  # per step: the prompt, then the concepts
    for prompt_call, concept_call in (calls[0:2], calls[2:4]):
        hidden, timestep, mask = concept_call
        assert hidden.shape[0] == 3 and hidden.shape[1] == 8 < prompt_call[0].shape[1]  # "skyscraper" + <|eot_id|>
        assert torch.equal(timestep, prompt_call[1][:1].expand(3))
        assert mask.sum(1).tolist() == [2, 2, 8]
    assert float(calls[0][1][0]) > float(calls[2][1][0])  # two different timesteps


def test_concepts_do_not_see_each_other(pipe):
    """Concept A's map does not change when concept B is replaced (keys = image only, no softmax)."""
    options = {"layers": [0, 1], "concept_keys": "image", "softmax": False}
    maps = {}
    for other in ("sky", "skyscraper"):  # a replacement of another length: padding differs too
        with ca.trace(pipe, ["dog", other], **options) as tc:
            _run(pipe)
        maps[other] = tc.maps().maps
    torch.testing.assert_close(maps["sky"][:, 0], maps["skyscraper"][:, 0], rtol=0, atol=1e-6)
    assert (maps["sky"][:, 1] - maps["skyscraper"][:, 1]).abs().max() > 1e-3
    with ca.trace(pipe, ["dog", "sky"], layers=[0, 1], softmax=False) as tc:  # keys [concepts; video]: A sees B
        _run(pipe)
    assert (tc.maps().maps[:, 0] - maps["sky"][:, 0]).abs().max() > 1e-4


def test_detach_restores_processors_and_hooks_after_an_exception(pipe):
    transformer = pipe.transformer
    before = dict(transformer.attn_processors)
    with pytest.raises(KeyboardInterrupt), ca.trace(pipe, ["dog", "sky"], layers=[0]):
        names = [n for n, p in transformer.attn_processors.items() if p is not before[n]]
        assert names == ["transformer_blocks.0.attn.processor"]  # only the traced double block
        _run(pipe, num_inference_steps=1)
        raise KeyboardInterrupt
    after = transformer.attn_processors
    assert before.keys() == after.keys() and all(after[k] is v for k, v in before.items())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in [transformer, *transformer.modules()])


def test_default_layers_are_the_later_half_and_recorded():
    pipe = make_tiny_hunyuanvideo_pipeline(seed=1, num_layers=4, num_single_layers=1)
    backend = backend_for(pipe.transformer)
    assert backend.default_layers(pipe.transformer) == (2, 3) and backend.excluded_blocks(pipe.transformer) == {}
    with ca.trace(pipe, ["dog", "sky"]) as tc:
        _run(pipe, "a dog", num_inference_steps=1)
    meta = tc.maps().metadata
    assert meta["layers"] == [2, 3] and meta["default_layers"] == backend.spec.default_layers
    assert meta["concept_positions"] == "none (no RoPE on text)" and meta["architecture"] == "HunyuanVideo"
    assert meta["concept_tokens"] == {"dog": ["dog"], "sky": ["sky"]} and "token refiner" in meta["concept_encoder"]


@pytest.mark.parametrize("num_single_layers", [1, 0])
def test_the_last_double_blocks_text_queries_are_trained_only_when_single_blocks_follow(num_single_layers):
    """A backward pass: with single blocks after it the last double block's text query gets a gradient."""
    transformer = make_tiny_hunyuanvideo_transformer(seed=2, num_layers=2, num_single_layers=num_single_layers)
    g = torch.Generator().manual_seed(0)
    out = transformer(
        hidden_states=torch.randn(1, 4, 2, 8, 8, generator=g),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 5, 16, generator=g),
        encoder_attention_mask=torch.ones(1, 5),
        pooled_projections=torch.randn(1, 12, generator=g),
        guidance=torch.tensor([6000.0]),
        return_dict=False,
    )[0]
    out.square().sum().backward()
    grad = transformer.transformer_blocks[-1].attn.add_q_proj.weight.grad
    excluded = backend_for(transformer).excluded_blocks(transformer)
    if num_single_layers:
        assert grad.abs().sum() > 0 and excluded == {}
    else:
        assert grad is None or grad.abs().sum() == 0
        assert list(excluded) == [1] and "feeds nothing" in excluded[1]


def test_generate_returns_frames_and_video_maps(pipe):
    maps = ca.generate(pipe, "a dog on the grass", ["dog", "grass", "sky"], num_inference_steps=2, height=32,
                       width=48, num_frames=5, max_sequence_length=16, seed=5)  # fmt: skip
    assert maps.maps.shape == (1, 3, *GRID) and maps.num_frames == 5 and maps.fps == 24.0
    assert len(maps.images) == 1 and len(maps.images[0]) == 5 and maps.images[0][0].size == (48, 32)
    torch.testing.assert_close(maps.maps.sum(1), torch.ones(1, *GRID))  # softmax over concepts, then mean
    meta = maps.metadata
    assert meta["architecture"] == "HunyuanVideo" and meta["layers"] == [1] and meta["grid"] == list(GRID)
    assert len(meta["timesteps"]) == 2 and 1 >= meta["timesteps"][0] > meta["timesteps"][1] > 0


def test_encode_video_passes_the_embedded_guidance_and_the_caption(pipe):
    """Encode forwards carry the guidance embedding's input (6.0 x 1000) and the caption's text."""
    video = torch.rand(5, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    captured = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: captured.append(dict(kw)), with_kwargs=True)
    try:
        maps = ca.encode_video(pipe, video, ["dog", "sky"], caption="a dog", num_frames=5, height=32, width=48,
                               num_samples=2, seed=7, layers=[0, 1], max_batch=1)  # fmt: skip
    finally:
        hook.remove()
    assert maps.maps.shape == (1, 2, *GRID) and len(captured) == 2
    prompt_embeds = pipe.encode_prompt("a dog", max_sequence_length=256)[0]
    for record in captured:
        assert float(record["timestep"][0]) == 500.0 and float(record["guidance"][0]) == 6000.0
        torch.testing.assert_close(record["encoder_hidden_states"], prompt_embeds, rtol=0, atol=1e-6)
    assert maps.metadata["guidance_scale"] == 6.0


def test_concept_truncated_by_the_budget_is_a_clear_error(pipe):
    backend = backend_for(pipe.transformer)
    with pytest.raises(ConceptAttentionError, match=r"do not occur in its encoded sequence.*max_sequence_length"):
        backend.concepts(pipe, ["skyscraper"], ConceptEncoding(pooling="first", max_sequence_length=3))


@pytest.mark.parametrize("part", ["text_encoder", "tokenizer"])
def test_pipeline_without_the_llama_encoder_says_what_is_missing(part):
    pipe = make_tiny_hunyuanvideo_pipeline(seed=0, num_layers=1, num_single_layers=1)
    setattr(pipe, part, None)
    with pytest.raises(ConceptAttentionError, match=f"without `{part}`.*Llama prompt encoder"), ca.trace(pipe, ["dog"]):
        pass


def test_token_replace_image_to_video_transformers_are_refused():
    pipe = make_tiny_hunyuanvideo_pipeline(seed=0, num_layers=1, num_single_layers=1)
    pipe.transformer = make_tiny_hunyuanvideo_transformer(
        seed=0, num_layers=1, num_single_layers=1, image_condition_type="token_replace"
    )
    with pytest.raises(ConceptAttentionError, match="token_replace"), ca.trace(pipe, ["dog"]):
        pass
    assert not any(m._forward_pre_hooks for m in pipe.transformer.modules())


def test_overhead_benchmark_runs_the_refiner_path():
    """`benchmarks/overhead.py --arch hunyuanvideo` (CPU smoke size) reports self-consistent numbers."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "overhead.py"
    args = ["--arch", "hunyuanvideo", "--repeats", "3", "--warmup", "0", "--hidden", "64", "--heads", "2", "--grid",
            "8", "--frames", "2", "--text-tokens", "16", "--text-dim", "32"]  # fmt: skip
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["config"]["image_tokens"] == 2 * 4 * 4 and result["config"]["traced_blocks"] == [0, 1, 2, 3]
    assert result["peak_traced_mb"] == pytest.approx(result["peak_mem_ratio"] * result["peak_plain_mb"], abs=0.02)
    assert result["traced_ms_median"] > 0 and result["overhead_ratio"] > 0
