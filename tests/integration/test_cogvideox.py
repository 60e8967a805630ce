"""CogVideoX beyond the contract suite: guidance layouts, schedulers, video-to-video, video files, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from backend_cases import CASES_BY_NAME
from diffusers import CogVideoXDPMScheduler, CogVideoXVideoToVideoPipeline
from naive_reference import COGVIDEOX, capture_forward_inputs, reference_maps
from tiny_cogvideox import make_tiny_cogvideox_pipeline, make_tiny_cogvideox_transformer

import conceptattention as ca
from conceptattention.plan import call_plan
from conceptattention.videos import load_video, write_video

RUN = {"height": 32, "width": 48, "num_frames": 9, "max_sequence_length": 16}
CONCEPTS = ["dog", "grass", "sky"]


@pytest.fixture(scope="module")
def pipe():
    return CASES_BY_NAME["cogvideox"].pipeline()


def _call(pipe, **extra):
    args = {**RUN, "num_inference_steps": 2, "output_type": "pt", **extra}
    return pipe(prompt="a dog on the grass", generator=torch.Generator().manual_seed(1), **args).frames


def _traced_and_reference(pipe, conditional_half, **extra):
    records, plain = capture_forward_inputs(pipe.transformer, lambda: _call(pipe, **extra))
    expected = reference_maps(COGVIDEOX, pipe, records, CONCEPTS, layers=[0, 1, 2], conditional_half=conditional_half)
    with ca.trace(pipe, CONCEPTS, layers=[0, 1, 2]) as tc:
        traced = _call(pipe, **extra)
    assert torch.equal(plain, traced)
    return tc.maps(), expected, records


@pytest.mark.parametrize(
    ("extra", "batched"),
    [
        pytest.param({"guidance_scale": 1.0}, False, id="no-guidance"),
        pytest.param({"guidance_scale": 6.0}, True, id="guidance"),
        pytest.param({"guidance_scale": 6.0, "use_dynamic_cfg": True}, True, id="dynamic-guidance"),
    ],
)
def test_maps_describe_the_conditional_half_exactly_when_guidance_batches(pipe, extra, batched):
    maps, expected, records = _traced_and_reference(pipe, batched, **extra)
    assert records[0]["forward"]["hidden_states"].shape[0] == (2 if batched else 1)
    torch.testing.assert_close(maps.maps.flatten(2), expected, rtol=0, atol=1e-5)
    assert ("conditional half" in maps.metadata["cfg"]) == batched
    if batched:  # and not the unconditional half, which differs
        uncond = reference_maps(COGVIDEOX, pipe, records, CONCEPTS, layers=[0, 1, 2], rows=slice(0, 1))
        assert (uncond - expected).abs().max() > 1e-4


def test_dpm_scheduler_steps_are_counted_without_a_step_index():
    pipe = make_tiny_cogvideox_pipeline(seed=0, num_layers=3)
    pipe.scheduler = CogVideoXDPMScheduler.from_config(pipe.scheduler.config)
    assert not hasattr(pipe.scheduler, "step_index")
    records, _ = capture_forward_inputs(pipe.transformer, lambda: _call(pipe, num_inference_steps=3))
    expected = reference_maps(COGVIDEOX, pipe, records, CONCEPTS, layers=[1], steps=[2], conditional_half=True)
    with ca.trace(pipe, CONCEPTS, layers=[1], steps=[2]) as tc:
        _call(pipe, num_inference_steps=3)
    maps = tc.maps()
    assert maps.metadata["steps"] == [2] and maps.metadata["num_steps_run"] == 3
    timestep = float(records[2]["forward"]["timestep"][0])
    assert maps.metadata["timesteps"] == [timestep / 1000]
    torch.testing.assert_close(maps.maps.flatten(2), expected, rtol=0, atol=1e-5)


def test_video_to_video_counts_steps_from_the_first_one_run(pipe):
    v2v = CogVideoXVideoToVideoPipeline(**pipe.components)
    video = [np.asarray(frame) for frame in _frames(9)]
    run = {**RUN, "num_inference_steps": 4, "strength": 0.5, "output_type": "pt"}
    run.pop("num_frames")
    go = lambda: v2v(video=video, prompt="a dog", generator=torch.Generator().manual_seed(0), **run).frames  # noqa: E731
    records, plain = capture_forward_inputs(v2v.transformer, go)
    expected = reference_maps(COGVIDEOX, v2v, records, CONCEPTS, layers=[0, 2], conditional_half=True)
    with ca.trace(v2v, CONCEPTS, layers=[0, 2]) as tc:
        traced = go()
    assert torch.equal(plain, traced)
    maps = tc.maps(images=None)
    assert len(records) == 2 and maps.metadata["steps"] == [0, 1]
    torch.testing.assert_close(maps.maps.flatten(2), expected, rtol=0, atol=1e-5)


def _frames(count: int, size=(32, 48)):
    """A moving white square on a dark background, as PIL frames."""
    from PIL import Image

    frames = []
    for i in range(count):
        array = np.full((*size, 3), 30, dtype=np.uint8)
        array[8:20, 4 + 3 * i : 16 + 3 * i] = 230
        frames.append(Image.fromarray(array))
    return frames


def test_encode_of_a_generated_clip_saved_as_mp4_matches_its_frames(pipe, tmp_path):
    generated = ca.generate(pipe, "a dog on the grass", CONCEPTS, num_inference_steps=2, **RUN)
    clip = generated.images[0]  # the decoded frames (PIL)
    assert len(clip) == 9 and generated.num_frames == 9 and generated.maps.shape == (1, 3, 3, 8, 12)
    path = write_video(tmp_path / "clip.mp4", clip, fps=8)
    from_file = ca.encode_video(pipe, path, CONCEPTS, num_frames=9, num_samples=2, height=32, width=48)
    from_frames = ca.encode_video(pipe, clip, CONCEPTS, num_frames=9, num_samples=2, height=32, width=48)
    assert from_file.maps.shape == from_frames.maps.shape == (1, 3, 3, 8, 12)
    # the file's frames are what was encoded: H.264 at high quality changes pixels only slightly
    decoded = load_video(path)
    assert len(decoded) == 9 and decoded[0].size == (48, 32)
    error = np.abs(np.stack(decoded).astype(float) - np.stack(clip).astype(float)).mean()
    assert error < 16, error  # a random model's frames are noise-like, H.264's worst case (measured: about 7)
    again = ca.encode_video(pipe, decoded, CONCEPTS, num_frames=9, num_samples=2, height=32, width=48)
    torch.testing.assert_close(from_file.maps, again.maps, rtol=0, atol=0)
    torch.testing.assert_close(from_file.maps, from_frames.maps, rtol=0, atol=2e-2)
    assert from_file.num_frames == 9 and from_file.fps == 8.0 and from_file.metadata["mode"] == "encode"
    written = from_file.save(tmp_path / "out")
    overlay = next(p for p in written if p.name.startswith("overlay_00_dog"))
    frames = load_video(overlay)
    assert len(frames) == 9 and frames[0].size == from_file.display_size[::-1]


def test_a_one_frame_video_keeps_its_frame_axis(pipe):
    maps = ca.encode_video(pipe, _frames(1), CONCEPTS, num_frames=1, height=32, width=48)
    assert maps.maps.shape == (1, 3, 1, 8, 12) and maps.is_video and maps.num_frames == 1
    assert maps.upsampled().shape == (1, 3, 1, 32, 48) and maps.metadata["grid"] == [1, 8, 12]


def test_longer_videos_use_their_first_frames(pipe):
    frames = _frames(13)
    first = ca.encode_video(pipe, frames[:9], CONCEPTS, num_frames=9, height=32, width=48)
    longer = ca.encode_video(pipe, frames, CONCEPTS, num_frames=9, height=32, width=48)
    torch.testing.assert_close(longer.maps, first.maps, rtol=0, atol=0)
    default = ca.encode_video(pipe, frames, CONCEPTS, height=32, width=48)  # the model's 9 frames (sample_frames)
    assert default.num_frames == 9 and len(default.images[0]) == 9


def test_bad_video_input_gets_clear_errors(pipe, tmp_path):
    with pytest.raises(ca.ConceptAttentionError, match=r"has 5 frames, fewer than the 9 frames requested \(the "
                       r"model's default\); pass `num_frames=5`"):  # fmt: skip
        ca.encode_video(pipe, _frames(5), CONCEPTS, height=32, width=48)
    with pytest.raises(ca.ConceptAttentionError, match=r"has 9 frames, fewer than the 13 frames requested"):
        ca.encode_video(pipe, _frames(9), CONCEPTS, num_frames=13, height=32, width=48)
    with pytest.raises(ca.ConceptAttentionError, match=r"`num_frames`=8 cannot be taken .* 4k \+ 1 frames; try 5 or 9"):
        ca.encode_video(pipe, _frames(9), CONCEPTS, num_frames=8, height=32, width=48)
    with pytest.raises(ca.ConceptAttentionError, match=r"`encode_image` maps images, and CogVideoXPipeline is a video "
                       r"model \(CogVideoX\); use `conceptattention.encode_video`"):  # fmt: skip
        ca.encode_image(pipe, _frames(1)[0], CONCEPTS, height=32, width=48)
    with pytest.raises(ca.ConceptAttentionError, match="is a single image"):
        ca.encode_video(pipe, np.zeros((32, 48, 3), dtype=np.uint8), CONCEPTS, height=32, width=48)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all" * 10)
    with pytest.raises(ca.ConceptAttentionError, match=r"cannot read .*broken\.mp4.* as a video"):
        ca.encode_video(pipe, broken, CONCEPTS, height=32, width=48)
    with pytest.raises(ca.ConceptAttentionError, match=r"must be a positive multiple of 4"):
        ca.encode_video(pipe, _frames(9), CONCEPTS, height=30, width=48)


def test_a_video_given_to_an_image_model_is_refused():
    image_pipe = CASES_BY_NAME["flux"].pipeline()
    with pytest.raises(ca.ConceptAttentionError, match=r"`encode_video` maps videos, and FluxPipeline is an image "
                       r"model \(Flux.1\); use `conceptattention.encode_image`"):  # fmt: skip
        ca.encode_video(image_pipe, _frames(9), ["dog"])


def test_image_to_video_models_are_refused_in_encode_mode(pipe):
    from diffusers import CogVideoXPipeline

    i2v = make_tiny_cogvideox_transformer(seed=0, num_layers=2, in_channels=8)  # video + image latents
    odd = CogVideoXPipeline(**{**pipe.components, "transformer": i2v})
    with pytest.raises(ca.ConceptAttentionError, match=r"image-to-video model: .* Load the text-to-video checkpoint"):
        ca.encode_video(odd, _frames(9), CONCEPTS, height=32, width=48)


def test_concepts_are_encoded_alone_padded_as_the_pipeline_pads_its_prompt(pipe):
    maps = ca.encode_video(pipe, _frames(9), ["dog", "skyscraper"], height=32, width=48, pooling="mean")
    assert maps.metadata["concept_encoder"].startswith("t5 (text_encoder), each concept alone, padded to 16 tokens")
    # the prompt path's own states of "dog" alone (padded, no mask): its first token is the concept
    prompt_like = pipe._get_t5_prompt_embeds(prompt=["dog"], max_sequence_length=16)[0, 0]
    embeddings = call_plan(pipe, ["dog"], ca.ConceptAttentionConfig()).encode_concepts()
    torch.testing.assert_close(embeddings.states[0], prompt_like, rtol=0, atol=0)
    unpadded = pipe.text_encoder(pipe.tokenizer("dog", return_tensors="pt").input_ids)[0][0, 0]
    assert (unpadded - prompt_like).abs().max() > 1e-4  # padding without a mask changes the states: it matters


@pytest.mark.parametrize("version", ["1.0", "1.5"])
def test_image_to_video_pipeline_is_traced_bit_identically(pipe, version):
    """I2V: image latents concatenated on channels (1.5: plus the `ofs` embedding); the concept path is the same."""
    from diffusers import CogVideoXImageToVideoPipeline

    extra = {} if version == "1.0" else {"ofs_embed_dim": 8}
    transformer = make_tiny_cogvideox_transformer(seed=4, num_layers=3, version=version, in_channels=8, **extra)
    i2v = CogVideoXImageToVideoPipeline(**{**pipe.components, "transformer": transformer})
    go = lambda: i2v(image=_frames(1)[0], prompt="a dog", generator=torch.Generator().manual_seed(0),  # noqa: E731
                     num_inference_steps=2, guidance_scale=6.0, output_type="pt", **RUN).frames  # fmt: skip
    records, plain = capture_forward_inputs(i2v.transformer, go)
    assert records[0]["forward"]["hidden_states"].shape[2] == 8 and (version == "1.0") == (
        records[0]["forward"].get("ofs") is None
    )
    expected = reference_maps(COGVIDEOX, i2v, records, CONCEPTS, layers=[0, 1, 2], conditional_half=True)
    with ca.trace(i2v, CONCEPTS, layers=[0, 1, 2]) as tc:
        traced = go()
    assert torch.equal(plain, traced)
    torch.testing.assert_close(tc.maps().maps.flatten(2), expected, rtol=0, atol=1e-5)


def test_cli_generates_a_video_and_refuses_frames_for_an_image_model(pipe, tmp_path):
    from typer.testing import CliRunner

    from conceptattention.cli import app

    pipe.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    args = ["generate", "a dog on the grass", "-m", str(tmp_path / "model"), "-c", "dog,grass", "--steps", "2",
            "--height", "32", "--width", "48", "--num-frames", "9", "-o", str(out), "--frames"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = ca.ConceptMaps.load(out)
    assert saved.maps.shape == (1, 2, 3, 8, 12) and saved.num_frames == 9 and saved.fps == 8.0
    assert saved.metadata["num_frames"] == 9 and saved.metadata["mode"] == "generate"
    assert len(load_video(out / "overlay_00_dog.mp4")) == 9 and len(list((out / "frames" / "video").glob("*.png"))) == 9
    assert "(9 frames)" in " ".join(result.output.split())  # frame folders are one summary line each
    flux = CASES_BY_NAME["flux"].pipeline()
    flux.save_pretrained(tmp_path / "flux")
    result = CliRunner().invoke(app, ["generate", "a dog", "-m", str(tmp_path / "flux"), "-c", "dog", "--num-frames",
                                      "9", "-o", str(tmp_path / "f")])  # fmt: skip
    assert result.exit_code == 2 and "`--num-frames` applies to video models only" in result.output
