"""Command line: ``conceptattention demo | encode | generate``.

Thin surface over the Python API; every user error becomes a one-line message and
exit code 2, never a traceback.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from conceptattention.errors import ConceptAttentionError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Where does a diffusion transformer put each word?")
console = Console(stderr=True)
_settings = {"debug": False}


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback of unexpected errors.")] = False,
) -> None:
    _settings["debug"] = debug

ModelOption = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Hub id or local pipeline folder (default: the bundled model)."),
]
OutOption = Annotated[Path, typer.Option("--out", "-o", help="Folder for heatmaps, overlays, maps.npz, metadata.json.")]
ConceptsOption = Annotated[
    list[str], typer.Option("--concepts", "-c", help="Concept words: repeat the option or separate with commas.")
]
SeedOption = Annotated[int, typer.Option(help="Seed of the noise.")]
ScoreSpaceOption = Annotated[str, typer.Option(help="output | cross_attention | value")]
KeysOption = Annotated[str, typer.Option(help="Concept keys: both | image | concepts")]
SoftmaxOption = Annotated[
    bool | None, typer.Option("--softmax/--no-softmax", help="Softmax over concepts (default: on when 2+ concepts).")
]
PoolingOption = Annotated[str, typer.Option(help="Sub-token pooling: first | mean")]
ConceptEncoderOption = Annotated[
    str | None,
    typer.Option(help="Prompt encoder for the concepts (default: the model's; SD3: t5 or clip)."),
]
LayersOption = Annotated[
    str | None,
    typer.Option(help="Double-stream block indices, e.g. '15,16,17' or '9-18', or all | none (default: the model's)."),
]
SingleLayersOption = Annotated[
    str | None,
    typer.Option(help="Single-stream block indices, e.g. '0-37', or all | none (default: none, as the paper)."),
]
DeviceOption = Annotated[str | None, typer.Option(help="Device, e.g. cuda (default: cuda if available, else cpu).")]
OverwriteOption = Annotated[
    bool, typer.Option(help="Replace a result already saved in --out (its files are removed first).")
]
DtypeOption = Annotated[str | None, typer.Option(help="float32 | bfloat16 | float16 (default: the model's own).")]
NumFramesOption = Annotated[
    int | None, typer.Option(help="Video models: frames to generate or encode (default: the model's; CogVideoX 4k+1).")
]
FramesOption = Annotated[bool, typer.Option(help="Video results: also save every frame as a PNG.")]


def _fail_cleanly(command: Callable) -> Callable:
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (ConceptAttentionError, OSError) as error:
            console.print(f"Error: {error}", style="bold red", markup=False, highlight=False)
            raise typer.Exit(code=2) from None
        except Exception as error:  # a bug or an unforeseen failure: one line unless --debug
            if _settings["debug"]:
                raise
            first = (str(error).splitlines() or [""])[0]
            console.print(
                f"Unexpected error: {type(error).__name__}: {first} (run with --debug for the traceback)",
                style="bold red", markup=False, highlight=False,
            )  # fmt: skip
            raise typer.Exit(code=1) from None

    return wrapper


def parse_concepts(values: list[str]) -> list[str]:
    """``["dog,sky", "grass"]`` -> ``["dog", "sky", "grass"]``, rejecting empty items."""
    concepts: list[str] = []
    for value in values:
        parts = [p.strip() for p in value.split(",")]
        if any(not p for p in parts):
            raise ConceptAttentionError(
                f"`--concepts {value!r}` has an empty item; write e.g. --concepts dog,sky,grass"
            )
        concepts.extend(parts)
    if not concepts:
        raise ConceptAttentionError("no concepts given; add e.g. --concepts dog,sky,grass")
    return concepts


def parse_blocks(value: str | None, name: str) -> Any:
    """``--layers`` / ``--single-layers``: ``all``, ``none``, or comma-separated indices and ``a-b`` ranges."""
    if value is None:
        return None
    text = value.strip()
    if text in ("all", "none"):
        return text
    indices: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        low, dash, high = part.partition("-")
        try:
            indices.extend(range(int(low), int(high) + 1) if dash else [int(part)])
        except ValueError:
            raise ConceptAttentionError(
                f"`--{name}` must be all, none, or comma-separated indices and ranges such as '0,2,5-9', got {value!r}"
            ) from None
        if dash and int(high) < int(low):
            raise ConceptAttentionError(f"`--{name}`: the range {part!r} is empty (write low-high)")
    return indices


def parse_indices(value: str | None, name: str) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ConceptAttentionError(f"`--{name}` must be comma-separated integers, got {value!r}") from None


def _config(
    score_space: str,
    concept_keys: str,
    softmax: bool | None,
    pooling: str,
    layers: str | None,
    steps=None,
    concept_encoder: str | None = None,
    single_layers: str | None = None,
):
    from conceptattention.config import ConceptAttentionConfig

    return ConceptAttentionConfig(
        concept_encoder=concept_encoder,
        layers=parse_blocks(layers, "layers"),
        single_layers=parse_blocks(single_layers, "single-layers"),
        steps=parse_indices(steps, "trace-steps"),
        score_space=score_space,
        concept_keys=concept_keys,
        softmax=softmax,
        pooling=pooling,
    )


def check_positive(**values: int | float | None) -> None:
    """Options that must be positive when given (steps, sizes, limits, batch sizes, sample counts)."""
    for name, value in values.items():
        if value is not None and value <= 0:
            option = "--" + name.replace("_", "-")
            raise ConceptAttentionError(f"`{option}` must be positive, got {value!r}")


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse, before any compute, an output folder that holds another result (unless overwriting)."""
    from conceptattention.outputs import clear_result_folder

    if not overwrite:
        clear_result_folder(out, overwrite=False)


