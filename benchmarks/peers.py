"""One pipeline call, traced four ways: this package against other ways of getting text-image maps.

The same mid-size random Flux pipeline call (transformer hidden 512 = 4 x 128, 4 double + 4
single blocks, 512 x 512 px = 1,024 image tokens, 4 steps, 5 concepts), interleaved:

(a) untraced;
(b) traced by this package (``conceptattention.trace``, every double block);
(c) traced by attention-map-diffusers (``AttentionCapture``, image->text), at all timesteps and
    at its default (the last timestep), when that package is installed;
(d) an "official-style" ConceptAttention written here for comparison only: the same maps, but
    each traced block also recomputes full joint attention over [concepts; text; image] queries
    and keeps the concept rows, as the public reference code does.

Usage:
    python benchmarks/peers.py [--repeats 7] [--device cpu]

The last line of output is one JSON object with each variant's median time ratio to (a).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb

import conceptattention as ca
from conceptattention.adapters.joint import FluxStyleProcessor, projections
from conceptattention.bundled.components import (
    assemble_pipeline,
    make_clip_encoder,
    make_clip_tokenizer,
    make_scheduler,
    make_t5_encoder,
    make_t5_tokenizer,
    make_transformer,
    make_vae,
)

CONCEPTS = ["dog", "grass", "sky", "tree", "water"]
PROMPT = "a dog on the grass near a tree under the sky"


def build_pipeline(device: str):
    """A Flux pipeline of random parts: mid-size transformer, VAE scale 8, small text encoders."""
    tokenizer, tokenizer_2 = make_clip_tokenizer(), make_t5_tokenizer()
    pipe = assemble_pipeline(
        make_transformer(latent_channels=16, text_dim=256, pooled_dim=128, num_layers=4, num_single_layers=4,
                         num_attention_heads=4, attention_head_dim=128, seed=0),
        make_vae((8, 16, 32, 32), 16, seed=1),
        make_clip_encoder(tokenizer, 128, seed=2), tokenizer,
        make_t5_encoder(tokenizer_2, 256, seed=3), tokenizer_2,
        make_scheduler(),
    )  # fmt: skip
    return pipe.to(device)


class OfficialStyleProcessor(FluxStyleProcessor):
    """Our processor (same maps) plus the reference code's extra work: full joint attention, concept rows kept."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        traced = self.stream.runs(self.block_index)
        concepts = self.stream.current.normed if traced and self.stream.current is not None else None
        out = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if traced:
            assert concepts is not None and encoder_hidden_states is not None and image_rotary_emb is not None
            parts = [projections(attn, x, added) for x, added in ((concepts, True),
                     (encoder_hidden_states, True), (hidden_states, False))]  # fmt: skip
            q, k, v = (torch.cat([p[i].unflatten(-1, (-1, attn.head_dim)) for p in parts], dim=1) for i in range(3))
            c = concepts.shape[1]
            # Concepts at text position 0 (identity rotation), then the real sequence's rotation.
            cos, sin = (torch.cat([torch.ones_like(f[:c]) if j == 0 else torch.zeros_like(f[:c]), f])
                        for j, f in enumerate(image_rotary_emb))  # fmt: skip
            q, k = apply_rotary_emb(q, (cos, sin), sequence_dim=1), apply_rotary_emb(k, (cos, sin), sequence_dim=1)
            dispatch_attention_fn(q, k, v)[:, :c]  # every query row computed, concept rows kept
        return out


@contextlib.contextmanager
def official_style(pipe):
    with ca.trace(pipe, CONCEPTS, layers=[0, 1, 2, 3]) as tc:
        transformer = pipe.transformer
        processors = dict(transformer.attn_processors)
        for name, p in processors.items():
            if isinstance(p, FluxStyleProcessor):
                processors[name] = OfficialStyleProcessor(p.block_index, p.stream)
        transformer.set_attn_processor(processors)
        yield tc


def variants(pipe) -> dict[str, object]:
    found: dict[str, object] = {
        "untraced": contextlib.nullcontext,
        "conceptattention": lambda: ca.trace(pipe, CONCEPTS, layers=[0, 1, 2, 3]),
        "official_style": lambda: official_style(pipe),
    }
    try:
        from attention_map_diffusers import AttentionCapture
    except ImportError:
        return found
    found["attention_map_diffusers_all_steps"] = lambda: AttentionCapture(pipe, relations="image->text",
                                                                          timesteps="all")  # fmt: skip
    found["attention_map_diffusers_default"] = lambda: AttentionCapture(pipe, relations="image->text")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    pipe = build_pipeline(args.device)
    call = {"height": args.size, "width": args.size, "num_inference_steps": args.steps, "max_sequence_length": 32,
            "output_type": "pt"}  # fmt: skip
    runs = variants(pipe)
    times: dict[str, list[float]] = {name: [] for name in runs}
    images = {}
    with torch.inference_mode():
        for i in range(args.repeats + 1):  # the first round is a warm-up
            names = list(runs) if i % 2 == 0 else list(runs)[::-1]
            for name in names:
                with runs[name]():
                    start = time.perf_counter()
                    images[name] = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **call).images
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    elapsed = time.perf_counter() - start
                if i:
                    times[name].append(elapsed)
    base = times["untraced"]
    result = {
        "ratio_to_untraced": {
            name: round(statistics.median(t / b for t, b in zip(ts, base)), 4) for name, ts in times.items()
        },
        "median_s": {name: round(statistics.median(ts), 3) for name, ts in times.items()},
        "same_image_as_untraced": {name: bool(torch.equal(img, images["untraced"])) for name, img in images.items()},
        "config": {"size": args.size, "steps": args.steps, "concepts": len(CONCEPTS), "hidden": 512,
                   "double_blocks": 4, "single_blocks": 4, "repeats": args.repeats, "device": args.device},
        "torch": torch.__version__,
    }  # fmt: skip
    for name, ratio in result["ratio_to_untraced"].items():
        print(f"{name:36s} {result['median_s'][name]:8.3f} s  x{ratio}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
