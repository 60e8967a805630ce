"""Full-size throughput: traced encode forwards, the ImageNet-Seg protocol rate and its projected time.

Builds a supported backend's full-size transformer from its config with random weights
(nothing is downloaded; timing does not depend on the weights) directly on ``--device`` in
``--dtype``, and measures in one process, with interleaved repeats:

- a plain full forward (every block, the final layer);
- a traced full forward (concept attention on the backend's default layers): the overhead ratio;
- a traced *encode* forward, stopped after the last used joint block, as ``encode_image`` runs it;
- peak device memory of each (the traced ones as a new run, so the result buffers they allocate
  count), and of an untraced forward stopped at the same block (the baseline of an encode forward).

The ImageNet-Segmentation protocol (``--num-samples`` 5 noise draws per image, ``--size`` 1024)
then runs ``rows / num_samples`` images per encode forward of ``--rows`` rows, so
``images/s = rows / num_samples / encode_forward_s`` and the projected time for 4,276 images is
``4276 / images_per_s``. VAE encoding and the caption's text encoding (once per image) are not
included; at 1024 px they are small next to five transformer forwards.

Usage:
    python benchmarks/throughput.py --device cuda --dtype bfloat16            # FLUX.1 full size
    python benchmarks/throughput.py --arch sd3 --device cuda --dtype bfloat16  # SD3.5 Large full size
    python benchmarks/throughput.py --small                                    # CPU smoke preset (CI)

Flags: ``--concepts``, ``--rows``, ``--attention-backend`` (diffusers' dispatcher, e.g. ``flash``,
``_native_cudnn``), ``--compile`` (regional ``torch.compile`` of the repeated blocks; tracing is
checked against the eager maps). The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import BUILDERS, forward_call, peak_bytes, timed

from conceptattention import ConceptAttentionConfig
from conceptattention.adapters import backend_for
from conceptattention.concepts import ConceptEmbeddings, ConceptPositions
from conceptattention.tracing import ConceptSession

IMAGENET_SEG_IMAGES = 4276
# Full-size configs (only the sizes that cost time): FLUX.1 [dev/schnell], SD3.5 Large, Chroma1-HD,
# FLUX.2-dev and Qwen-Image (prompt budgets: the pipelines' defaults).
FULL = {
    "flux": {"hidden": 3072, "heads": 24, "double": 19, "single": 38, "text_tokens": 512, "text_dim": 4096},
    "sd3": {"hidden": 2432, "heads": 38, "double": 38, "single": 0, "text_tokens": 333, "text_dim": 4096},
    "chroma": {"hidden": 3072, "heads": 24, "double": 19, "single": 38, "text_tokens": 512, "text_dim": 4096},
    "flux2": {"hidden": 6144, "heads": 48, "double": 8, "single": 48, "text_tokens": 512, "text_dim": 15360},
    "qwenimage": {"hidden": 3072, "heads": 24, "double": 60, "single": 0, "text_tokens": 256, "text_dim": 3584},
}
_SMALL_TEXT = {"hidden": 256, "heads": 4, "text_tokens": 64, "text_dim": 256}
SMALL = {
    "flux": {**_SMALL_TEXT, "double": 4, "single": 4},
    "sd3": {**_SMALL_TEXT, "double": 5, "single": 0},
    "chroma": {**_SMALL_TEXT, "double": 4, "single": 4},
    "flux2": {**_SMALL_TEXT, "double": 4, "single": 4},
    "qwenimage": {**_SMALL_TEXT, "double": 5, "single": 0},
}
PIXELS_PER_TOKEN = 16  # VAE scale 8 x patch 2, for both


def build(args):
    """Transformer (built on the device, in the dtype) and forward inputs with ``args.rows`` rows."""
    sizes = (SMALL if args.small else FULL)[args.arch]
    spec = SimpleNamespace(**sizes, grid=args.size // PIXELS_PER_TOKEN, qk_norm="rms_norm")
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(args.dtype)
        with torch.device(args.device):
            transformer, inputs, _ = BUILDERS[args.arch](spec)
    finally:
        torch.set_default_dtype(previous)
    transformer.eval().requires_grad_(False)
    shared = {"img_ids", "txt_ids"}  # Flux position ids carry no batch axis
    inputs = {k: v if k in shared else _rows(v, args.rows) for k, v in inputs.items()}
    if args.arch != "sd3":  # flow-matching time in [0, 1] (and Flux.2's guidance) in float32, as the pipelines pass it
        inputs["timestep"] = inputs["timestep"].float()
        if "guidance" in inputs:
            inputs["guidance"] = inputs["guidance"].float()
    return transformer, inputs, sizes


def _rows(value, rows: int):
    """A one-row forward input repeated to ``rows`` rows (tensors, or per-row lists such as Qwen's ``img_shapes``)."""
    if isinstance(value, list):
        return value * rows
    return value.expand(rows, *value.shape[1:]).contiguous()


def sessions(transformer, concepts: int, text_dim: int, device: str, dtype: torch.dtype):
    """A traced full forward and a traced encode forward, on the backend's default layers."""
    names = [f"concept{i}" for i in range(concepts)]
    embeddings = ConceptEmbeddings(
        states=torch.randn(concepts, text_dim, device=device, dtype=dtype), tokens=tuple((c,) for c in names),
        pooling="first", extras=ConceptPositions((3,) * concepts),  # a 3-token template header (Flux.2's text RoPE)
    )  # fmt: skip
    config = ConceptAttentionConfig()
    full = ConceptSession(transformer, embeddings, names, config)
    encode = ConceptSession(transformer, embeddings, names, config, stop_after_last_block=True)
    return full, encode


def stopped_call(transformer, inputs, last_block: int):
    """An untraced forward that stops after ``last_block`` (the memory baseline of an encode forward)."""
    from conceptattention.adapters.base import StopForward

    blocks = backend_for(transformer).blocks(transformer)
    forward = forward_call(transformer, inputs)

    def stop(module, args, output):
        raise StopForward

    def call() -> None:
        handle = blocks[last_block].register_forward_hook(stop)
        try:
            forward()
        finally:
            handle.remove()

    return call


def compile_blocks(transformer) -> str:
    """Regional compilation: each repeated block compiled once (diffusers' ``compile_repeated_blocks``)."""
    if getattr(transformer, "_repeated_blocks", None):
        transformer.compile_repeated_blocks(fullgraph=False)
        return "compile_repeated_blocks"
    for block in backend_for(transformer).blocks(transformer):
        block.compile()
    return "per joint block"


def fresh_run(session, call):
    """``call`` as a new run of ``session``: its result buffers are allocated (and measured) inside."""

    def run() -> None:
        session.start_run()
        call()

    return run


def encode_maps(session, call) -> torch.Tensor:
    with session:
        session.start_run()
        call()
    return session.token_maps()[0].float().cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="flux", choices=sorted(FULL))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default 1024; small: 256)")
    parser.add_argument("--concepts", type=int, default=5)
    parser.add_argument("--num-samples", type=int, default=5, help="noise draws per image (the paper: 5)")
    parser.add_argument("--rows", type=int, default=5, help="rows (image x draw) per forward")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--attention-backend", default=None, help="diffusers attention backend, e.g. flash")
    parser.add_argument("--compile", action="store_true", help="regional torch.compile of the blocks")
    parser.add_argument("--small", action="store_true", help="small CPU preset (hidden 256, 4-5 blocks, 256 px)")
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    args.size = args.size or (256 if args.small else 1024)

    transformer, inputs, sizes = build(args)
    if args.attention_backend:
        transformer.set_attention_backend(args.attention_backend)
    full, encode = sessions(transformer, args.concepts, sizes["text_dim"], args.device, args.dtype)
    stack = contextlib.ExitStack()
    # As encode_image batches the protocol: row r is noise draw r % num_samples of image r // num_samples, and
    # the maps are summed per image (the running sum is (images, C, N), not one per row).
    rows_map = encode.rows_of_items(
        torch.arange(args.rows, device=args.device) // args.num_samples, -(-args.rows // args.num_samples)
    )
    stack.enter_context(rows_map)  # every encode forward below carries these rows
    forward = forward_call(transformer, inputs)
    stopped = stopped_call(transformer, inputs, encode.blocks.double[-1])
    compiled = None
    with torch.inference_mode():
        eager_maps = encode_maps(encode, forward)
        if args.compile:
            compiled = {"mode": compile_blocks(transformer)}
            start = time.perf_counter()
            try:
                compiled_maps = encode_maps(encode, forward)  # first call compiles
                timed(forward, args.device)
                compiled["compile_s"] = round(time.perf_counter() - start, 1)
                compiled["tracing_max_abs_diff"] = float((compiled_maps - eager_maps).abs().max())
            except Exception as error:  # report why tracing and compile do not combine, then stop
                compiled["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
                print(json.dumps({"compile": compiled}))
                raise SystemExit(1) from None
        for _ in range(args.warmup):
            for session in (None, full, encode):
                timed(forward, args.device, session)
        plain, traced, encoded = [], [], []
        for i in range(args.repeats):
            order = [(plain, None), (traced, full), (encoded, encode)]
            for times, session in order if i % 2 == 0 else order[::-1]:
                times.append(timed(forward, args.device, session))
        peaks = {
            "plain_full": peak_bytes(forward, args.device),
            "traced_full": peak_bytes(fresh_run(full, forward), args.device, full),
            "plain_stopped": peak_bytes(stopped, args.device),
            "traced_encode": peak_bytes(fresh_run(encode, forward), args.device, encode),
        }
    encode_s = statistics.median(encoded)
    images_per_s = args.rows / args.num_samples / encode_s
    params = sum(p.numel() for p in transformer.parameters())
    result = {
        "arch": args.arch,
        "preset": "small" if args.small else "full",
        "device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
        "dtype": str(args.dtype).replace("torch.", ""),
        "size": args.size,
        "params_b": round(params / 1e9, 3),
        "concepts": args.concepts,
        "rows_per_forward": args.rows,
        "layers": list(encode.blocks.double),
        "plain_full_ms": round(1000 * statistics.median(plain), 2),
        "traced_full_ms": round(1000 * statistics.median(traced), 2),
        "traced_encode_ms": round(1000 * encode_s, 2),
        "traced_encode_ms_per_row": round(1000 * encode_s / args.rows, 2),
        "overhead_ratio": round(statistics.median(t / p for t, p in zip(traced, plain)), 4),
        "encode_vs_plain_full": round(statistics.median(e / p for e, p in zip(encoded, plain)), 4),
        "peak_mb": {k: round(v / 2**20, 3) for k, v in peaks.items()},
        "peak_mem_ratio_encode": round(peaks["traced_encode"] / peaks["plain_stopped"], 4),
        "peak_mem_ratio_full": round(peaks["traced_full"] / peaks["plain_full"], 4),
        "imagenet_seg_images_per_s": round(images_per_s, 4),
        "imagenet_seg_projected_min": round(IMAGENET_SEG_IMAGES / images_per_s / 60, 1),
        "attention_backend": args.attention_backend,
        "compile": compiled,
        "repeats": args.repeats,
        "torch": torch.__version__,
    }
    stack.close()
    print(
        f"{args.arch} ({result['preset']}, {result['params_b']} B params) on {result['device']} {result['dtype']}: "
        f"plain {result['plain_full_ms']} ms, traced {result['traced_full_ms']} ms, "
        f"encode {result['traced_encode_ms']} ms for {args.rows} rows -> {images_per_s:.3f} images/s, "
        f"ImageNet-Seg in {result['imagenet_seg_projected_min']} min"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