def check_seed(seed: int) -> None:
    if not 0 <= seed < 2**64:
        raise ConceptAttentionError(f"`--seed` must be in [0, 2**64), got {seed}")


def check_device(device: str) -> str:
    """A device this machine has, or a one-line error naming the ones it has."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ConceptAttentionError(f"`--device` {device!r} is not a device name; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConceptAttentionError(f"`--device` {device!r}: CUDA is not available on this machine; use cpu")
        if parsed.index is not None and parsed.index >= count:
            raise ConceptAttentionError(
                f"`--device` {device!r}: this machine has {count} CUDA device(s) (0-{count - 1})"
            )
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ConceptAttentionError(f"`--device` {device!r}: MPS is not available on this machine; use cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise ConceptAttentionError(f"`--device` {device!r} is not supported; use cpu, cuda or cuda:N")
    return device


def _load(model: str | None, device: str | None, dtype: str | None):
    import torch

    from conceptattention.loading import load_pipeline

    device = check_device(device) if device else ("cuda" if torch.cuda.is_available() else "cpu")
    _quiet_loading()
    with console.status(f"Loading {model or 'the bundled model'} ..."):
        pipe = load_pipeline(model, dtype=dtype, device=device)
    pipe.set_progress_bar_config(disable=False, leave=False)
    return pipe


def _quiet_loading() -> None:
    """Loading bars of diffusers/transformers would interleave with ours; the denoising bar stays."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    # transformers notes on every pipeline load that torchvision is absent; nothing here uses it.
    # The filter sits on the emitting logger: with CI=true transformers propagates records to the
    # root handler, which never sees a filter placed on transformers' own handler.
    logging.getLogger("transformers.utils.import_utils").addFilter(_not_torchvision_notice)


def _not_torchvision_notice(record: logging.LogRecord) -> bool:
    return "requires torchvision" not in record.getMessage()


def _summary(title: str, written: list[Path]) -> None:
    """The written files; per-frame PNGs of a video result are listed as one line per folder."""
    table = Table(title=title, show_header=False)
    folders: dict[Path, int] = {}
    for path in written:
        if path.suffix == ".png" and path.parent.parent.name == "frames":
            folders[path.parent] = folders.get(path.parent, 0) + 1
            continue
        table.add_row(str(path))
    for folder, count in folders.items():
        table.add_row(f"{folder}/ ({count} frames)")
    Console().print(table)


