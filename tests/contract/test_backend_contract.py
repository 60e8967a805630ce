"""The contract every backend meets, written once and run for each :class:`BackendCase`.

Streams untouched (bit-identical), maps equal to a naive reference for every variant,
exact detach, encode/generate/trace, and a saved tiny pipeline through the eval CLI.
"""

from __future__ import annotations

import json

import PIL.Image
import pytest
import torch
from backend_cases import CASES, BackendCase
from naive_reference import capture_forward_inputs, reference_maps
from typer.testing import CliRunner

import conceptattention as ca
from conceptattention.adapters import backend_for
from conceptattention.cli import app


@pytest.fixture(params=CASES, ids=[case.name for case in CASES])
def case(request) -> BackendCase:
    return request.param


def _run(case: BackendCase, pipe, prompt="a dog on the grass near a tree", **extra):
    args = {**case.run, "output_type": "pt", **extra}
    output = pipe(prompt=prompt, generator=torch.Generator().manual_seed(3), **args)
    return output.frames if case.video else output.images


def _attention(case: BackendCase, block):
    """The block's joint attention module (``attn``; CogVideoX: ``attn1``)."""
    return getattr(block, case.attention)


def _sample(case: BackendCase, height: int, width: int, generator=None) -> torch.Tensor:
    """A random image (3, H, W), or for video models a video (F, 3, H, W), in [0, 1]."""
    shape = (3, height, width) if not case.video else (case.frames, 3, height, width)
    return torch.rand(shape, generator=generator)


def _encode(case: BackendCase, pipe, item, concepts, **kwargs):
    if case.video:
        return ca.encode_video(pipe, item, concepts, **case.encode_options, **kwargs)
    return ca.encode_image(pipe, item, concepts, **kwargs)


def _model_pixels(case: BackendCase, item: torch.Tensor) -> torch.Tensor:
    """What the pipeline feeds its VAE for a [0, 1] sample: 8-bit quantised, in [-1, 1], (1, 3, [F,] H, W)."""
    pixels = (item * 255).round() / 127.5 - 1
    return pixels[None] if not case.video else pixels.permute(1, 0, 2, 3)[None]


def _capture_block_outputs(blocks):
    records, handles = [], []
    for block in blocks:

        def keep(module, args, out):
            outputs = out if isinstance(out, tuple) else (out,)
            records.append([o.clone() for o in outputs if o is not None])  # SD3's last block returns no text

        handles.append(block.register_forward_hook(keep))
    return records, handles


@pytest.mark.parametrize(
    ("prompt", "extra"),
    [
        pytest.param(["a dog", "a cat under the sky"], {}, id="batch2"),
        pytest.param("a dog", {"height": 48, "width": 16, "per_prompt": 2}, id="nonsquare-per-prompt"),
    ],
)
def test_image_and_text_streams_are_bit_identical(case, prompt, extra):
    pipe = case.pipeline()
    extra = dict(extra)
    if "per_prompt" in extra:
        extra["num_videos_per_prompt" if case.video else "num_images_per_prompt"] = extra.pop("per_prompt")
    blocks = case.blocks(pipe.transformer)
    records, handles = _capture_block_outputs(blocks)
    try:
        plain = _run(case, pipe, prompt, **extra)
        plain_blocks = list(records)
        records.clear()
        with ca.trace(pipe, ["dog", "grass", "sky"], layers=list(case.layers)) as tc:
            traced = _run(case, pipe, prompt, **extra)
        traced_blocks = list(records)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(plain, traced)
    forwards = case.run["num_inference_steps"] * case.forwards_per_step
    assert len(plain_blocks) == len(traced_blocks) == forwards * len(blocks)
    for a, b in zip(plain_blocks, traced_blocks):
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    maps = tc.maps()
    assert maps.maps.shape[0] == plain.shape[0]  # one map set per image (conditional half under batched CFG)
    assert maps.image_size == tuple(plain.shape[-2:])
    if case.video:  # (B, F, 3, H, W) videos: maps on the token frames, for every decoded frame
        assert maps.maps.ndim == 5 and maps.num_frames == plain.shape[1] == case.frames


