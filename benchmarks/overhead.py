"""Overhead of ConceptAttention on one transformer forward (time and peak memory).

A random mid-size transformer (hidden 512, 1024 image tokens, 5 concepts) runs interleaved
repeats of a plain forward and a forward with concept attention. Reported ratios are medians
of paired runs.

- ``--arch flux`` (default): ``FluxTransformer2DModel``, 4 double + 4 single blocks; every
  double block is traced.
- ``--arch sd3``: ``SD3Transformer2DModel``, 5 joint blocks with RMS QK-norm (SD3.5 style);
  every block but the last is traced (the last is ``context_pre_only`` and is never scored).
- ``--arch chroma``: ``ChromaTransformer2DModel``, 4 double + 4 single blocks, a text mask with
  a quarter of the prompt valid (as the pipeline pads); every double block is traced.
- ``--arch flux2``: ``Flux2Transformer2DModel``, 4 double + 4 single blocks, 4-axis RoPE with text
  positions 0..T-1 (concepts rotated at their template position); every double block is traced.
- ``--arch qwenimage``: ``QwenImageTransformer2DModel``, 5 dual-stream blocks, text RoPE, a text
  mask with a quarter of the prompt valid; every block but the dead last one is traced.
- ``--arch cogvideox``: ``CogVideoXTransformer3DModel`` (5B layout: 3-D RoPE on video, LayerNorm
  QK-norm), 5 blocks, a video of ``--frames`` latent frames (default 8) x grid/2 x grid/2 tokens
  (default 8 x 16 x 16 = 2,048 tokens); every block is traced.
- ``--arch longcat``: ``LongCatImageTransformer2DModel``, 4 double + 4 single blocks (Flux.1's), image
  ids offset by the prompt block; every double block is traced.
- ``--arch hunyuanvideo``: ``HunyuanVideoTransformer3DModel``, 4 double + 4 single blocks, 2 refiner
  blocks, the same video grid, a text mask with a quarter of the prompt valid; every double block is
  traced, and each forward runs the 5 concepts' own 8-token sequences through the token refiner.

- ``--arch zimage``: ``ZImageTransformer2DModel``, 8 single-stream layers after 2 context and 2 noise
  refiner layers, image and caption padded to multiples of 32 with pad tokens; the default layers
  (the later half) are traced, and each forward refines the 5 concepts' own 8-token captions.
- ``--arch lumina2``: ``Lumina2Transformer2DModel``, 8 single-stream layers (K/V heads half the query
  heads) after 2 + 2 refiner layers, a caption mask with a quarter valid; the default layers (the
  later half) are traced, concepts refined as for ``zimage``.

With ``--trace-single`` (flux, chroma, flux2, longcat, hunyuanvideo; zimage, lumina2: all layers)
every single-stream block is traced too, so the concepts run through the whole model.

Usage:
    python benchmarks/overhead.py [--arch {flux,sd3,chroma,flux2,qwenimage,longcat,cogvideox,hunyuanvideo,
        zimage,lumina2}]
        [--device cuda] [--repeats 21] [--trace-single]

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
from diffusers import (
    ChromaTransformer2DModel,
    CogVideoXTransformer3DModel,
    Flux2Transformer2DModel,
    FluxTransformer2DModel,
    HunyuanVideoTransformer3DModel,
    LongCatImageTransformer2DModel,
    Lumina2Transformer2DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    ZImageTransformer2DModel,
)
from torch.profiler import ProfilerActivity, profile

from conceptattention import ConceptAttentionConfig
from conceptattention.adapters.base import StopForward
from conceptattention.adapters.hunyuanvideo import ConceptSequences
from conceptattention.bundled.components import rope_axes_for_head_dim
from conceptattention.concepts import CaptionSequences, ConceptEmbeddings, ConceptPositions
from conceptattention.tracing import ConceptSession

DEFAULT_DOUBLE = {"flux": 4, "sd3": 5, "chroma": 4, "flux2": 4, "qwenimage": 5, "cogvideox": 5, "hunyuanvideo": 4,
                  "longcat": 4, "zimage": 0, "lumina2": 0}  # fmt: skip
DEFAULT_SINGLE = {"zimage": 8, "lumina2": 8}  # models made only of single-stream layers (others: 4)
CAPTION_TOKENS = 8  # zimage, lumina2: tokens of each concept's own templated caption (the word at index 3)
CONCEPT_TOKENS = 8  # hunyuanvideo: tokens of each concept's own sequence (the word and the template's end)
POOLED_DIM = 256
VIDEO = ("cogvideox", "hunyuanvideo")  # --grid and --frames give (grid / 2)^2 tokens per latent frame


def _flux_sizes(args) -> dict:
    head_dim = args.hidden // args.heads
    return {
        "in_channels": 64,
        "num_layers": args.double,
        "num_single_layers": args.single,
        "attention_head_dim": head_dim,
        "num_attention_heads": args.heads,
        "joint_attention_dim": args.text_dim,
        "axes_dims_rope": (16, 56, 56) if head_dim == 128 else rope_axes_for_head_dim(head_dim),
    }


def _flux_inputs(args) -> dict:
    """Packed latents, prompt states and position ids of a Flux-style forward."""
    n = args.grid * args.grid
    ids = torch.zeros(args.grid, args.grid, 3)
    ids[..., 1] += torch.arange(args.grid)[:, None]
    ids[..., 2] += torch.arange(args.grid)[None, :]
    return {
        "hidden_states": torch.randn(1, n, 64),
        "encoder_hidden_states": torch.randn(1, args.text_tokens, args.text_dim),
        "timestep": torch.tensor([0.5]),  # t in [0, 1]
        "img_ids": ids.view(n, 3),
        "txt_ids": torch.zeros(args.text_tokens, 3),
    }


def build_flux(args):
    """Random Flux transformer, its forward inputs (CPU, fp32) and its config (with the blocks to trace)."""
    transformer = FluxTransformer2DModel(**_flux_sizes(args), pooled_projection_dim=POOLED_DIM)
    inputs = {**_flux_inputs(args), "pooled_projections": torch.randn(1, POOLED_DIM)}
    model = {"double_blocks": args.double, "single_blocks": args.single, "traced_blocks": list(range(args.double))}
    return transformer, inputs, model


def build_chroma(args):
    """Random Chroma transformer and a masked prompt (a quarter valid, as the pipeline pads)."""
    transformer = ChromaTransformer2DModel(
        **_flux_sizes(args), approximator_num_channels=64, approximator_hidden_dim=args.hidden, approximator_layers=2
    )
    mask = torch.ones(1, args.text_tokens + args.grid * args.grid)
    mask[:, args.text_tokens // 4 + 1 : args.text_tokens] = 0  # prompt + one padding token valid
    inputs = {**_flux_inputs(args), "attention_mask": mask}
    model = {"double_blocks": args.double, "single_blocks": args.single, "traced_blocks": list(range(args.double))}
    return transformer, inputs, model


def build_sd3(args):
    """Random SD3 transformer, its forward inputs (CPU, fp32) and its config (with the blocks to trace)."""
    latent = 2 * args.grid  # patch size 2: grid x grid image tokens
    qk_norm = None if args.qk_norm == "none" else args.qk_norm
    transformer = SD3Transformer2DModel(
        sample_size=latent,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=args.double,
        attention_head_dim=args.hidden // args.heads,
        num_attention_heads=args.heads,
        joint_attention_dim=args.text_dim,
        caption_projection_dim=args.hidden,
        pooled_projection_dim=POOLED_DIM,
        pos_embed_max_size=latent,
        qk_norm=qk_norm,
    )
    inputs = {
        "hidden_states": torch.randn(1, 16, latent, latent),
        "encoder_hidden_states": torch.randn(1, args.text_tokens, args.text_dim),
        "pooled_projections": torch.randn(1, POOLED_DIM),
        "timestep": torch.tensor([500.0]),  # SD3 takes t in [0, 1000], unscaled
    }
    # The last block is `context_pre_only`: its text queries were never trained, so it cannot be traced.
    traced = [i for i, block in enumerate(transformer.transformer_blocks) if not block.context_pre_only]
    model = {"double_blocks": args.double, "qk_norm": args.qk_norm, "traced_blocks": traced}
    return transformer, inputs, model


def build_flux2(args):
    """Random Flux.2 transformer; text ids (0, 0, 0, l), image ids (0, h, w, 0), as the pipelines make them."""
    sizes = _flux_sizes(args)
    head_dim = sizes["attention_head_dim"]
    transformer = Flux2Transformer2DModel(
        in_channels=64,
        num_layers=args.double,
        num_single_layers=args.single,
        attention_head_dim=head_dim,
        num_attention_heads=args.heads,
        joint_attention_dim=args.text_dim,
        axes_dims_rope=(head_dim // 4,) * 4,
        guidance_embeds=True,
    )
    grid = torch.cartesian_prod(torch.arange(1), torch.arange(args.grid), torch.arange(args.grid), torch.arange(1))
    text = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(args.text_tokens))
    inputs = {
        "hidden_states": torch.randn(1, args.grid * args.grid, 64),
        "encoder_hidden_states": torch.randn(1, args.text_tokens, args.text_dim),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([4.0]),
        "img_ids": grid,
        "txt_ids": text,
    }
    model = {"double_blocks": args.double, "single_blocks": args.single, "traced_blocks": list(range(args.double))}
    return transformer, inputs, model


def build_qwenimage(args):
    """Random Qwen-Image transformer and a masked prompt (a quarter valid); the last block is never traced."""
    sizes = _flux_sizes(args)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=args.double,
        attention_head_dim=sizes["attention_head_dim"],
        num_attention_heads=args.heads,
        joint_attention_dim=args.text_dim,
        axes_dims_rope=sizes["axes_dims_rope"],
    )
    mask = torch.zeros(1, args.text_tokens, dtype=torch.bool)
    mask[:, : args.text_tokens // 4] = True
    inputs = {
        "hidden_states": torch.randn(1, args.grid * args.grid, 64),
        "encoder_hidden_states": torch.randn(1, args.text_tokens, args.text_dim),
        "encoder_hidden_states_mask": mask,
        "timestep": torch.tensor([0.5]),
        "img_shapes": [[(1, args.grid, args.grid)]],
    }
    model = {"double_blocks": args.double, "traced_blocks": list(range(args.double - 1))}
    return transformer, inputs, model


def build_cogvideox(args):
    """Random CogVideoX (5B layout) and a video of ``args.frames`` latent frames; RoPE as the pipeline makes it."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    side = args.grid // 2  # patch 2: (grid / 2)^2 tokens per latent frame
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=args.heads,
        attention_head_dim=args.hidden // args.heads,
        in_channels=16,
        out_channels=16,
        time_embed_dim=512,
        text_embed_dim=args.text_dim,
        num_layers=args.double,
        sample_width=2 * side,
        sample_height=2 * side,
        sample_frames=(args.frames - 1) * 4 + 1,
        max_text_seq_length=args.text_tokens,
        use_rotary_positional_embeddings=True,
    )
    rotary = get_3d_rotary_pos_embed(
        embed_dim=args.hidden // args.heads,
        crops_coords=get_resize_crop_region_for_grid((side, side), side, side),
        grid_size=(side, side),
        temporal_size=args.frames,
    )
    inputs = {
        "hidden_states": torch.randn(1, args.frames, 16, 2 * side, 2 * side),
        "encoder_hidden_states": torch.randn(1, args.text_tokens, args.text_dim),
        "timestep": torch.tensor([500]),  # a training timestep in [0, 1000)
        "image_rotary_emb": rotary,
    }
    model = {"double_blocks": args.double, "latent_frames": args.frames, "traced_blocks": list(range(args.double))}
    return transformer, inputs, model


