"""The web app's functions without a browser: inputs -> the Python API's numbers, pictures, files and errors."""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import gradio as gr  # the [app] extra: scripts/setup.sh installs it, so these tests never skip
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import conceptattention as ca
from conceptattention import viz
from conceptattention.app import MISSING_GRADIO, logic, require_gradio, ui
from conceptattention.concepts import MAX_CONCEPTS
from conceptattention.errors import ConceptAttentionError


@pytest.fixture(scope="module")
def pipe():
    pipe = ca.load_pipeline()  # the bundled model, as `conceptattention app` loads it
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def scene_png(tmp_path_factory):
    return logic.scene_examples(tmp_path_factory.mktemp("scenes"), indices=(7,))[0]


def _config(pipe, layers=("0", "1", "2", "3"), score_space="output", softmax="auto", pooling="first"):
    return logic.method_config(pipe, list(layers), score_space, softmax, pooling)


# -- inputs --------------------------------------------------------------------------------------


def test_concepts_split_on_commas_and_lines():
    assert logic.parse_concept_text(" dog, grass\n\nsky ,\n") == ("dog", "grass", "sky")
    assert logic.parse_concept_text("a red apple") == ("a red apple",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "No concepts"),
        (" , \n ", "No concepts"),
        ("dog, sky, Dog", "twice"),
        (", ".join(f"w{i}" for i in range(MAX_CONCEPTS + 1)), f"maximum of {MAX_CONCEPTS}"),
    ],
)
def test_bad_concepts_are_one_readable_line(text, message):
    with pytest.raises(ConceptAttentionError, match=message) as error:
        logic.parse_concept_text(text)
    assert "\n" not in str(error.value)


def test_a_video_model_is_refused_before_the_app_starts():
    from backend_cases import CASES_BY_NAME

    video = CASES_BY_NAME["cogvideox"].pipeline()
    with pytest.raises(ConceptAttentionError, match=r"The web app shows image models, and CogVideoXPipeline is a "
                       r"video model \(CogVideoX\); map videos with `conceptattention generate`"):  # fmt: skip
        logic.model_info(video)


def test_model_info_of_the_bundled_model(pipe):
    info = logic.model_info(pipe)
    assert info.name == "the bundled model" and info.architecture == "Flux.1"
    assert info.usable_layers == (0, 1, 2, 3) and info.default_layers == (0, 1, 2, 3)
    assert info.size == (32, 32) and info.steps == 20 and info.pixels_per_token == 2


def test_layers_are_checked_against_the_model(pipe):
    assert logic.parse_blocks(pipe, ["3", "1", 1]).double == (1, 3)
    both = logic.parse_blocks(pipe, ["double 3", "single 0", "double 1"])
    assert (both.double, both.single, both.labels) == ((1, 3), (0,), ["double 1", "double 3", "single 0"])
    assert logic.parse_blocks(pipe, ["single 0"]).double == ()
    assert logic.block_choices(logic.model_info(pipe))[-2:] == ["double 3", "single 0"]
    with pytest.raises(ConceptAttentionError, match=r"No layers selected: choose at least one block \(double 0-3 or "
                       r"single 0 for this model\)"):  # fmt: skip
        logic.parse_blocks(pipe, [])
    assert logic.blocks_summary(logic.model_info(pipe)) == "joint blocks 0-3, then single-stream block 0"
    with pytest.raises(ConceptAttentionError, match=r"contains 7.*valid indices: 0-3"):
        logic.parse_blocks(pipe, ["2", "7"])
    with pytest.raises(ConceptAttentionError, match=r"contains 1.*1 single-stream blocks \(valid indices: 0\)"):
        logic.parse_blocks(pipe, ["single 1"])
    with pytest.raises(ConceptAttentionError, match="is not a block: write a block index, 'double 3' or 'single 0'"):
        logic.parse_blocks(pipe, ["two"])
    with pytest.raises(ConceptAttentionError, match="is not a block"):
        logic.parse_blocks(pipe, ["triple 2"])
    with pytest.raises(ConceptAttentionError, match="non-negative"):
        logic.parse_blocks(pipe, ["-1"])