VARIANTS = [
    pytest.param({}, ["dog", "grass", "tree"], id="default"),
    pytest.param({"concept_keys": "image"}, ["dog", "grass", "tree"], id="keys-image"),
    pytest.param({"concept_keys": "concepts"}, ["dog", "grass", "tree"], id="keys-concepts"),
    pytest.param({"softmax": False}, ["dog", "grass", "tree"], id="no-softmax"),
    pytest.param({"score_space": "cross_attention"}, ["dog", "grass", "tree"], id="cross-attention"),
    pytest.param({"score_space": "cross_attention", "softmax": False}, ["dog", "sky"], id="cross-no-softmax"),
    pytest.param({"score_space": "value"}, ["dog", "grass", "tree"], id="value"),
    pytest.param({"score_space": "value", "concept_keys": "image"}, ["dog", "sky"], id="value-keys-image"),
    pytest.param({"pooling": "mean"}, ["skyscraper", "dog"], id="pooling-mean"),
    pytest.param({"pooling": "first"}, ["skyscraper", "dog"], id="pooling-first-multitoken"),
    pytest.param({}, ["dog"], id="single-concept-minmax"),
    pytest.param({"layers": [1], "steps": [1]}, ["dog", "sky"], id="one-layer-one-step"),
    pytest.param({"layers": [0, 2]}, ["dog", "sky", "cat", "tree"], id="layers-0-2"),
]


@pytest.mark.parametrize(("options", "concepts"), VARIANTS)
def test_generate_maps_match_naive_reference(case, options, concepts):
    pipe = case.pipeline()
    layers = options.get("layers", list(case.layers))
    records, _ = capture_forward_inputs(pipe.transformer, lambda: _run(case, pipe))
    records = records[:: case.forwards_per_step]  # the first forward of each step (not a negative pass)
    expected = reference_maps(
        case.arch, pipe, records, concepts, **{**options, "layers": layers}, conditional_half=case.conditional_half
    )
    with ca.trace(pipe, concepts, **{**options, "layers": layers}) as tc:
        _run(case, pipe)
    maps = tc.maps()
    got = maps.maps.flatten(2)  # (B, C, N)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert maps.metadata["layers"] == layers
    assert maps.metadata["steps"] == list(options.get("steps", [0, 1]))
    # the reference is not trivially constant: maps differ between concepts and patches
    assert got.std() > 1e-3


def test_score_space_changes_only_the_score_not_the_concept_tokens(case):
    pipe = case.pipeline()
    streams: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for space in ("output", "value", "cross_attention"):
        blocks = streams[space] = []
        with ca.trace(pipe, ["dog", "sky"], layers=list(case.layers), score_space=space) as tc:
            tc.on_block(lambda record, kept=blocks: kept.append((record.block, record.concept_tokens.clone())))
            _run(case, pipe)
    steps = case.run["num_inference_steps"]
    assert [b for b, _ in streams["output"]] == list(range(max(case.layers) + 1)) * steps  # every block, every step
    for other in ("value", "cross_attention"):
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(streams["output"], streams[other], strict=True))


@pytest.mark.parametrize("case", [c for c in CASES if c.pooled_text], ids=lambda c: c.name)
def test_concept_conditioning_uses_a_zero_pooled_text_input(case):
    pipe = case.pipeline()
    calls = []
    hook = pipe.transformer.time_text_embed.register_forward_hook(lambda m, args, out: calls.append(args[-1]))
    try:
        _run(case, pipe, num_inference_steps=1)
        plain_calls = len(calls)
        calls.clear()
        with ca.trace(pipe, ["dog", "sky"], layers=list(case.layers)):
            _run(case, pipe, num_inference_steps=1)
    finally:
        hook.remove()
    assert len(calls) == plain_calls + 1  # the real conditioning, then the concepts' own
    real_pooled, concept_pooled = calls[0], calls[-1]
    assert real_pooled.abs().sum() > 0 and torch.equal(concept_pooled, torch.zeros_like(concept_pooled))


