"""The Gradio page: two tabs (Generate, Explain an image) over one loaded pipeline, shared method controls.

Every run goes through one queue with one worker (``concurrency_id="model"``), so the model
serves one job at a time and waiting visitors see their place in the queue. A bad input or a
failed job is a one-line message in the page's status line; the app keeps serving.
"""

from __future__ import annotations

import html
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from conceptattention.app import logic
from conceptattention.errors import ConceptAttentionError

logger = logging.getLogger(__name__)

MODEL_QUEUE = "model"
PROGRESS = gr.Progress()
TRACK_TQDM = gr.Progress(track_tqdm=True)  # follows the pipeline's denoising bar
QUEUE_MAX_SIZE = 64
CSS = """
.ca-status-error { color: #b91c1c; font-weight: 600; }
.ca-pixelated img { image-rendering: pixelated; }
#exp-image img { width: 100%; height: 100%; object-fit: contain; }
"""


def _image_upload_class() -> type[gr.Image]:
    """``gr.Image`` that hands the uploaded file's path over undecoded.

    Gradio's own preprocessing opens the file, so an unreadable or enormous upload would fail
    there with a bare "Error"; here the app checks bytes, pixels and format itself
    (:func:`conceptattention.app.logic.check_upload`) and says what is wrong. Gradio writes a
    ``.pyi`` stub beside the module of every component class it sees defined; that is switched
    off while this one is made, so the installed package is never written to.
    """
    from gradio import component_meta

    write_stub = getattr(component_meta, "create_or_modify_pyi", None)
    component_meta.create_or_modify_pyi = lambda *args, **kwargs: None  # type: ignore[attr-defined]
    try:

        class ImageUpload(gr.Image):
            def get_block_name(self) -> str:
                return "image"  # the stock image widget in the browser

            def preprocess(self, payload: Any) -> Any:
                if payload is None or getattr(payload, "path", None) is None:
                    return super().preprocess(payload)  # nothing uploaded, or a data: URL (webcam, paste)
                return str(payload.path)

    finally:
        if write_stub is not None:
            component_meta.create_or_modify_pyi = write_stub  # type: ignore[attr-defined]
    return ImageUpload


ImageUpload = _image_upload_class()


@dataclass
class Outputs:
    """The result widgets of one tab."""

    status: gr.Markdown
    image: gr.Image
    overlays: gr.Gallery
    segmentation: gr.Image
    strip: gr.Image
    download: gr.File
    state: gr.State

    def all(self) -> list[Any]:
        return [self.status, self.image, self.overlays, self.segmentation, self.strip, self.download, self.state]

    def pictures(self) -> list[Any]:
        return [self.image, self.overlays, self.segmentation, self.strip]


def _outputs(prefix: str) -> Outputs:
    status = gr.Markdown("", elem_id=f"{prefix}-status")
    with gr.Row():
        image = gr.Image(
            label="Image",
            type="pil",
            format="png",
            interactive=False,
            elem_id=f"{prefix}-image",
            elem_classes=["ca-pixelated"],
        )
        segmentation = gr.Image(
            label="Segmentation (argmax over concepts)",
            type="pil",
            format="png",
            interactive=False,
            elem_id=f"{prefix}-segmentation",
        )
    overlays = gr.Gallery(
        label="One overlay per concept",
        columns=4,
        height="auto",
        object_fit="contain",
        format="png",
        elem_id=f"{prefix}-overlays",
    )
    gr.Markdown("**Concept x block**: the same maps from each selected block alone (where grounding appears)")
    strip = gr.Image(
        label="Concept x block",
        show_label=False,  # the floating label would cover the strip's first column heading
        type="pil",
        format="png",
        interactive=False,
        elem_id=f"{prefix}-strip",
    )
    download = gr.File(
        label="Download: PNGs, maps.npz, metadata.json (zip)", interactive=False, elem_id=f"{prefix}-download"
    )
    return Outputs(status, image, overlays, segmentation, strip, download, gr.State(None))


def status_error(message: str) -> str:
    """The status line for a refused input or a failed job (one line, no traceback)."""
    first = (message.strip().splitlines() or ["(no message)"])[0]
    return f'<span class="ca-status-error">Error: {html.escape(first)}</span>'


def _result(maps: Any, seconds: float, opacity: Any, cmap: str, workdir: Path) -> tuple:
    view = logic.render(maps, opacity, cmap)
    archive = logic.save_zip(maps, workdir)
    status = html.escape(logic.summary(maps, seconds))
    return (status, view.image, view.overlays, view.segmentation, view.block_strip, str(archive), maps)


def _failure(message: str) -> tuple:
    return (status_error(message), None, [], None, None, None, None)


