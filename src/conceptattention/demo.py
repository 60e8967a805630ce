"""The offline demo: encode a held-out synthetic scene and generate one, with the bundled model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from conceptattention.core import confusion_matrix, iou_per_class
from conceptattention.data.scenes import CLASSES, make_scene
from conceptattention.encode import encode_image
from conceptattention.generate import generate
from conceptattention.loading import load_pipeline


def run_demo(out: Path, model: str | None, scene_index: int, prompt: str, console: Console) -> dict[str, float]:
    """Write demo outputs under ``out`` and return the per-concept IoU of the encoded scene."""
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("Loading model", total=3)
        pipe = load_pipeline(model)
        pipe.set_progress_bar_config(disable=True)  # the demo's own progress bar is enough
        progress.update(task, advance=1, description="Encoding a test scene")
        scene = make_scene("test", scene_index)
        maps = encode_image(pipe, scene.image, scene.concepts, caption=scene.caption)
        encode_files = maps.save(out / "encode")
        labels = torch.from_numpy(scene.labels)
        size = labels.shape
        class_ids = torch.tensor([CLASSES.index(c) for c in scene.concepts])
        pred = class_ids[maps.segmentation(size)[0]]
        ious = iou_per_class(confusion_matrix(pred, labels, len(CLASSES)))
        from PIL import Image

        Image.fromarray(scene.image).resize((256, 256), Image.Resampling.NEAREST).save(out / "encode" / "scene.png")
        progress.update(task, advance=1, description="Generating from a prompt")
        concepts = [w for w in prompt.replace(",", " ").split() if w in CLASSES] or ["sky", "grass"]
        generated = generate(pipe, prompt, concepts, seed=0)
        generate_files = generated.save(out / "generate")
        progress.update(task, advance=1)

    console.print(f"Test scene {scene_index}: '{scene.caption}' - per-concept IoU of the argmax segmentation:")
    table = Table()
    table.add_column("concept")
    table.add_column("IoU", justify="right")
    result = {}
    for concept, cid in zip(scene.concepts, class_ids.tolist()):
        result[concept] = float(ious[cid])
        table.add_row(concept, f"{result[concept]:.3f}")
    table.add_row("mean", f"{np.mean(list(result.values())):.3f}")
    console.print(table)
    console.print(f"Wrote {len(encode_files)} files to {out / 'encode'}, {len(generate_files)} to {out / 'generate'}")
    console.print(f"Generated '{prompt}' with concepts {concepts}: see {out / 'generate' / 'overlay_grid.png'}")
    return result