def test_a_model_made_only_of_single_stream_layers_offers_and_defaults_to_its_layers():
    from tiny_zimage import make_tiny_zimage_pipeline

    zimage = make_tiny_zimage_pipeline(seed=0, n_layers=4)
    info = logic.model_info(zimage)
    assert info.architecture == "Z-Image" and info.usable_layers == () and info.single_layers == (0, 1, 2, 3)
    assert logic.block_choices(info) == ["single 0", "single 1", "single 2", "single 3"]
    assert logic.default_blocks(info) == ["single 0", "single 1", "single 2"]
    assert logic.blocks_summary(info) == "single-stream blocks 0-3"
    assert info.size == (256, 256) and info.pixels_per_token == 4  # the tiny position table: 64 patches per side
    assert logic.parse_blocks(zimage, ["single 3", "single 1"]).single == (1, 3)
    with pytest.raises(ConceptAttentionError, match=r"No layers selected: choose at least one block \(single 0-3 for "):
        logic.parse_blocks(zimage, [])
    with pytest.raises(ConceptAttentionError, match=r"`layers` selects double-stream blocks, but .* has none"):
        logic.parse_blocks(zimage, ["2"])


def test_shared_controls_make_one_config(pipe):
    config = _config(pipe, layers=["2", "3"], score_space="value", softmax="off", pooling="mean")
    assert config == ca.ConceptAttentionConfig(
        layers=(2, 3), score_space="value", softmax=False, pooling="mean", per_block=True
    )
    assert _config(pipe, softmax="auto").softmax is None and _config(pipe, softmax="on").softmax is True
    with pytest.raises(ConceptAttentionError, match="score_space"):
        _config(pipe, score_space="attention")
    with pytest.raises(ConceptAttentionError, match="Softmax must be one of"):
        _config(pipe, softmax="yes")


def test_upload_is_read_as_rgb(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 255, (20, 30, 4), dtype=np.uint8)
    pixels[..., 3] = 255
    path = tmp_path / "photo.png"
    Image.fromarray(pixels, "RGBA").save(path)
    image = logic.check_upload(path)
    assert image.mode == "RGB" and image.size == (30, 20)
    np.testing.assert_array_equal(np.asarray(image), pixels[..., :3])


def test_upload_limits_are_stated(tmp_path, monkeypatch):
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (logic.MAX_UPLOAD_BYTES + 1))
    with pytest.raises(ConceptAttentionError, match=r"more than the limit of 20 MiB"):
        logic.check_upload(big)
    wide = tmp_path / "wide.png"
    Image.new("RGB", (120, 100)).save(wide)
    monkeypatch.setattr(logic, "MAX_UPLOAD_PIXELS", 10_000)
    with pytest.raises(ConceptAttentionError, match=r"120x100 \(0\.0 megapixels\), more than the limit of 0\.01 mega"):
        logic.check_upload(wide)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's own bomb guard: refused, with our limit
    with pytest.raises(ConceptAttentionError, match=r"more pixels than the limit of 0\.01 megapixels"):
        logic.check_upload(wide)


def test_unreadable_or_missing_upload(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(ConceptAttentionError, match="cannot be read as an image; upload a PNG") as error:
        logic.check_upload(junk)
    assert str(tmp_path) not in str(error.value)  # no server paths in the page
    with pytest.raises(ConceptAttentionError, match="No image"):
        logic.check_upload(None)
    with pytest.raises(ConceptAttentionError, match="gone from the server"):
        logic.check_upload(tmp_path / "missing.png")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("t", 1.0, r"t must be in \(0, 1\)"), ("t", "x", "t must be a number"), ("num_samples", 0, "Noise samples"),
     ("num_samples", 2.5, "Noise samples"), ("seed", -1, "Seed must be a whole number")],
)  # fmt: skip
def test_explain_rejects_bad_numbers(pipe, scene_png, field, value, message):
    args = {"t": 0.5, "num_samples": 1, "seed": 0, **{field: value}}
    with pytest.raises(ConceptAttentionError, match=message):
        logic.run_explain(pipe, scene_png.path, "", "sky", args["t"], args["num_samples"], args["seed"], _config(pipe))


def test_generate_rejects_bad_inputs(pipe):
    config = _config(pipe)
    with pytest.raises(ConceptAttentionError, match="prompt is empty"):
        logic.run_generate(pipe, "  ", "sky", 2, 0, 32, 32, config)
    with pytest.raises(ConceptAttentionError, match="Steps must be a whole number from 1 to 100"):
        logic.run_generate(pipe, "a photo", "sky", 0, 0, 32, 32, config)
    with pytest.raises(ConceptAttentionError, match="multiple of 2"):
        logic.run_generate(pipe, "a photo", "sky", 2, 0, 33, 32, config)
    with pytest.raises(ConceptAttentionError, match="Height must be a whole number from 1 to 2048"):
        logic.run_generate(pipe, "a photo", "sky", 2, 0, 4096, 32, config)