def test_detach_restores_processors_and_hooks_even_after_an_exception(case):
    pipe = case.pipeline()
    transformer = pipe.transformer
    backend = backend_for(transformer)
    before = dict(transformer.attn_processors)
    with pytest.raises(KeyboardInterrupt), ca.trace(pipe, ["dog", "sky"], layers=list(case.layers)):
        assert isinstance(_attention(case, transformer.transformer_blocks[0]).processor, backend.stream.processor)
        _run(case, pipe, num_inference_steps=1)
        raise KeyboardInterrupt
    after = transformer.attn_processors
    assert before.keys() == after.keys()
    assert all(after[k] is v for k, v in before.items())
    modules = [transformer, *transformer.modules()]
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in modules)


def test_nested_trace_is_refused(case):
    pipe = case.pipeline()
    backend = backend_for(pipe.transformer)
    with (
        ca.trace(pipe, ["dog"]),
        pytest.raises(ca.ConceptAttentionError, match="already attached"),
        ca.trace(pipe, ["sky"]),
    ):
        pass
    assert not any(isinstance(p, backend.stream.processor) for p in pipe.transformer.attn_processors.values())


class _DelegatingProcessor:
    """A user's custom processor (here: it only calls the stock one)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        extra = {} if image_rotary_emb is None else {"image_rotary_emb": image_rotary_emb}
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **extra)


def test_custom_processor_on_a_traced_block_is_refused_and_left_in_place(case):
    pipe = case.fresh_pipeline()
    attn = _attention(case, pipe.transformer.transformer_blocks[1])
    custom = _DelegatingProcessor(attn.processor)
    attn.processor = custom
    with (
        pytest.raises(ca.ConceptAttentionError, match="IP-Adapter, fused-projection and custom processors"),
        ca.trace(pipe, ["dog"], layers=[1]),
    ):
        pass
    assert attn.processor is custom
    assert not any(m._forward_pre_hooks for m in pipe.transformer.modules())
    with ca.trace(pipe, ["dog", "sky"], layers=[0]) as tc:  # blocks after the last traced one are not touched
        _run(case, pipe, num_inference_steps=1)
    assert tc.maps().metadata["layers"] == [0]


def test_encode_averages_every_noise_sample_and_matches_reference(case):
    pipe = case.pipeline()
    image = _sample(case, 32, 48)
    concepts = ["dog", "grass", "sky"]
    captured = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: captured.append(dict(kw)), with_kwargs=True)
    try:
        maps = _encode(
            case, pipe, image, concepts, height=32, width=48, num_samples=3, seed=7, t=0.5, layers=[1, 2], max_batch=1
        )
    finally:
        handle.remove()
    assert len(captured) == 3
    # each draw really is x_t of the model's noising rule with a fresh eps from the seeded generator
    with torch.no_grad():
        z = case.clean_latents(pipe, _model_pixels(case, image))
    generator = torch.Generator().manual_seed(7)
    for record in captured:
        eps = torch.randn(z.shape, generator=generator)
        expected = case.encoded_latents(pipe, case.noised(pipe, z, eps, 0.5))
        torch.testing.assert_close(record["hidden_states"], expected, rtol=0, atol=1e-5)
        assert float(record["timestep"][0]) == case.encoded_timestep(0.5)
    # maps = mean over samples of the reference on each captured (untraced) forward
    per_sample = []
    with torch.inference_mode():  # captured tensors are inference tensors
        for record in captured:
            recs, _ = capture_forward_inputs(pipe.transformer, lambda r=record: pipe.transformer(**r))
            per_sample.append(reference_maps(case.arch, pipe, recs, concepts, layers=[1, 2]))
    torch.testing.assert_close(maps.maps.flatten(2), torch.stack(per_sample).mean(0), rtol=0, atol=1e-5)
    meta = maps.metadata
    assert meta["num_samples"] == 3 and meta["t"] == 0.5 and meta["mode"] == "encode"
    assert maps.image_size == (32, 48)
    first = maps.images[0][0] if case.video else maps.images[0]
    assert first.size == (48, 32)
    if case.video:
        assert len(maps.images[0]) == maps.num_frames == case.frames and maps.maps.ndim == 5


@pytest.mark.parametrize("seed", [11, [11, 12]], ids=["one-seed", "per-image-seeds"])
def test_batched_noise_draws_equal_sequential_forwards(case, seed):
    pipe = case.pipeline()
    g = torch.Generator().manual_seed(0)
    images = [_sample(case, 32, 32, g), _sample(case, 32, 32, g)]
    kwargs = {"height": 32, "width": 32, "num_samples": 3, "seed": seed, "per_block": True, "layers": [0, 2]}
    batches = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: batches.append(kw["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        results = {n: _encode(case, pipe, images, ["dog", "sky", "grass"], max_batch=n, **kwargs) for n in (1, 2, 4, 6)}
    finally:
        hook.remove()
    assert batches == [1] * 6 + [2] * 3 + [4, 2] + [6]  # 2 images x 3 draws in rows of at most max_batch
    sequential = results[1]
    assert sequential.metadata["max_batch"] == 1 and results[4].metadata["max_batch"] == 4
    for n in (2, 4, 6):
        torch.testing.assert_close(results[n].maps, sequential.maps, rtol=0, atol=1e-6)
        torch.testing.assert_close(results[n].block_maps, sequential.block_maps, rtol=0, atol=1e-6)
    assert (sequential.maps[0] - sequential.maps[1]).abs().max() > 1e-3  # the two images' maps differ
    default = _encode(case, pipe, images, ["dog", "sky", "grass"], **kwargs)
    assert default.metadata["max_batch"] == 4  # the CPU default
    torch.testing.assert_close(default.maps, sequential.maps, rtol=0, atol=1e-6)
    with pytest.raises(ca.ConceptAttentionError, match="`max_batch` must be a positive integer, got 0"):
        _encode(case, pipe, images, ["dog", "sky"], max_batch=0, **kwargs)


def test_encode_stops_after_the_last_selected_block(case):
    pipe = case.pipeline()
    blocks = case.blocks(pipe.transformer)
    calls = []
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: calls.append(i)) for i, b in enumerate(blocks)]
    try:
        _encode(case, pipe, _sample(case, 32, 32), ["dog", "sky"], height=32, width=32, layers=[1])
    finally:
        for h in handles:
            h.remove()
    assert calls == [0, 1]


def test_generate_returns_images_maps_and_record(case):
    pipe = case.pipeline()
    run = {k: v for k, v in case.run.items() if k not in ("height", "width", "num_inference_steps")}
    maps = ca.generate(pipe, "a dog on the grass", ["dog", "grass", "sky"], num_inference_steps=3, height=32,
                       width=64, seed=5, config=ca.ConceptAttentionConfig(steps=[1, 2], layers=list(case.layers)),
                       **run)  # fmt: skip
    first = maps.images[0][0] if case.video else maps.images[0]
    assert len(maps.images) == 1 and first.size == (64, 32)
    meta = maps.metadata
    backend = backend_for(pipe.transformer)
    assert meta["architecture"] == backend.spec.name and meta["mode"] == "generate"
    assert meta["steps"] == [1, 2] and len(meta["timesteps"]) == 2 and 1 >= meta["timesteps"][0] > meta["timesteps"][1]
    assert meta["seed"] == 5 and meta["prompt"] == "a dog on the grass" and meta["num_inference_steps"] == 3
    assert meta["normalization"] == "softmax" and meta["pooling"] == "first" and meta["score_space"] == "output"
    assert meta["concept_tokens"]["dog"] and meta["concept_encoder"].startswith(backend.spec.concept_encoders[0])
    assert meta["concept_positions"] == backend.spec.concept_positions
    assert ("conditional half" in meta["cfg"]) == case.conditional_half
    assert meta["versions"]["diffusers"] and meta["versions"]["torch"]
    pixels = backend.encoding.pixels_per_token(pipe)
    assert maps.maps.shape[-2:] == (32 // pixels, 64 // pixels)
    torch.testing.assert_close(maps.maps.sum(1), torch.ones(1, *maps.maps.shape[2:]))  # softmax over concepts, mean


def test_default_layers_are_valid_and_recorded(case):
    pipe = case.pipeline()
    backend = backend_for(pipe.transformer)
    defaults = backend.default_layers(pipe.transformer)
    assert defaults and not set(defaults) & set(backend.excluded_blocks(pipe.transformer))
    with ca.trace(pipe, ["dog", "sky"]) as tc:
        _run(case, pipe, num_inference_steps=1)
    assert tc.maps().metadata["layers"] == list(defaults)
    assert tc.maps().metadata["default_layers"] == backend.spec.default_layers


def test_saved_pipeline_loads_and_runs_the_eval_cli(case, tmp_path):
    pipe = case.pipeline()
    pipe.save_pretrained(tmp_path / "model")
    loaded = ca.load_pipeline(tmp_path / "model")
    assert type(loaded) is type(pipe)
    sample = _sample(case, 32, 32, torch.Generator().manual_seed(0))
    from_disk = _encode(case, loaded, sample, ["dog", "sky"], height=32, width=32)
    in_memory = _encode(case, pipe, sample, ["dog", "sky"], height=32, width=32)
    torch.testing.assert_close(from_disk.maps, in_memory.maps, rtol=0, atol=1e-6)
    assert from_disk.metadata["model"] == str(tmp_path / "model")
    out = tmp_path / "eval"
    if case.video:
        _check_video_model_on_the_cli(case, tmp_path / "model", sample, in_memory, tmp_path)
        return
    result = CliRunner().invoke(
        app, ["eval", "scenes", "--model", str(tmp_path / "model"), "--limit", "4", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "records.rank0.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["layers"] == list(backend_for(pipe.transformer).default_layers(
        pipe.transformer)) for r in records)  # fmt: skip
    report = (out / "report.md").read_text()
    assert "concept_attention" in report


def _check_video_model_on_the_cli(case: BackendCase, model, sample, in_memory, tmp_path):
    """A video model from disk: `encode` maps a video file; `eval` (image datasets) refuses it in one line."""
    from conceptattention.videos import write_video

    frames = [(frame * 255).round().byte().permute(1, 2, 0).numpy() for frame in sample]
    clip = write_video(tmp_path / "clip.mp4", frames, fps=8)
    out = tmp_path / "encoded"
    args = ["encode", str(clip), "--model", str(model), "-c", "dog,sky", "--height", "32", "--width", "32"]
    args += [f"--{key.replace('_', '-')}={value}" for key, value in case.encode_options.items()]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = ca.ConceptMaps.load(out)
    assert saved.maps.shape == in_memory.maps.shape and saved.num_frames == case.frames
    assert (out / "overlay_grid.mp4").is_file() or (out / "overlay_grid.gif").is_file()
    result = CliRunner().invoke(app, ["eval", "scenes", "--model", str(model), "--out", str(tmp_path / "e")])
    message = " ".join(result.output.split())  # rich wraps long lines
    name = backend_for(case.pipeline().transformer).spec.name
    assert result.exit_code == 2 and f"is a video model ({name})" in message and "Traceback" not in message
    image = tmp_path / "still.png"
    PIL.Image.new("RGB", (32, 32)).save(image)
    result = CliRunner().invoke(app, ["encode", str(image), "-m", str(model), "-c", "dog", "-o", str(tmp_path / "i")])
    message = " ".join(result.output.split())
    assert result.exit_code == 2 and "is a video model" in message and "is a single image" in message
