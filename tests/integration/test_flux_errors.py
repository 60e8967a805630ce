"""Bad input gets a specific error that says what to do."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from PIL import Image

import conceptattention as ca
from conceptattention.errors import UnsupportedArchitectureError, WeightsNotFoundError


@pytest.mark.parametrize(
    ("concepts", "message"),
    [
        ([], "`concepts` is empty"),
        (None, "`concepts` is empty"),
        ("dog", "single string 'dog'"),
        (["dog", "  "], r"`concepts\[1\]` is blank"),
        (["dog", "Dog "], "lists 'Dog' twice"),
        (["dog", 3], r"`concepts\[1\]` must be a string"),
        ([f"w{i}" for i in range(65)], "65 entries, more than the maximum of 64"),
    ],
)
def test_bad_concepts(tiny_pipe, concepts, message):
    with pytest.raises(ca.ConceptAttentionError, match=message):
        ca.trace(tiny_pipe, concepts)


def test_block_index_out_of_range_states_valid_range(tiny_pipe):
    with pytest.raises(
        ca.ConceptAttentionError, match=r"`layers` contains 7, .* 3 double-stream blocks \(valid indices: 0-2\)"
    ):
        ca.trace(tiny_pipe, ["dog"], layers=[1, 7])
    with pytest.raises(ca.ConceptAttentionError, match="non-negative integers"):
        ca.ConceptAttentionConfig(layers=[-1])


def test_step_index_out_of_range_states_valid_range(tiny_pipe):
    with ca.trace(tiny_pipe, ["dog", "sky"], steps=[0, 5]) as tc:
        tiny_pipe("a dog", height=32, width=32, num_inference_steps=2, max_sequence_length=16, output_type="pt")
    with pytest.raises(
        ca.ConceptAttentionError,
        match=r"`steps` contains 5, but the pipeline ran 2 denoising steps \(valid indices: 0-1\)",
    ):
        tc.maps()


def test_reading_maps_before_running_says_how(tiny_pipe):
    tc = ca.trace(tiny_pipe, ["dog"])
    with pytest.raises(ca.ConceptAttentionError, match=r"run the pipeline inside `with trace"):
        tc.maps()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"score_space": "attention"}, "`score_space` must be one of"),
        ({"concept_keys": "all"}, "`concept_keys` must be one of"),
        ({"pooling": "last"}, "`pooling` must be one of"),
        ({"softmax": "yes"}, "`softmax` must be True, False or None"),
        ({"colour": 1}, r"Unknown option\(s\) \['colour'\]"),
    ],
)
def test_bad_options(tiny_pipe, options, message):
    with pytest.raises(ca.ConceptAttentionError, match=message):
        ca.trace(tiny_pipe, ["dog", "sky"], **options)


def test_softmax_with_one_concept_is_refused(tiny_pipe):
    with (
        pytest.raises(ca.ConceptAttentionError, match="single concept gives a constant map"),
        ca.trace(tiny_pipe, ["dog"], softmax=True),
    ):
        pass


def test_image_size_the_model_cannot_take(tiny_pipe):
    image = Image.new("RGB", (40, 40))
    with pytest.raises(ca.ConceptAttentionError, match=r"`height`=30 .* multiple of 4 .* try 28 or 32"):
        ca.encode_image(tiny_pipe, image, ["dog"], height=30, width=32)
    with pytest.raises(ca.ConceptAttentionError, match=r"`t` must be in \(0, 1\)"):
        ca.encode_image(tiny_pipe, image, ["dog"], height=32, width=32, t=1.0)
    with pytest.raises(ca.ConceptAttentionError, match="`num_samples` must be a positive integer"):
        ca.encode_image(tiny_pipe, image, ["dog"], height=32, width=32, num_samples=0)


def test_non_rgb_images_are_converted(tiny_pipe):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    gray = rgb.convert("L")
    via_gray = ca.encode_image(tiny_pipe, gray, ["dog", "sky"], height=32, width=32)
    via_rgb = ca.encode_image(tiny_pipe, gray.convert("RGB"), ["dog", "sky"], height=32, width=32)
    torch.testing.assert_close(via_gray.maps, via_rgb.maps, rtol=0, atol=0)
    rgba = rgb.convert("RGBA")
    via_rgba = ca.encode_image(tiny_pipe, rgba, ["dog", "sky"], height=32, width=32)
    torch.testing.assert_close(via_rgba.maps, ca.encode_image(tiny_pipe, rgb, ["dog", "sky"], height=32, width=32).maps)


def test_unreadable_or_malformed_images(tiny_pipe, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(ca.ConceptAttentionError, match=r"cannot read .*bad\.png"):
        ca.encode_image(tiny_pipe, bad, ["dog"], height=32, width=32)
    with pytest.raises(ca.ConceptAttentionError, match="does not exist"):
        ca.encode_image(tiny_pipe, tmp_path / "missing.png", ["dog"], height=32, width=32)
    with pytest.raises(ca.ConceptAttentionError, match=r"shape \(32, 32, 2\)"):
        ca.encode_image(tiny_pipe, np.zeros((32, 32, 2), np.uint8), ["dog"], height=32, width=32)
    with pytest.raises(ca.ConceptAttentionError, match=r"outside \[0, 1\]"):
        ca.encode_image(tiny_pipe, np.full((32, 32, 3), 2.0), ["dog"], height=32, width=32)


def test_unsupported_architecture_lists_supported(tiny_pipe):
    from diffusers import SanaTransformer2DModel

    # a cross-attention-only model: refused with the reason, and with every supported backend listed
    fake = types.SimpleNamespace(
        transformer=SanaTransformer2DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
            num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
            sample_size=8, patch_size=1,
        )
    )  # fmt: skip
    supported = r"Supported: Flux\.1: FluxTransformer2DModel \(FluxPipeline.*SD3: SD3Transformer2DModel"
    unsupported = (
        r"SimpleNamespace uses SanaTransformer2DModel \(Sana\), whose text enters through cross-attention only\. "
        r"ConceptAttention needs a joint-attention MM-DiT, where text tokens are queries in the same attention as "
        r"the image\. "
    )
    with pytest.raises(UnsupportedArchitectureError, match=unsupported + supported) as refused:
        ca.trace(fake, ["dog"])
    assert all(line in str(refused.value) for line in ca.supported_architectures())  # every registered backend
    with pytest.raises(UnsupportedArchitectureError, match=r"uses SanaTransformer2DModel .*cross-attention only"):
        ca.load_pipeline(fake)
    # any other module: not supported, with the same list
    other = types.SimpleNamespace(transformer=torch.nn.Linear(2, 2))
    generic = r"SimpleNamespace with transformer Linear is not supported\. "
    with pytest.raises(UnsupportedArchitectureError, match=generic + supported):
        ca.trace(other, ["dog"])
    with pytest.raises(ca.ConceptAttentionError, match="has no `transformer`"):
        ca.trace(object(), ["dog"])


@pytest.mark.parametrize("family", ["pixart", "wan"])
def test_cross_attention_only_models_are_refused_with_the_reason(family):
    from diffusers import PixArtTransformer2DModel, WanTransformer3DModel

    if family == "pixart":
        transformer = PixArtTransformer2DModel(sample_size=8, num_layers=1, attention_head_dim=8, num_attention_heads=2,
                                               in_channels=4, out_channels=8, cross_attention_dim=16,
                                               caption_channels=16, norm_num_groups=2)  # fmt: skip
        name = "PixArtTransformer2DModel"
    else:
        transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                            in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                                            num_layers=1, rope_max_seq_len=32)  # fmt: skip
        name = "WanTransformer3DModel"
    with pytest.raises(
        UnsupportedArchitectureError,
        match=rf"uses {name} .*cross-attention only\. ConceptAttention needs a joint-attention MM-DiT.*Supported: Flux",
    ):
        ca.trace(types.SimpleNamespace(transformer=transformer), ["dog"])


def test_models_made_only_of_single_stream_layers_are_listed_as_supported():
    from conceptattention.adapters import supported_architectures

    listed = "; ".join(supported_architectures())
    assert "Z-Image: ZImageTransformer2DModel (ZImagePipeline, ZImageImg2ImgPipeline)" in listed
    assert "Lumina-Image 2.0: Lumina2Transformer2DModel (Lumina2Pipeline)" in listed


def test_dead_last_block_of_a_flux_model_without_single_blocks():
    from tiny_flux import make_tiny_flux_pipeline

    pipe = make_tiny_flux_pipeline(seed=0, num_layers=2, num_single_layers=0)
    with pytest.raises(ca.ConceptAttentionError, match=r"`layers` contains 1, which cannot be used: .*feeds nothing"):
        ca.trace(pipe, ["dog"], layers=[0, 1])
    with ca.trace(pipe, ["dog", "sky"]) as tc:
        pipe("a dog", height=32, width=32, num_inference_steps=1, max_sequence_length=16, output_type="pt")
    assert tc.maps().metadata["layers"] == [0] and "1" in json.loads(json.dumps(tc.maps().metadata))["excluded_blocks"]


def test_weights_that_cannot_be_found_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(WeightsNotFoundError, match=r"hf download black-forest-labs/FLUX.1-schnell"):
        ca.load_pipeline("black-forest-labs/FLUX.1-schnell")
    with pytest.raises(WeightsNotFoundError, match=r"is not a pipeline folder: expected .*model_index\.json"):
        ca.load_pipeline(tmp_path / "nowhere")
    with pytest.raises(ca.ConceptAttentionError, match="`dtype` must be one of"):
        ca.load_pipeline(tmp_path, dtype="float8")


def test_concepts_the_tokenizer_cannot_represent_are_refused_before_compute(tiny_pipe):
    from backend_cases import CASES_BY_NAME

    from conceptattention.concepts import check_concept_tokens

    for pipe in (tiny_pipe, CASES_BY_NAME["sd3"].pipeline()):
        calls: list[int] = []
        hook = pipe.transformer.register_forward_pre_hook(lambda *a, calls=calls: calls.append(1))
        try:
            with pytest.raises(
                ca.ConceptAttentionError, match=r"T5Tokenizer(Fast)? cannot represent concept\(s\) \['犬', '🐶'\]"
            ):
                ca.encode_image(pipe, torch.rand(3, 32, 32), ["dog", "犬", "🐶"], height=32, width=32)
        finally:
            hook.remove()
        assert not calls
    with pytest.raises(ca.ConceptAttentionError, match="concepts 'sky' and 'SKY' encode to the same tokens with list"):
        check_concept_tokens(["sky", "SKY"], [[5, 6], [5, 6]], [])


def test_damaged_or_incomplete_local_folder_names_the_component(tiny_pipe, tmp_path):
    import shutil

    tiny_pipe.save_pretrained(tmp_path / "model")
    weights = next((tmp_path / "model" / "transformer").glob("*.safetensors"))
    shutil.copytree(tmp_path / "model", tmp_path / "incomplete")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted copy
    with pytest.raises(WeightsNotFoundError, match=rf"{weights.name} is damaged or incomplete") as caught:
        ca.load_pipeline(tmp_path / "model")
    assert "hf download" not in str(caught.value)
    shutil.rmtree(tmp_path / "incomplete" / "vae")
    with pytest.raises(WeightsNotFoundError, match=r"component `vae` is missing"):
        ca.load_pipeline(tmp_path / "incomplete")


def test_a_hub_that_never_answers_fails_in_bounded_time_with_one_line(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    import threading
    import time

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []

    def accept_and_stay_silent():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept_and_stay_silent, daemon=True).start()
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{server.getsockname()[1]}", "HF_HOME": str(tmp_path),
           "CONCEPTATTENTION_HUB_TIMEOUT": "1"}  # fmt: skip
    env.pop("HF_HUB_OFFLINE", None)
    start = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "conceptattention.cli", "generate", "a dog", "-c", "dog",
                               "--model", "someone/some-model", "--out", str(tmp_path / "out"), "--device", "cpu"],
                              env=env, capture_output=True, text=True, timeout=240)  # fmt: skip
    finally:
        server.close()
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 2 and "Traceback" not in output, output[-2000:]
    assert "Could not reach the Hugging Face Hub for 'someone/some-model' (ReadTimeout" in output
    assert "HF_HUB_OFFLINE=1" in output and "fetching someone/some-model" in output
    assert time.monotonic() - start < 120


def _serve(reply: bytes):
    """A loopback TCP server answering every connection with ``reply`` (then closing); returns (port, stop)."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)

    def answer():
        while True:
            try:
                connection = server.accept()[0]
            except OSError:
                return
            try:
                connection.sendall(reply)
            finally:
                connection.close()

    threading.Thread(target=answer, daemon=True).start()
    return server.getsockname()[1], server.close