def build_hunyuanvideo(args):
    """Random HunyuanVideo transformer, a video as ``cogvideox``'s, a masked prompt (a quarter valid)."""
    side = args.grid // 2
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=16,
        out_channels=16,
        num_attention_heads=args.heads,
        attention_head_dim=args.hidden // args.heads,
        num_layers=args.double,
        num_single_layers=args.single,
        text_embed_dim=args.text_dim,
        pooled_projection_dim=POOLED_DIM,
        rope_axes_dim=_video_rope_axes(args.hidden // args.heads),
    )
    mask = torch.zeros(1, args.text_tokens)
    mask[:, : args.text_tokens // 4] = 1
    inputs = {
        "hidden_states": torch.randn(1, 16, args.frames, 2 * side, 2 * side),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, args.text_tokens, args.text_dim),
        "encoder_attention_mask": mask,
        "pooled_projections": torch.randn(1, POOLED_DIM),
        "guidance": torch.tensor([6000.0]),
    }
    model = {"double_blocks": args.double, "single_blocks": args.single, "latent_frames": args.frames,
             "traced_blocks": list(range(args.double))}  # fmt: skip
    return transformer, inputs, model


def _video_rope_axes(head_dim: int) -> tuple[int, int, int]:
    """RoPE axes (t, h, w) summing to the head size, in HunyuanVideo's 16 : 56 : 56 proportion (even sizes)."""
    spatial = (head_dim * 56 // 128) // 2 * 2
    return head_dim - 2 * spatial, spatial, spatial


def build_longcat(args):
    """Random LongCat-Image transformer: Flux.1's blocks, the timestep-only modulation, image ids offset by the
    prompt block (text ids (0, i, i), image ids (1, T + row, T + column))."""
    transformer = LongCatImageTransformer2DModel(**_flux_sizes(args), pooled_projection_dim=POOLED_DIM)
    inputs = _flux_inputs(args)
    inputs["img_ids"][:, 0] = 1
    inputs["img_ids"][:, 1:] += args.text_tokens
    positions = torch.arange(args.text_tokens, dtype=torch.float32)
    inputs["txt_ids"] = torch.stack([torch.zeros_like(positions), positions, positions], dim=-1)
    model = {"double_blocks": args.double, "single_blocks": args.single, "traced_blocks": list(range(args.double))}
    return transformer, inputs, model


def _single_stream_rope_axes(head_dim: int) -> list[int]:
    """RoPE axes (caption/frame, h, w) summing to the head size, in Z-Image's 32 : 48 : 48 proportion (even sizes)."""
    spatial = (head_dim * 48 // 128) // 2 * 2
    return [head_dim - 2 * spatial, spatial, spatial]


def build_zimage(args):
    """Random Z-Image transformer (only single-stream layers, 2 context and 2 noise refiner layers), one latent of
    grid x grid patches and a caption of ``--text-tokens`` (both padded to multiples of 32 inside the model)."""
    transformer = ZImageTransformer2DModel(
        in_channels=16,
        dim=args.hidden,
        n_layers=args.single,
        n_refiner_layers=2,
        n_heads=args.heads,
        n_kv_heads=args.heads,
        cap_feat_dim=args.text_dim,
        axes_dims=_single_stream_rope_axes(args.hidden // args.heads),
        axes_lens=[1024, 512, 512],
    )
    inputs = {
        "x": [torch.randn(16, 1, 2 * args.grid, 2 * args.grid)],
        "t": torch.tensor([0.5]),
        "cap_feats": [torch.randn(args.text_tokens, args.text_dim)],
    }
    return transformer, inputs, {"single_blocks": args.single, "traced_blocks": []}


def build_lumina2(args):
    """Random Lumina-2 transformer (only single-stream layers, 2 refiner layers each, K/V heads half the query
    heads), a latent of grid x grid patches and a masked caption (a quarter valid, as the pipeline pads)."""
    transformer = Lumina2Transformer2DModel(
        in_channels=16,
        hidden_size=args.hidden,
        num_layers=args.single,
        num_refiner_layers=2,
        num_attention_heads=args.heads,
        num_kv_heads=max(1, args.heads // 2),
        axes_dim_rope=tuple(_single_stream_rope_axes(args.hidden // args.heads)),
        axes_lens=(300, 512, 512),
        cap_feat_dim=args.text_dim,
    )
    mask = torch.zeros(1, args.text_tokens, dtype=torch.int64)
    mask[:, : args.text_tokens // 4] = 1
    inputs = {
        "hidden_states": torch.randn(1, 16, 2 * args.grid, 2 * args.grid),
        "timestep": torch.tensor([0.5]),
        "encoder_hidden_states": torch.randn(1, args.text_tokens, args.text_dim),
        "encoder_attention_mask": mask,
    }
    return transformer, inputs, {"single_blocks": args.single, "traced_blocks": []}


BUILDERS = {
    "zimage": build_zimage,
    "lumina2": build_lumina2,
    "cogvideox": build_cogvideox,
    "hunyuanvideo": build_hunyuanvideo,
    "flux": build_flux,
    "sd3": build_sd3,
    "chroma": build_chroma,
    "flux2": build_flux2,
    "qwenimage": build_qwenimage,
    "longcat": build_longcat,
}


def build(args):
    """The transformer (on device, eval), its inputs, a session tracing the model's traced blocks, the config."""
    torch.manual_seed(0)
    transformer, inputs, model = BUILDERS[args.arch](args)
    transformer = transformer.to(args.device, args.dtype).eval()
    inputs = {k: _to(v, args.device, args.dtype) for k, v in inputs.items()}
    concepts = [f"concept{i}" for i in range(args.concepts)]
    # Backend-private extras: a chat-template header of 3 tokens (Flux.2's text positions); the token refiner of
    # HunyuanVideo runs on each concept's own sequence.
    extras: object = ConceptPositions((3,) * args.concepts) if args.arch == "flux2" else None
    if args.arch == "longcat":  # concepts at text position 0, where a one-word prompt's first token sits
        extras = ConceptPositions((0,) * args.concepts)
    if args.arch in ("zimage", "lumina2"):  # each concept's templated caption, refined on its own
        captions = tuple(
            torch.randn(CAPTION_TOKENS, args.text_dim, device=args.device, dtype=args.dtype) for _ in concepts
        )
        extras = CaptionSequences(captions, ((3, 4),) * args.concepts, "first")
    if args.arch == "hunyuanvideo":
        states = torch.randn(args.concepts, CONCEPT_TOKENS, args.text_dim, device=args.device, dtype=args.dtype)
        mask = torch.ones(args.concepts, CONCEPT_TOKENS, device=args.device, dtype=args.dtype)
        extras = ConceptSequences(states, mask, ((0, 1),) * args.concepts, "first")
    embeddings = ConceptEmbeddings(
        states=torch.randn(args.concepts, args.text_dim, device=args.device, dtype=args.dtype),
        tokens=tuple((c,) for c in concepts),
        pooling="first",
        extras=extras,
    )
    if args.trace_single:  # every single-stream block too: the concepts run through the whole model
        if "single_blocks" not in model:
            raise SystemExit(f"--trace-single: {args.arch} has no single-stream blocks")
        model["traced_single_blocks"] = list(range(args.single))
    single = model.get("traced_single_blocks")  # None: the backend's default (none, or a single-only model's rule)
    config = ConceptAttentionConfig(layers=tuple(model["traced_blocks"]) or "none", single_layers=single)
    session = ConceptSession(transformer, embeddings, concepts, config)
    if single is None and session.state.blocks.single:  # a single-only model's default layers
        model["traced_single_blocks"] = list(session.state.blocks.single)
    return transformer, inputs, session, model


def _to(value, device: str, dtype: torch.dtype):
    """Tensors (also inside tuples, such as RoPE's (cos, sin)) on the device; floats in the benchmark dtype."""
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device, dtype) for v in value)
    if torch.is_tensor(value):
        return value.to(device, dtype if value.is_floating_point() else value.dtype)
    return value


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def forward_call(transformer, inputs):
    """One forward of ``transformer`` on ``inputs``; an encode session's early stop counts as done."""

    def call() -> None:
        with contextlib.suppress(StopForward):
            transformer(**inputs, return_dict=False)

    return call


def timed(call, device: str, session=None) -> float:
    """Seconds of one ``call()`` (attached to ``session`` when given; attach/detach not timed)."""
    with session if session is not None else contextlib.nullcontext():
        sync(device)
        start = time.perf_counter()
        call()
        sync(device)
        return time.perf_counter() - start


def peak_bytes(call, device: str, session=None) -> int:
    """Peak of live tensor bytes allocated during one ``call()`` (inputs and weights excluded)."""
    with session if session is not None else contextlib.nullcontext():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            call()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            call()
        events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
        live = peak = 0
        for event in events:
            live += event.self_cpu_memory_usage
            peak = max(peak, live)
        return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="flux", choices=sorted(BUILDERS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--double", type=int, help="double-stream / joint blocks; default 4 (Flux, Chroma) / 5 (SD3)")
    parser.add_argument(
        "--single", type=int, help="single-stream blocks; default 4 (Flux family) / 8 (Z-Image, Lumina-2)"
    )
    parser.add_argument("--grid", type=int, default=32, help="image tokens = grid * grid (cogvideox: per 2 frames)")
    parser.add_argument("--frames", type=int, default=8, help="cogvideox: latent frames")
    parser.add_argument("--text-tokens", type=int, default=128)
    parser.add_argument("--text-dim", type=int, default=512)
    parser.add_argument("--concepts", type=int, default=5)
    parser.add_argument("--qk-norm", default="rms_norm", choices=["rms_norm", "none"], help="SD3 only")
    parser.add_argument("--trace-single", action="store_true", help="also trace every single-stream block")
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype)
    if args.double is None:
        args.double = DEFAULT_DOUBLE[args.arch]
    if args.single is None:
        args.single = DEFAULT_SINGLE.get(args.arch, 4)

    transformer, inputs, session, model = build(args)
    forward = forward_call(transformer, inputs)
    with torch.inference_mode():
        for _ in range(args.warmup):
            timed(forward, args.device)
            timed(forward, args.device, session)
        plain, traced = [], []
        for i in range(args.repeats):
            # Alternate the order within each pair so that drift does not favour either side.
            if i % 2 == 0:
                plain.append(timed(forward, args.device))
                traced.append(timed(forward, args.device, session))
            else:
                traced.append(timed(forward, args.device, session))
                plain.append(timed(forward, args.device))
        peak_plain = peak_bytes(forward, args.device)
        peak_traced = peak_bytes(forward, args.device, session)
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
            "arch": args.arch,
            "hidden": args.hidden,
            "heads": args.heads,
            "image_tokens": args.frames * (args.grid // 2) ** 2 if args.arch in VIDEO else args.grid**2,
            "text_tokens": args.text_tokens,
            "concepts": args.concepts,
            **model,
        },
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print(f"plain {result['plain_ms_median']} ms, traced {result['traced_ms_median']} ms (medians of {args.repeats})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