def guarded(job: Callable[..., Any]) -> tuple:
    """Run ``job()``; a user error or a failure becomes the status line instead of a traceback."""
    try:
        return job()
    except ConceptAttentionError as error:
        return _failure(str(error))
    except gr.Error:
        raise
    except Exception as error:  # a bug or an unforeseen failure: logged in full on the server, one line here
        logger.exception("app job failed")
        first = (str(error).splitlines() or [""])[0]
        return _failure(f"Unexpected error: {type(error).__name__}: {first} (the server log has the traceback)")


def build_app(pipe: Any, workdir: str | Path | None = None) -> gr.Blocks:
    """The page for a loaded pipeline (loaded once, shared by every visitor; runs are queued)."""
    info = logic.model_info(pipe)
    work = Path(workdir) if workdir is not None else logic.new_workdir()
    examples = logic.scene_examples(work / "examples")
    choices = logic.block_choices(info)
    default_layers = logic.default_blocks(info)
    first = examples[0]

    def checked_controls(progress, layers, score_space, softmax, pooling, opacity, cmap):
        """The shared controls, validated before any compute: the method config (display options checked)."""
        progress(0, desc="Checking the inputs")
        config = logic.method_config(pipe, layers, score_space, softmax, pooling)
        logic.check_opacity(opacity)
        logic.check_colormap(cmap)
        return config

    def generate_job(
        prompt,
        concepts,
        steps,
        seed,
        height,
        width,
        layers,
        score_space,
        softmax,
        pooling,
        opacity,
        cmap,
        progress=TRACK_TQDM,
    ):
        def job():
            start = time.perf_counter()
            config = checked_controls(progress, layers, score_space, softmax, pooling, opacity, cmap)
            progress(0.02, desc="Generating")
            maps = logic.run_generate(pipe, prompt, concepts, steps, seed, height, width, config)
            progress(0.95, desc="Drawing the maps")
            return _result(maps, time.perf_counter() - start, opacity, cmap, work)

        return guarded(job)

    def explain_job(
        image,
        caption,
        concepts,
        t,
        num_samples,
        seed,
        layers,
        score_space,
        softmax,
        pooling,
        opacity,
        cmap,
        progress=PROGRESS,
    ):
        def job():
            start = time.perf_counter()
            config = checked_controls(progress, layers, score_space, softmax, pooling, opacity, cmap)
            progress(0.1, desc=f"Encoding the image with {num_samples} noise sample(s)")
            maps = logic.run_explain(pipe, image, caption, concepts, t, num_samples, seed, config)
            progress(0.9, desc="Drawing the maps")
            return _result(maps, time.perf_counter() - start, opacity, cmap, work)

        return guarded(job)

    def redraw(maps, opacity, cmap):
        if maps is None:
            return gr.update(), gr.update(), gr.update(), gr.update()
        try:
            view = logic.render(maps, opacity, cmap)
        except ConceptAttentionError as error:
            raise gr.Error(html.escape(str(error)), print_exception=False) from None
        return view.image, view.overlays, view.segmentation, view.block_strip

    with gr.Blocks(title="ConceptAttention", analytics_enabled=False) as demo:
        gr.Markdown(
            f"## ConceptAttention: where does the model put each word?\n"
            f"Model **{html.escape(info.name)}** ({info.architecture}); {html.escape(logic.blocks_summary(info))}. "
            "One job runs at a time; "
            "others wait in the queue with their place shown."
        )
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                gr.Markdown("### Method and display (both tabs)")
                layers = gr.Dropdown(
                    choices,
                    value=default_layers,
                    multiselect=True,
                    label="Layers (double- and single-stream blocks)",
                    info=f"valid: {choices[0]} to {choices[-1]}; the paper's default is double-stream blocks",
                    elem_id="layers",
                )
                score_space = gr.Dropdown(
                    list(logic.SCORE_SPACES), value="output", label="Score space", elem_id="score-space"
                )
                softmax = gr.Radio(
                    list(logic.SOFTMAX_CHOICES),
                    value="auto",
                    label="Softmax over concepts",
                    info="auto: on for 2+ concepts",
                    elem_id="softmax",
                )
                pooling = gr.Radio(list(logic.POOLINGS), value="first", label="Sub-token pooling", elem_id="pooling")
                opacity = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Overlay opacity", elem_id="opacity")
                cmap = gr.Dropdown(list(logic.COLORMAPS), value="inferno", label="Colormap", elem_id="colormap")
            with gr.Column(scale=3), gr.Tabs():
                with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
                    prompt = gr.Textbox(logic.GENERATE_EXAMPLES[0][0], label="Prompt", elem_id="gen-prompt")
                    gen_concepts = gr.Textbox(
                        logic.GENERATE_EXAMPLES[0][1],
                        lines=2,
                        label="Concepts",
                        info="comma-separated or one per line",
                        elem_id="gen-concepts",
                    )
                    with gr.Row():
                        steps = gr.Slider(
                            1,
                            logic.MAX_STEPS,
                            value=min(info.steps, logic.MAX_STEPS),
                            step=1,
                            label="Steps",
                            elem_id="gen-steps",
                        )
                        gen_seed = gr.Number(0, precision=0, label="Seed", elem_id="gen-seed")
                        height = gr.Number(
                            info.size[0],
                            precision=0,
                            info=f"multiple of {info.pixels_per_token}, at most {logic.MAX_SIDE}",
                            step=info.pixels_per_token,
                            label="Height",
                            elem_id="gen-height",
                        )
                        width = gr.Number(
                            info.size[1],
                            precision=0,
                            info=f"multiple of {info.pixels_per_token}, at most {logic.MAX_SIDE}",
                            step=info.pixels_per_token,
                            label="Width",
                            elem_id="gen-width",
                        )
                    gen_button = gr.Button("Generate and map", variant="primary", elem_id="gen-run")
                    gr.Examples(
                        [list(e) for e in logic.GENERATE_EXAMPLES],
                        [prompt, gen_concepts],
                        label="Examples for the bundled model",
                    )
                    gen_out = _outputs("gen")
                with gr.Tab("Explain an image", id="explain", elem_id="tab-explain"):
                    with gr.Row():
                        upload = ImageUpload(
                            str(first.path),
                            type="filepath",
                            image_mode=None,
                            sources=["upload", "clipboard"],
                            label="Image",
                            height=256,
                            elem_id="exp-image",
                            elem_classes=["ca-pixelated"],
                        )
                        with gr.Column():
                            caption = gr.Textbox(first.caption, label="Caption", elem_id="exp-caption")
                            exp_concepts = gr.Textbox(
                                first.concepts,
                                lines=2,
                                label="Concepts",
                                info="comma-separated or one per line",
                                elem_id="exp-concepts",
                            )
                            with gr.Row():
                                t = gr.Slider(
                                    0.05, 0.95, value=0.5, step=0.05, label="t (noise level)", elem_id="exp-t"
                                )
                                samples = gr.Slider(
                                    1,
                                    logic.MAX_NUM_SAMPLES,
                                    value=1,
                                    step=1,
                                    label="Noise samples",
                                    elem_id="exp-samples",
                                )
                                exp_seed = gr.Number(0, precision=0, label="Seed", elem_id="exp-seed")
                    gr.Markdown(
                        f"Uploads: at most {logic.MAX_UPLOAD_BYTES // (1024 * 1024)} MiB and "
                        f"{logic.MAX_UPLOAD_PIXELS / 1e6:g} megapixels; resized to the model's "
                        f"{info.size[0]}x{info.size[1]}."
                    )
                    exp_button = gr.Button("Explain", variant="primary", elem_id="exp-run")
                    gr.Examples(
                        [[str(e.path), e.caption, e.concepts] for e in examples],
                        [upload, caption, exp_concepts],
                        label="Bundled scenes (held-out test set)",
                        examples_per_page=len(examples),
                    )
                    exp_out = _outputs("exp")

        shared = [layers, score_space, softmax, pooling, opacity, cmap]
        gen_button.click(
            generate_job,
            [prompt, gen_concepts, steps, gen_seed, height, width, *shared],
            gen_out.all(),
            concurrency_limit=1,
            concurrency_id=MODEL_QUEUE,
            show_progress="full",
        )
        exp_button.click(
            explain_job,
            [upload, caption, exp_concepts, t, samples, exp_seed, *shared],
            exp_out.all(),
            concurrency_limit=1,
            concurrency_id=MODEL_QUEUE,
            show_progress="full",
        )
        for out in (gen_out, exp_out):  # redraw a shown result with another opacity or colormap (no model run)
            gr.on(
                [opacity.release, cmap.input],
                redraw,
                [out.state, opacity, cmap],
                out.pictures(),
                concurrency_limit=None,
                show_progress="hidden",
            )
    demo.queue(default_concurrency_limit=1, max_size=QUEUE_MAX_SIZE)
    return demo


def launch(pipe: Any, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> gr.Blocks:
    """Serve the page on ``host:port`` (no public share link); ``block=False`` returns once it is up."""
    demo = build_app(pipe)
    demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        max_file_size=logic.MAX_UPLOAD_BYTES,
        ssr_mode=False,
        prevent_thread_lock=not block,
        css=CSS,
        footer_links=["api", "settings"],
    )
    return demo
