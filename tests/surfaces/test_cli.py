"""The command line: outputs written, and bad input gives one clear line and exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conceptattention.cli import app, parse_concepts

runner = CliRunner()


@pytest.fixture(autouse=True)
def _in_empty_folder(tmp_path, monkeypatch):
    """Default output folders (outputs/...) are created in a fresh folder, not in the checkout."""
    monkeypatch.chdir(tmp_path)


def _invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result, result.output + (result.stderr if result.stderr_bytes is not None else "")


def test_encode_writes_maps_and_record(saved_scene_model, tmp_path):
    image = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(image)
    result, output = _invoke(
        "encode",
        image,
        "-c",
        "sky,grass",
        "-c",
        "apple",
        "--model",
        saved_scene_model,
        "--out",
        tmp_path / "out",
        "--num-samples",
        "2",
        "--layers",
        "0,1",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, output
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["concepts"] == ["sky", "grass", "apple"] and meta["num_samples"] == 2 and meta["layers"] == [0, 1]
    assert meta["resolution"] == [32, 32]  # from the model's recorded defaults
    assert (tmp_path / "out" / "heatmap_02_apple.png").is_file() and (tmp_path / "out" / "maps.npz").is_file()
    assert "maps.npz" in output


def test_generate_writes_image_and_maps(saved_scene_model, tmp_path):
    result, output = _invoke(
        "generate",
        "a photo of apple and sky",
        "-c",
        "apple,sky",
        "--model",
        saved_scene_model,
        "--out",
        tmp_path / "gen",
        "--steps",
        "2",
        "--trace-steps",
        "1",
        "--layers",
        "1-1",
        "--single-layers",
        "all",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, output
    meta = json.loads((tmp_path / "gen" / "metadata.json").read_text())
    assert meta["steps"] == [1] and meta["num_steps_run"] == 2 and meta["image_size"] == [32, 32]
    assert meta["layers"] == [1] and meta["single_layers"] == [0] and meta["blocks"] == ["double 1", "single 0"]
    assert Image.open(tmp_path / "gen" / "image.png").size == (32, 32)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["encode", "{img}", "-c", "dog,,sky", "--model", "{model}"], "has an empty item"),
        (["encode", "{img}", "-c", "dog,dog", "--model", "{model}"], "lists 'dog' twice"),
        (["encode", "{tmp}/missing.png", "-c", "dog", "--model", "{model}"], "does not exist"),
        (["encode", "{tmp}/broken.png", "-c", "dog", "--model", "{model}"], "cannot read"),
        (["encode", "{img}", "-c", "dog", "--model", "{model}", "--layers", "0,9"], "valid indices: 0-1"),
        (["encode", "{img}", "-c", "dog", "--model", "{model}", "--layers", "a"],
         "comma-separated indices and ranges such as '0,2,5-9', got 'a'"),
        (["encode", "{img}", "-c", "dog", "--model", "{model}", "--layers", "3-1"], "the range '3-1' is empty"),
        (["encode", "{img}", "-c", "dog", "--model", "{model}", "--single-layers", "0-3"],
         "`single_layers` contains 1, but FluxTransformer2DModel has 1 single-stream blocks (valid indices: 0)"),
        (["generate", "a dog", "-c", "dog", "--model", "{model}", "--layers", "none"], "`layers='none'` leaves no"),
        (["encode", "{img}", "-c", "dog", "--model", "{model}", "--score-space", "x"], "`score_space` must be"),
        (["encode", "{img}", "-c", "dog", "--model", "{model}", "--height", "31"], "multiple of 2"),
        (["encode", "{img}", "-c", "dog", "--model", "someone/not-a-model"], "hf download someone/not-a-model"),
        (["generate", "a dog", "-c", " ", "--model", "{model}"], "has an empty item"),
    ],
)
def test_bad_input_is_one_clear_line(saved_scene_model, tmp_path, monkeypatch, args, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    image = tmp_path / "img.png"
    Image.new("RGB", (32, 32)).save(image)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    filled = [a.format(img=image, model=saved_scene_model, tmp=tmp_path) for a in args]
    result, output = _invoke(*filled)
    assert result.exit_code == 2, output
    assert message in " ".join(output.split())
    assert "Traceback" not in output


def test_missing_concepts_option_is_a_usage_error(tmp_path):
    result, output = _invoke("encode", tmp_path / "x.png")
    assert result.exit_code == 2 and "--concepts" in output and "Traceback" not in output


def test_parse_concepts():
    assert parse_concepts(["dog, sky", "grass"]) == ["dog", "sky", "grass"]


def test_cli_runs_an_sd3_folder_with_either_concept_encoder(tmp_path):
    from tiny_sd3 import make_tiny_sd3_pipeline

    make_tiny_sd3_pipeline(seed=0).save_pretrained(tmp_path / "sd3")
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(image)
    for encoder in ("t5", "clip"):
        out = tmp_path / encoder
        result, output = _invoke("encode", image, "-c", "dog,sky", "--model", tmp_path / "sd3", "--out", out,
                                 "--concept-encoder", encoder, "--device", "cpu")  # fmt: skip
        assert result.exit_code == 0, output
        record = json.loads((out / "metadata.json").read_text())
        assert record["architecture"] == "SD3" and record["concept_encoder"].startswith(encoder)
        assert record["layers"] == [1, 2] and record["grid"] == [8, 8]
    generate = ("generate", "a dog", "-c", "dog,sky", "--model", tmp_path / "sd3", "--out", tmp_path / "gen",
                "--steps", "2", "--device", "cpu")  # fmt: skip
    result, output = _invoke(*generate, "--concept-encoder", "bert")
    assert result.exit_code == 2 and "`concept_encoder`='bert' is not available for SD3" in output.replace("\n", " ")
    result, output = _invoke(*generate, "--layers", "3")
    assert result.exit_code == 2 and "`layers` contains 3, which cannot be used" in output.replace("\n", " ")


@pytest.mark.parametrize("arch", ["zimage", "lumina2"])
def test_cli_runs_a_folder_of_a_model_made_only_of_single_stream_layers(arch, tmp_path):
    if arch == "zimage":
        from tiny_zimage import make_tiny_zimage_pipeline as make

        name, size, grid = "Z-Image", "32", [8, 8]
    else:
        from tiny_lumina2 import make_tiny_lumina2_pipeline as make

        name, size, grid = "Lumina-Image 2.0", "64", [4, 4]
    make(seed=0, **({"n_layers": 3} if arch == "zimage" else {"num_layers": 3})).save_pretrained(tmp_path / arch)
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (int(size), int(size), 3), dtype=np.uint8)).save(image)
    out = tmp_path / "encoded"
    result, output = _invoke("encode", image, "-c", "dog,sky", "--model", tmp_path / arch, "--out", out, "--height",
                             size, "--width", size, "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, output
    record = json.loads((out / "metadata.json").read_text())
    assert record["architecture"] == name and record["grid"] == grid
    assert record["layers"] == [] and record["single_layers"] == [0, 1] and record["blocks"] == ["single 0", "single 1"]
    generate = ("generate", "a dog", "-c", "dog,sky", "--model", tmp_path / arch, "--out", tmp_path / "gen",
                "--steps", "2", "--height", size, "--width", size, "--device", "cpu")  # fmt: skip
    result, output = _invoke(*generate, "--single-layers", "0-1")
    assert result.exit_code == 0, output
    assert json.loads((tmp_path / "gen" / "metadata.json").read_text())["blocks"] == ["single 0", "single 1"]
    result, output = _invoke(*generate, "--layers", "1", "--out", tmp_path / "gen2")
    message = "has none: its 3 blocks are single-stream; select them with `single_layers` (valid indices: 0-2"
    assert result.exit_code == 2 and message in " ".join(output.split())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("generate", "a dog", "-c", "dog", "--steps", "0"), "`--steps` must be positive, got 0"),
        (("generate", "a dog", "-c", "dog", "--steps", "-1"), "`--steps` must be positive, got -1"),
        (("generate", "a dog", "-c", "dog", "--height", "0"), "`--height` must be positive, got 0"),
        (("generate", "a dog", "-c", "dog", "--seed", str(2**64)), "`--seed` must be in [0, 2**64)"),
        (("generate", "a dog", "-c", "dog", "--guidance-scale", "-1"), "`--guidance-scale` must be >= 0"),
        (("generate", "a dog", "-c", "dog", "--device", "cuda"), "CUDA is not available on this machine; use cpu"),
        (("generate", "a dog", "-c", "dog", "--device", "gpu0"), "'gpu0' is not a device name"),
        (("eval", "scenes", "--limit", "0"), "`--limit` must be positive, got 0"),
        (("eval", "scenes", "--batch-size", "0"), "`--batch-size` must be positive, got 0"),
        (("eval", "scenes", "--batch-size", "-1"), "`--batch-size` must be positive, got -1"),
        (("encode", "x.png", "-c", "dog", "--num-samples", "0"), "`--num-samples` must be positive, got 0"),
    ],
)
def test_bad_options_are_one_line_errors(args, message):
    result, output = _invoke(*args)
    assert result.exit_code == 2, output
    assert message in " ".join(output.split()) and "Traceback" not in output


def test_generate_takes_config_overrides_and_long_concepts_save(tiny_pipe, tmp_path):
    import conceptattention as ca

    long_concept = "dog" + "x" * 300
    maps = ca.generate(tiny_pipe, "a dog", ["dog", long_concept], layers=[0], pooling="mean", num_inference_steps=1,
                       height=32, width=32, max_sequence_length=16)  # fmt: skip
    assert maps.metadata["layers"] == [0] and maps.metadata["pooling"] == "mean"
    written = maps.save(tmp_path / "out")
    assert any(p.name == "heatmap_01_dog" + "x" * 45 + ".png" for p in written)


def test_encode_into_a_folder_with_a_result_needs_overwrite(saved_scene_model, tmp_path):
    image = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out"
    common = ("encode", image, "--model", saved_scene_model, "--out", out, "--device", "cpu")
    result, output = _invoke(*common, "-c", "lemon,grass")
    assert result.exit_code == 0, output
    result, output = _invoke(*common, "-c", "sky,grass")
    assert result.exit_code == 2 and "already holds a saved result" in " ".join(output.split())
    result, output = _invoke(*common, "-c", "sky,grass", "--overwrite")
    assert result.exit_code == 0, output
    names = {p.name for p in out.iterdir()}
    assert "heatmap_00_sky.png" in names and "heatmap_00_lemon.png" not in names


def test_unexpected_errors_are_one_line_unless_debug(monkeypatch, tmp_path):
    import conceptattention.cli as cli

    def broken(values):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(cli, "parse_concepts", broken)
    result, output = _invoke("generate", "a dog", "-c", "dog", "--out", tmp_path)
    assert result.exit_code == 1 and "Traceback" not in output
    assert "Unexpected error: RuntimeError: boom (run with --debug for the traceback)" in " ".join(output.split())
    result, _ = _invoke("--debug", "generate", "a dog", "-c", "dog", "--out", tmp_path)
    assert isinstance(result.exception, RuntimeError) and str(result.exception).startswith("boom")


def test_commands_print_no_torchvision_notices(saved_scene_model, tmp_path):
    import os
    import subprocess
    import sys

    image = tmp_path / "scene.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    # CI=true makes transformers propagate its records to the root logger (a second way out).
    env = {**os.environ, "CI": "true"}
    done = subprocess.run([sys.executable, "-m", "conceptattention.cli", "encode", str(image), "-c", "sky,grass",
                           "--model", str(saved_scene_model), "--out", str(tmp_path / "out"), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torchvision" not in done.stdout + done.stderr
