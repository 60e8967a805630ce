"""Overhead of ConceptAttention on one transformer forward (time and peak memory).

A random mid-size Flux transformer (hidden 512, 4 double + 4 single blocks, 1024 image
tokens, 5 concepts) runs interleaved repeats of a plain forward and a forward with
concept attention on every double block. Reported ratios are medians of paired runs.

Usage:
    python benchmarks/overhead.py [--device cuda] [--repeats 21]

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from diffusers import FluxTransformer2DModel
from torch.profiler import ProfilerActivity, profile

from conceptattention import ConceptAttentionConfig
from conceptattention.concepts import ConceptEmbeddings
from conceptattention.tracing import ConceptSession


def build(args):
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        in_channels=64,
        num_layers=args.double,
        num_single_layers=args.single,
        attention_head_dim=args.hidden // args.heads,
        num_attention_heads=args.heads,
        joint_attention_dim=args.text_dim,
        pooled_projection_dim=256,
        axes_dims_rope=(16, 56, 56) if args.hidden // args.heads == 128 else (8, 28, 28),
    ).to(args.device)
    if args.dtype != torch.float32:
        transformer = transformer.to(dtype=args.dtype)
    transformer.eval()
    n = args.grid * args.grid
    ids = torch.zeros(args.grid, args.grid, 3)
    ids[..., 1] += torch.arange(args.grid)[:, None]
    ids[..., 2] += torch.arange(args.grid)[None, :]
    inputs = {
        "hidden_states": torch.randn(1, n, 64),
        "encoder_hidden_states": torch.randn(1, args.text_tokens, args.text_dim),
        "pooled_projections": torch.randn(1, 256),
        "timestep": torch.tensor([0.5]),
        "img_ids": ids.view(n, 3),
        "txt_ids": torch.zeros(args.text_tokens, 3),
    }
    inputs = {k: v.to(args.device, args.dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
    concepts = [f"concept{i}" for i in range(args.concepts)]
    embeddings = ConceptEmbeddings(
        states=torch.randn(args.concepts, args.text_dim, device=args.device, dtype=args.dtype),
        tokens=tuple((c,) for c in concepts),
        pooling="first",
    )
    config = ConceptAttentionConfig(layers=tuple(range(args.double)))
    session = ConceptSession(transformer, embeddings, concepts, config)
    return transformer, inputs, session


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_forward(transformer, inputs, device, session=None) -> float:
    if session is not None:
        session.__enter__()
    try:
        sync(device)
        start = time.perf_counter()
        transformer(**inputs, return_dict=False)
        sync(device)
        return time.perf_counter() - start
    finally:
        if session is not None:
            session.__exit__(None, None, None)


def peak_bytes(transformer, inputs, device, session=None) -> int:
    """Peak of live tensor bytes allocated during one forward (inputs and weights excluded)."""
    if session is not None:
        session.__enter__()
    try:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            transformer(**inputs, return_dict=False)
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            transformer(**inputs, return_dict=False)
        events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
        live = peak = 0
        for event in events:
            live += event.self_cpu_memory_usage
            peak = max(peak, live)
        return peak
    finally:
        if session is not None:
            session.__exit__(None, None, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--double", type=int, default=4)
    parser.add_argument("--single", type=int, default=4)
    parser.add_argument("--grid", type=int, default=32, help="image tokens = grid * grid")
    parser.add_argument("--text-tokens", type=int, default=128)
    parser.add_argument("--text-dim", type=int, default=512)
    parser.add_argument("--concepts", type=int, default=5)
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype)

    transformer, inputs, session = build(args)
    with torch.inference_mode():
        for _ in range(args.warmup):
            timed_forward(transformer, inputs, args.device)
            timed_forward(transformer, inputs, args.device, session)
        plain, traced = [], []
        for i in range(args.repeats):
            # Alternate the order within each pair so that drift does not favour either side.
            if i % 2 == 0:
                plain.append(timed_forward(transformer, inputs, args.device))
                traced.append(timed_forward(transformer, inputs, args.device, session))
            else:
                traced.append(timed_forward(transformer, inputs, args.device, session))
                plain.append(timed_forward(transformer, inputs, args.device))
        peak_plain = peak_bytes(transformer, inputs, args.device)
        peak_traced = peak_bytes(transformer, inputs, args.device, session)
    ratios = [t / p for t, p in zip(traced, plain)]
    result = {
        "overhead_ratio": round(statistics.median(ratios), 4),
        "overhead_ratio_iqr": [round(q, 4) for q in statistics.quantiles(ratios, n=4)[::2]],
        "peak_mem_ratio": round(peak_traced / peak_plain, 4),
        "plain_ms_median": round(1000 * statistics.median(plain), 2),
        "traced_ms_median": round(1000 * statistics.median(traced), 2),
        "peak_plain_mb": round(peak_plain / 2**20, 2),
        "peak_traced_mb": round(peak_traced / 2**20, 2),
        "repeats": args.repeats,
        "device": args.device,
        "dtype": str(args.dtype).replace("torch.", ""),
        "config": {
            "hidden": args.hidden,
            "heads": args.heads,
            "double_blocks": args.double,
            "single_blocks": args.single,
            "image_tokens": args.grid**2,
            "text_tokens": args.text_tokens,
            "concepts": args.concepts,
            "traced_blocks": list(range(args.double)),
        },
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print(f"plain {result['plain_ms_median']} ms, traced {result['traced_ms_median']} ms (medians of {args.repeats})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