# -- runs: the API's numbers ---------------------------------------------------------------------


def test_explain_equals_encode_image(pipe, scene_png):
    config = _config(pipe, layers=["1", "3"], softmax="on")
    maps = logic.run_explain(pipe, scene_png.path, scene_png.caption, scene_png.concepts, 0.4, 2, 5, config)
    image = Image.open(scene_png.path)
    words = [w.strip() for w in scene_png.concepts.split(",")]
    expected = ca.encode_image(
        pipe, image, words, caption=scene_png.caption, t=0.4, num_samples=2, seed=5, layers=[1, 3], softmax=True
    )
    assert maps.concepts == tuple(words)
    torch.testing.assert_close(maps.maps, expected.maps, rtol=0, atol=0)
    assert maps.block_maps is not None and maps.block_maps.shape == (2, *expected.maps.shape)
    torch.testing.assert_close(maps.block_maps.mean(0), maps.maps, rtol=1e-5, atol=1e-6)  # softmax per block
    assert maps.metadata["t"] == 0.4 and maps.metadata["num_samples"] == 2 and maps.metadata["seed"] == 5


def test_generate_equals_api_generate(pipe):
    config = _config(pipe, layers=["0", "3"])
    maps = logic.run_generate(pipe, "a photo of lemon and sky", "lemon\nsky", "3", 7.0, 32, 32, config)
    expected = ca.generate(pipe, "a photo of lemon and sky", ["lemon", "sky"], seed=7, num_inference_steps=3,
                           layers=[0, 3], height=32, width=32)  # fmt: skip
    torch.testing.assert_close(maps.maps, expected.maps, rtol=0, atol=0)
    np.testing.assert_array_equal(np.asarray(maps.images[0]), np.asarray(expected.images[0]))
    assert maps.metadata["num_steps_run"] == 3 and maps.metadata["layers"] == [0, 3]


# -- pictures and files --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def explained(pipe, scene_png):
    return logic.run_explain(pipe, scene_png.path, scene_png.caption, scene_png.concepts, 0.5, 1, 0, _config(pipe))


def test_render_reuses_the_result_pictures(explained):
    view = logic.render(explained, 0.3, "viridis")
    assert [name for _, name in view.overlays] == list(explained.concepts)
    for picture, name in view.overlays:
        expected = explained.overlays(0, 0.3, "viridis")[name]
        np.testing.assert_array_equal(np.asarray(picture), np.asarray(expected))
    size = explained.display_size
    np.testing.assert_array_equal(np.asarray(view.image), np.asarray(explained.image_at(0, size)))
    legend = viz.segmentation_with_legend(explained.segmentation(size)[0], explained.concepts)
    np.testing.assert_array_equal(np.asarray(view.segmentation), np.asarray(legend))
    other = logic.render(explained, 0.9, "viridis")
    assert not np.array_equal(np.asarray(other.overlays[0][0]), np.asarray(view.overlays[0][0]))


def test_block_strip_is_concepts_by_blocks(explained):
    strip = logic.block_strip(explained, 0.5, "inferno")
    assert explained.block_maps is not None
    blocks, concepts = explained.block_maps.shape[0], len(explained.concepts)
    tile = logic.STRIP_TILE
    label = 8 + 7 * max(len(c) for c in explained.concepts)
    assert strip.size == (label + blocks * tile, 16 + concepts * tile)
    # the tile of (concept 1, block 2) is that block's overlay, shrunk
    block = ca.ConceptMaps(explained.block_maps[2], explained.concepts, explained.image_size, explained.images,
                           metadata=explained.metadata)  # fmt: skip
    name = explained.concepts[1]
    expected = block.overlays(0, 0.5, "inferno")[name].resize((tile, tile), Image.Resampling.BILINEAR)
    box = (label + 2 * tile, 16 + tile, label + 3 * tile, 16 + 2 * tile)
    np.testing.assert_array_equal(np.asarray(strip.crop(box)), np.asarray(expected))
    assert logic.block_strip(ca.ConceptMaps(explained.maps, explained.concepts, explained.image_size)) is None


def test_render_rejects_bad_display_options(explained):
    with pytest.raises(ConceptAttentionError, match=r"Opacity must be in \[0, 1\]"):
        logic.render(explained, 1.5)
    with pytest.raises(ConceptAttentionError, match="Colormap must be one of"):
        logic.render(explained, 0.5, "rainbow-unicorn")