@app.command()
@_fail_cleanly
def encode(
    image: Annotated[
        Path,
        typer.Argument(
            metavar="IMAGE_OR_VIDEO",
            help="Image file (any format Pillow reads), or for video models a video (MP4, WebM, GIF, ...).",
        ),
    ],
    concepts: ConceptsOption,
    caption: Annotated[str, typer.Option(help="Caption for the forward pass.")] = "",
    model: ModelOption = None,
    out: OutOption = Path("outputs/encode"),
    seed: SeedOption = 0,
    t: Annotated[float, typer.Option(help="Noise level in (0, 1).")] = 0.5,
    num_samples: Annotated[int, typer.Option(help="Noise draws to average.")] = 1,
    height: Annotated[int | None, typer.Option(help="Model resolution (default: the model's).")] = None,
    width: Annotated[int | None, typer.Option(help="Model resolution (default: the model's).")] = None,
    num_frames: NumFramesOption = None,
    score_space: ScoreSpaceOption = "output",
    concept_keys: KeysOption = "both",
    softmax: SoftmaxOption = None,
    pooling: PoolingOption = "first",
    concept_encoder: ConceptEncoderOption = None,
    layers: LayersOption = None,
    single_layers: SingleLayersOption = None,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    overwrite: OverwriteOption = False,
    frames: FramesOption = False,
) -> None:
    """Concept maps of a real image (or, with a video model, of a real video)."""
    from conceptattention.encode import encode_image, encode_video
    from conceptattention.images import load_image
    from conceptattention.plan import model_plan
    from conceptattention.videos import is_video_file, load_video

    check_positive(num_samples=num_samples, height=height, width=width, num_frames=num_frames)
    check_seed(seed)
    words = parse_concepts(concepts)
    config = _config(score_space, concept_keys, softmax, pooling, layers, None, concept_encoder, single_layers)
    if device:
        check_device(device)
    check_output(out, overwrite)
    is_video = is_video_file(image)
    what = f"{'VIDEO' if is_video else 'IMAGE'} {str(image)!r}"
    source = load_video(image, what) if is_video else load_image(image, what)  # unreadable files fail before loading
    pipe = _load(model, device, dtype)
    if is_video:
        model_plan(pipe).require("video", f"{str(image)!r} is a video", "give an image, or a video model "
                                 "(e.g. --model THUDM/CogVideoX-2b)")  # fmt: skip
    else:
        model_plan(pipe).require("image", f"{str(image)!r} is a single image", "give a video file (MP4, WebM, "
                                 "GIF, ...)")  # fmt: skip
    options: dict[str, Any] = {"caption": caption, "config": config, "t": t, "num_samples": num_samples, "seed": seed}
    options.update(height=height, width=width)
    with console.status(f"Encoding with {num_samples} noise sample(s) ..."):
        if is_video:
            maps = encode_video(pipe, source, words, num_frames=num_frames, **options)
        else:
            if num_frames is not None:
                raise ConceptAttentionError("`--num-frames` applies to videos only")
            maps = encode_image(pipe, source, words, **options)
    _summary(f"Wrote {out}", maps.save(out, overwrite=overwrite, frames=frames))


@app.command()
@_fail_cleanly
def generate(
    prompt: Annotated[str, typer.Argument(help="Text prompt.")],
    concepts: ConceptsOption,
    model: ModelOption = None,
    out: OutOption = Path("outputs/generate"),
    seed: SeedOption = 0,
    steps: Annotated[int | None, typer.Option(help="Denoising steps (default: the model's).")] = None,
    height: Annotated[int | None, typer.Option(help="Image height (default: the model's).")] = None,
    width: Annotated[int | None, typer.Option(help="Image width (default: the model's).")] = None,
    guidance_scale: Annotated[float | None, typer.Option(help="Guidance scale (the pipeline's).")] = None,
    num_frames: NumFramesOption = None,
    trace_steps: Annotated[str | None, typer.Option(help="Step indices to trace, e.g. '0,1' (default: all).")] = None,
    score_space: ScoreSpaceOption = "output",
    concept_keys: KeysOption = "both",
    softmax: SoftmaxOption = None,
    pooling: PoolingOption = "first",
    concept_encoder: ConceptEncoderOption = None,
    layers: LayersOption = None,
    single_layers: SingleLayersOption = None,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    overwrite: OverwriteOption = False,
    frames: FramesOption = False,
) -> None:
    """Generate an image (or a video, with a video model) from a prompt and map each concept in it."""
    from conceptattention.generate import generate as run_generate
    from conceptattention.plan import model_plan

    check_positive(steps=steps, height=height, width=width, num_frames=num_frames)
    check_seed(seed)
    if guidance_scale is not None and guidance_scale < 0:
        raise ConceptAttentionError(f"`--guidance-scale` must be >= 0, got {guidance_scale}")
    words = parse_concepts(concepts)
    config = _config(score_space, concept_keys, softmax, pooling, layers, trace_steps, concept_encoder, single_layers)
    if device:
        check_device(device)
    check_output(out, overwrite)
    pipe = _load(model, device, dtype)
    given = {"height": height, "width": width, "guidance_scale": guidance_scale, "num_frames": num_frames}
    extra = {k: v for k, v in given.items() if v is not None}  # 0 is passed on, not replaced
    if num_frames is not None:
        model_plan(pipe).require("video", "`--num-frames` applies to video models only", "leave it out")
    maps = run_generate(pipe, prompt, words, config=config, seed=seed, num_inference_steps=steps, **extra)
    _summary(f"Wrote {out}", maps.save(out, overwrite=overwrite, frames=frames))


