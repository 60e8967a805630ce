"""The offline demo: encode held-out synthetic scenes and generate one, with the bundled model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from conceptattention.core import confusion_matrix, iou_per_class
from conceptattention.data.scenes import CLASSES, make_scene
from conceptattention.encode import encode_image
from conceptattention.errors import ConceptAttentionError
from conceptattention.generate import generate
from conceptattention.loading import load_pipeline

DEFAULT_SCENES = (0, 1, 2, 3)


def _scene_ious(pipe, index: int, out: Path) -> tuple[str, dict[str, float], int]:
    """Encode test scene ``index``, save its maps under ``out``; per-concept IoU of the argmax segmentation."""
    from PIL import Image

    scene = make_scene("test", index)
    maps = encode_image(pipe, scene.image, scene.concepts, caption=scene.caption)
    files = maps.save(out, overwrite=True)  # the demo's own folders: rerunning it replaces them
    Image.fromarray(scene.image).resize((256, 256), Image.Resampling.NEAREST).save(out / "scene.png")
    labels = torch.from_numpy(scene.labels)
    class_ids = torch.tensor([CLASSES.index(c) for c in scene.concepts])
    pred = class_ids[maps.segmentation(labels.shape)[0]]
    ious = iou_per_class(confusion_matrix(pred, labels, len(CLASSES)))
    return scene.caption, {c: float(ious[i]) for c, i in zip(scene.concepts, class_ids.tolist())}, len(files) + 1


def run_demo(
    out: Path, model: str | None, scenes: Sequence[int], prompt: str, console: Console
) -> dict[int, dict[str, float]]:
    """Encode held-out test scenes and generate one image; write outputs under ``out``.

    Returns the per-concept IoU of each encoded scene's argmax segmentation, by scene index.
    """
    if not scenes:
        raise ConceptAttentionError("give at least one test scene index (e.g. --scene 0)")
    bad = [i for i in scenes if i < 0]
    if bad:
        raise ConceptAttentionError(f"test scene indices are non-negative, got {bad[0]}")
    results: dict[int, dict[str, float]] = {}
    captions: dict[int, str] = {}
    written = 0
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("Loading model", total=len(scenes) + 2)
        pipe = load_pipeline(model)
        pipe.set_progress_bar_config(disable=True)  # the demo's own progress bar is enough
        for index in scenes:
            progress.update(task, advance=1, description=f"Encoding test scene {index}")
            captions[index], results[index], count = _scene_ious(pipe, index, out / "encode" / f"scene_{index:03d}")
            written += count
        progress.update(task, advance=1, description="Generating from a prompt")
        concepts = [w for w in prompt.replace(",", " ").split() if w in CLASSES] or ["sky", "grass"]
        generated = generate(pipe, prompt, concepts, seed=0)
        generate_files = generated.save(out / "generate", overwrite=True)
        progress.update(task, advance=1)

    table = Table(title="Held-out test scenes: per-concept IoU of the argmax segmentation")
    table.add_column("scene", justify="right")
    table.add_column("caption")
    table.add_column("IoU per concept")
    table.add_column("mean", justify="right")
    for index, ious in results.items():
        per_concept = ", ".join(f"{c} {v:.2f}" for c, v in ious.items())
        table.add_row(str(index), captions[index], per_concept, f"{np.mean(list(ious.values())):.3f}")
    console.print(table)
    overall = np.mean([v for ious in results.values() for v in ious.values()])
    console.print(f"Mean IoU over {len(results)} scenes' concepts: {overall:.3f}")
    console.print(f"Wrote {written} files under {out / 'encode'}, {len(generate_files)} to {out / 'generate'}")
    console.print(f"Generated '{prompt}' with concepts {concepts}: see {out / 'generate' / 'overlay_grid.png'}")
    return results
