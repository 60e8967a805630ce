"""The benchmark scripts run (CPU smoke presets) and report self-consistent numbers; no timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _run(script: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


DEFAULT_LAYERS = {"flux": [0, 1, 2, 3], "sd3": [2, 3], "chroma": [0, 1, 2, 3], "flux2": [1, 2, 3], "qwenimage": [2, 3]}


@pytest.mark.parametrize("arch", sorted(DEFAULT_LAYERS))
def test_throughput_small_preset(arch):
    result = _run("throughput.py", "--small", "--arch", arch, "--device", "cpu", "--repeats", "1", "--warmup", "0",
                  "--concepts", "64", "--rows", "2")  # fmt: skip
    assert result["preset"] == "small" and result["concepts"] == 64 and result["rows_per_forward"] == 2
    assert result["layers"] == DEFAULT_LAYERS[arch]  # the backend's default layers
    per_second = 2 / 5 / (result["traced_encode_ms"] / 1000)
    assert result["imagenet_seg_images_per_s"] == pytest.approx(per_second, rel=1e-3)
    assert result["imagenet_seg_projected_min"] == pytest.approx(4276 / per_second / 60, rel=1e-2)
    peaks = result["peak_mb"]
    assert all(v > 0 for v in peaks.values())
    assert result["peak_mem_ratio_encode"] == pytest.approx(peaks["traced_encode"] / peaks["plain_stopped"], rel=0.01)


def test_peers_images_identical_and_ratios_reported():
    result = _run("peers.py", "--repeats", "1", "--size", "256", "--steps", "2")
    assert {"untraced", "conceptattention", "official_style"} <= set(result["ratio_to_untraced"])
    assert result["ratio_to_untraced"]["untraced"] == 1.0
    assert all(result["same_image_as_untraced"].values())  # no variant changes the generated image


@pytest.mark.parametrize("arch", ["flux", "sd3", "chroma", "flux2", "qwenimage", "longcat", "cogvideox"])
def test_overhead_smoke_reports_consistent_ratios(arch):
    result = _run("overhead.py", "--arch", arch, "--repeats", "3", "--warmup", "0", "--hidden", "64", "--heads", "2",
                  "--grid", "8", "--text-tokens", "16", "--text-dim", "32", "--double", "4",
                  "--frames", "2")  # fmt: skip
    # images: grid^2 tokens; CogVideoX: 2 latent frames of (grid / 2)^2 tokens (patch 2 over a grid x grid latent)
    assert result["config"]["arch"] == arch and result["config"]["image_tokens"] == (64 if arch != "cogvideox" else 32)
    # the ratio is of unrounded bytes; the MB fields are rounded to 0.01
    assert result["peak_traced_mb"] == pytest.approx(result["peak_mem_ratio"] * result["peak_plain_mb"], abs=0.02)
    # every double block is traced; SD3's pre-only and Qwen-Image's dead last block never are
    assert result["config"]["traced_blocks"] == ([0, 1, 2] if arch in ("sd3", "qwenimage") else [0, 1, 2, 3])


def test_host_memory_of_a_video_generation_is_reported_per_variant():
    result = _run("host_memory.py", "--repeats", "1", "--frames", "5", "--size", "32", "--steps", "1", "--hidden", "64",
                  "--heads", "2", "--layers", "2", "--text-tokens", "16")  # fmt: skip
    assert result["maps_shape"] == [1, 5, 2, 4, 4]  # 5 concepts, 2 latent frames of 4 x 4 tokens
    peaks = result["peak_rss_mb"]
    assert result["peak_rss_ratio"] == pytest.approx(peaks["traced"] / peaks["plain"], abs=0.01)
    assert all(v > 0 for v in peaks.values())
    assert all(v >= 0 for v in result["rss_increase_mb"].values())  # the peak starts at the RSS before the call