@pytest.mark.parametrize("failure", ["proxy", "ssl"])
def test_proxy_and_ssl_failures_are_one_line_naming_offline_mode(tmp_path, failure):
    """A proxy that refuses the tunnel, and a hub endpoint whose TLS handshake fails: one line, exit 2."""
    import os
    import subprocess
    import sys

    port, stop = _serve(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
    env = {**os.environ, "HF_HOME": str(tmp_path), "CONCEPTATTENTION_HUB_TIMEOUT": "5"}
    for key in ("HF_HUB_OFFLINE", "NO_PROXY", "no_proxy"):
        env.pop(key, None)
    if failure == "proxy":  # the CONNECT tunnel is refused by the proxy
        env.update(HF_ENDPOINT="https://huggingface.co", HTTPS_PROXY=f"http://127.0.0.1:{port}",
                   https_proxy=f"http://127.0.0.1:{port}")  # fmt: skip
    else:  # plain HTTP where TLS is expected: the handshake fails
        env["HF_ENDPOINT"] = f"https://127.0.0.1:{port}"
    try:
        done = subprocess.run([sys.executable, "-m", "conceptattention.cli", "generate", "a dog", "-c", "dog",
                               "--model", "someone/some-model", "--out", str(tmp_path / "out"), "--device", "cpu"],
                              env=env, capture_output=True, text=True, timeout=240)  # fmt: skip
    finally:
        stop()
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 2 and "Traceback" not in output, output[-2000:]
    assert "Could not reach the Hugging Face Hub for 'someone/some-model' (" in output, output[-2000:]
    assert "proxy (HTTPS_PROXY) or SSL settings" in output and "HF_HUB_OFFLINE=1" in output
    expected = "(ProxyError: 403 Forbidden)" if failure == "proxy" else "(ConnectError: [SSL: WRONG_VERSION_NUMBER]"
    assert expected in output, output[-2000:]