@app.command()
@_fail_cleanly
def demo(
    out: OutOption = Path("outputs"),
    model: ModelOption = None,
    scene: Annotated[
        list[int] | None, typer.Option(help="Held-out test scene to encode; repeat for several (default: 0 1 2 3).")
    ] = None,
    prompt: Annotated[str, typer.Option(help="Prompt of the generated example.")] = "a photo of lemon, brick and grass",
) -> None:
    """Offline demo on the bundled model: encode test scenes (with IoU) and generate one."""
    from conceptattention.demo import DEFAULT_SCENES, run_demo

    _quiet_loading()
    run_demo(out=out, model=model, scenes=scene or DEFAULT_SCENES, prompt=prompt, console=Console())


@app.command(name="eval")
@_fail_cleanly
def eval_command(
    dataset: Annotated[str, typer.Argument(help="imagenet-seg | voc-single | voc-multi | scenes")],
    data: Annotated[
        Path | None, typer.Option(help="gtsegs_ijcv.mat, or the VOCdevkit folder (not for scenes).")
    ] = None,
    model: ModelOption = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for records.*.jsonl and the report.")] = Path(
        "outputs/eval"
    ),
    method: Annotated[list[str] | None, typer.Option(help="Method(s); repeat (default: concept_attention).")] = None,
    t: Annotated[list[float] | None, typer.Option(help="Noise level(s); repeat for a timestep sweep.")] = None,
    num_samples: Annotated[int | None, typer.Option(help="Noise draws per image (default: dataset protocol).")] = None,
    resolution: Annotated[int | None, typer.Option(help="Square model resolution (default: the model's).")] = None,
    blur: Annotated[bool | None, typer.Option("--blur/--no-blur", help="3x3 Gaussian blur on maps.")] = None,
    per_block: Annotated[bool, typer.Option(help="Also score every selected block (per-block sweep).")] = False,
    layers: LayersOption = None,
    single_layers: SingleLayersOption = None,
    seed: SeedOption = 0,
    limit: Annotated[int | None, typer.Option(help="Only the first N images.")] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Forwards (image x draw rows) per call (default: by free GPU memory; CPU 4).")
    ] = None,
    words: Annotated[str, typer.Option(help="ImageNet class words: short (paper) | lemma (WordNet).")] = "short",
    dtype: DtypeOption = None,
    overwrite: Annotated[bool, typer.Option(help="Delete results computed with other settings in --out.")] = False,
) -> None:
    """Zero-shot segmentation benchmark; resumable (rerun the same command), shardable with accelerate launch."""
    from conceptattention.eval.config import EvalConfig
    from conceptattention.eval.run import run_eval

    check_positive(limit=limit, batch_size=batch_size, num_samples=num_samples, resolution=resolution)
    check_seed(seed)
    config = EvalConfig(
        dataset=dataset, data=data, model=model, out=out, methods=tuple(method or ["concept_attention"]),
        t_values=tuple(t or [0.5]), num_samples=num_samples, resolution=resolution, blur=blur, per_block=per_block,
        layers=parse_blocks(layers, "layers"), single_layers=parse_blocks(single_layers, "single-layers"), seed=seed,
        limit=limit, batch_size=batch_size,
        words=words, dtype=dtype, overwrite=overwrite,
    )  # fmt: skip
    _quiet_loading()
    written = run_eval(config, console)
    if written:
        Console().print((out / "report.md").read_text())
        _summary(f"Wrote {out}", written)


@app.command(name="app")
@_fail_cleanly
def app_command(
    model: ModelOption = None,
    dtype: DtypeOption = None,
    device: DeviceOption = None,
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 7860,
    host: Annotated[
        str, typer.Option(help="Address to bind; 0.0.0.0 exposes the app to the network (no share link ever).")
    ] = "127.0.0.1",
) -> None:
    """Local web app (Gradio) to explore concept maps in the browser; needs the [app] extra."""
    from conceptattention.app import launch, require_gradio

    if not 0 < port < 65536:
        raise ConceptAttentionError(f"`--port` must be in 1-65535, got {port}")
    require_gradio()  # before loading the model
    if device:
        check_device(device)
    pipe = _load(model, device, dtype)
    launch(pipe, host=host, port=port)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
