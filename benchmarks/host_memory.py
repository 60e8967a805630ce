"""Peak host memory of a whole traced video generation vs an untraced one (CogVideoX).

The official ConceptAttention code keeps per-layer, per-step activations of video models on
the host (hundreds of GB at CogVideoX's defaults). Here the maps are one running sum on the
device, so a traced pipeline call should need about the host memory of a plain call.

Each run is a fresh process (``multiprocessing`` spawn), so that one run's allocator
high-water mark never hides another's: build a random mid-size CogVideoX pipeline (the
transformer of ``overhead.py --arch cogvideox``, a small VAE and T5), run one warm-up call
at a tiny size, then sample the process's resident memory (``psutil``, every 2 ms) during one
``generate`` call, traced or not. Reported per variant, as medians over ``--repeats`` processes
run in alternating order: the peak RSS during the call, and the increase of RSS over the
value just before it (what the call itself needs). ``tracemalloc`` gives the peak of Python
object allocations during the call as a second, allocator-independent measure.

Usage:
    python benchmarks/host_memory.py [--repeats 3] [--frames 17] [--size 128]

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import threading
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny VAE / T5 of the tests


def _pipeline(args):
    import torch
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel
    from tiny_cogvideox import make_tiny_cogvideox_vae

    from conceptattention.bundled.components import make_t5_encoder, make_t5_tokenizer

    torch.manual_seed(0)
    tokenizer = make_t5_tokenizer(model_max_length=args.text_tokens)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=args.heads,
        attention_head_dim=args.hidden // args.heads,
        in_channels=4,
        out_channels=4,
        time_embed_dim=512,
        text_embed_dim=32,
        num_layers=args.layers,
        sample_width=args.size // 4,
        sample_height=args.size // 4,
        sample_frames=args.frames,
        max_text_seq_length=args.text_tokens,
        use_rotary_positional_embeddings=True,
    ).eval()
    return CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=make_t5_encoder(tokenizer, 32, seed=2),
        vae=make_tiny_cogvideox_vae(1),
        transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing"),
    )


def _one_run(args, traced: bool, queue) -> None:
    import psutil
    import torch

    import conceptattention as ca

    torch.set_num_threads(args.threads)
    pipe = _pipeline(args)
    pipe.set_progress_bar_config(disable=True)
    call = {
        "prompt": "a dog runs on the grass under the sky",
        "num_frames": args.frames,
        "height": args.size,
        "width": args.size,
        "num_inference_steps": args.steps,
        "guidance_scale": 6.0,
        "max_sequence_length": args.text_tokens,
        "generator": torch.Generator().manual_seed(0),
    }
    pipe(**{**call, "num_frames": 5, "height": 32, "width": 32, "num_inference_steps": 1})  # warm-up at a tiny size
    process = psutil.Process(os.getpid())
    before = process.memory_info().rss
    peak = [before]
    running = threading.Event()
    running.set()

    def sample() -> None:
        while running.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    tracemalloc.start()
    sampler.start()
    start = time.perf_counter()
    if traced:
        maps = ca.generate(pipe, call.pop("prompt"), ["dog", "grass", "sky", "tree", "ball"], seed=0,
                           **{k: v for k, v in call.items() if k != "generator"})  # fmt: skip
        shape = list(maps.maps.shape)
    else:
        pipe(**call)
        shape = None
    seconds = time.perf_counter() - start
    running.clear()
    sampler.join()
    _, python_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak[0] = max(peak[0], process.memory_info().rss)
    queue.put({"traced": traced, "rss_before": before, "rss_peak": peak[0], "python_peak": python_peak,
               "seconds": seconds, "maps_shape": shape})  # fmt: skip


def measure(args, traced: bool) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_one_run, args=(args, traced, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frames", type=int, default=17, help="video frames (4k + 1): 17 -> 5 latent frames")
    parser.add_argument("--size", type=int, default=128, help="height = width in pixels (VAE / 4, patch 2)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    runs: dict[bool, list[dict]] = {False: [], True: []}
    for i in range(args.repeats):
        for traced in (False, True) if i % 2 == 0 else (True, False):
            runs[traced].append(measure(args, traced))
            print(json.dumps(runs[traced][-1]), flush=True)

    def median(traced: bool, key: str) -> float:
        return statistics.median(r[key] for r in runs[traced])

    def increase(traced: bool) -> float:
        return statistics.median(r["rss_peak"] - r["rss_before"] for r in runs[traced])

    mb = 2**20
    tokens = ((args.frames - 1) // 4 + 1) * (args.size // 8) ** 2
    result = {
        "peak_rss_ratio": round(median(True, "rss_peak") / median(False, "rss_peak"), 4),
        "rss_increase_ratio": round(increase(True) / increase(False), 4),
        "python_peak_ratio": round(median(True, "python_peak") / median(False, "python_peak"), 4),
        "peak_rss_mb": {v: round(median(t, "rss_peak") / mb, 1) for v, t in (("plain", False), ("traced", True))},
        "rss_increase_mb": {"plain": round(increase(False) / mb, 1), "traced": round(increase(True) / mb, 1)},
        "seconds": {"plain": round(median(False, "seconds"), 2), "traced": round(median(True, "seconds"), 2)},
        "maps_shape": runs[True][0]["maps_shape"],
        "config": {**vars(args), "video_tokens": tokens},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