def test_zip_holds_what_save_writes(explained, tmp_path):
    archive = logic.save_zip(explained, tmp_path / "work")
    reference = {p.name for p in explained.save(tmp_path / "reference")}
    with zipfile.ZipFile(archive) as bundle:
        assert set(bundle.namelist()) == reference
        with bundle.open("maps.npz") as handle, np.load(handle) as arrays:
            np.testing.assert_array_equal(arrays["maps"], explained.maps.numpy())
            assert list(arrays["concepts"]) == list(explained.concepts)
            assert arrays["block_maps"].shape == tuple(explained.block_maps.shape)
        record = json.loads(bundle.read("metadata.json"))
    assert record["mode"] == "encode" and record["concepts"] == list(explained.concepts)
    for _ in range(3):
        logic.save_zip(explained, tmp_path / "work", keep=2)
    assert len(list((tmp_path / "work").glob("run-*"))) == 2 and not archive.exists()


def test_summary_line(explained):
    line = logic.summary(explained, 0.123)
    assert line == (
        "Done in 0.12 s: 2 concept(s), t=0.5, 1 noise sample(s), layers [0, 1, 2, 3], score space output, softmax on"
    )


# -- the page ------------------------------------------------------------------------------------


def test_errors_become_one_status_line_not_a_traceback():
    def refused():
        raise ConceptAttentionError("No concepts: type <b>one</b>\nsecond line")

    status, *rest = ui.guarded(refused)
    assert status == '<span class="ca-status-error">Error: No concepts: type &lt;b&gt;one&lt;/b&gt;</span>'
    assert rest == [None, [], None, None, None, None]

    def crashed():
        raise RuntimeError("boom\nTraceback (most recent call last)")

    status, *_ = ui.guarded(crashed)
    assert "Unexpected error: RuntimeError: boom (the server log has the traceback)" in status
    assert "Traceback" not in status


def test_upload_component_passes_the_file_undecoded(tmp_path):
    from gradio.data_classes import FileData

    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    component = ui.ImageUpload(type="filepath", image_mode=None)
    assert component.get_block_name() == "image"
    assert component.preprocess(FileData(path=str(junk), orig_name="junk.png")) == str(junk)
    assert component.preprocess(None) is None
    assert not Path(ui.__file__).with_suffix(".pyi").exists()  # Gradio's stub writer stayed off


def test_page_queues_model_runs_one_at_a_time(pipe, tmp_path):
    demo = ui.build_app(pipe, workdir=tmp_path)
    runs = [fn for fn in demo.fns.values() if fn.name in ("generate_job", "explain_job")]
    assert len(runs) == 2
    assert {fn.concurrency_id for fn in runs} == {ui.MODEL_QUEUE} and {fn.concurrency_limit for fn in runs} == {1}
    assert all(fn.show_progress == "full" and fn.tracks_progress for fn in runs)
    assert demo._queue.max_size == ui.QUEUE_MAX_SIZE  # waiting visitors see "queue: n/N"
    redraws = [fn for fn in demo.fns.values() if fn.name == "redraw"]
    assert len(redraws) == 2 and all(fn.concurrency_limit is None for fn in redraws)  # no model: never waits
    # the example scenes are real files with their captions
    assert sorted(p.name for p in (tmp_path / "examples").glob("*.png")) == [
        f"scene_{i:03d}.png" for i in logic.EXAMPLE_SCENES
    ]


def test_launch_binds_loopback_without_share(pipe, monkeypatch):
    seen = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: seen.update(kwargs))
    ui.launch(pipe, port=7999, block=False)
    assert seen["server_name"] == "127.0.0.1" and seen["server_port"] == 7999 and seen["share"] is False
    assert seen["max_file_size"] == logic.MAX_UPLOAD_BYTES and seen["prevent_thread_lock"] is True


def test_cli_app_command(monkeypatch):
    runner = CliRunner()
    from conceptattention.cli import app

    result = runner.invoke(app, ["app", "--help"])
    assert result.exit_code == 0 and "--port" in result.output and "--host" in result.output
    result = runner.invoke(app, ["app", "--port", "70000"])
    assert result.exit_code == 2 and "`--port` must be in 1-65535" in result.output
    calls = {}
    monkeypatch.setattr("conceptattention.app.launch", lambda pipe, host, port: calls.update(host=host, port=port))
    result = runner.invoke(app, ["app", "--port", "7871", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert calls == {"host": "127.0.0.1", "port": 7871}


def test_missing_gradio_is_an_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)
    with pytest.raises(ConceptAttentionError, match=r"pip install 'conceptattention\[app\]'"):
        require_gradio()
    assert "optional extra" in MISSING_GRADIO
