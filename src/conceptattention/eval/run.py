"""The ``conceptattention eval`` job: protocol defaults per dataset, sharding, progress, report."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from conceptattention.eval.protocol import IMAGENET_BACKGROUNDS, VOC_BACKGROUNDS, Protocol

PROTOCOLS: dict[str, Protocol] = {
    # The paper's configuration (method.md section 7): 5 noise samples, blur, GT at 224 px.
    "imagenet-seg": Protocol(IMAGENET_BACKGROUNDS, "a {classes}", 0.5, 5, True, None, (224, 224), True),
    "voc-single": Protocol(VOC_BACKGROUNDS, "a {classes}", 0.5, 5, True, None, (224, 224), True),
    "voc-multi": Protocol(VOC_BACKGROUNDS, "a {classes}", 0.5, 5, True, None, (224, 224), True),
    # Synthetic scenes: the caption lists the scene's concepts; labels compared at native size.
    "scenes": Protocol((), "a photo of {classes}", 0.5, 1, False, None, None, False),
}


def run_eval(
    dataset_name: str,
    data: Path | None,
    model: str | None,
    out: Path,
    *,
    methods: list[str],
    t_values: list[float],
    overrides: dict[str, Any],
    per_block: bool,
    layers: tuple[int, ...] | None,
    seed: int,
    limit: int | None,
    batch_size: int,
    dtype: str | None,
    console: Console,
    words: str = "short",
    overwrite: bool = False,
) -> list[Path]:
    """Evaluate this process's shard, wait for all processes, then (main process) write the report."""
    import torch
    from accelerate import PartialState

    from conceptattention.config import ConceptAttentionConfig
    from conceptattention.eval.datasets import open_dataset
    from conceptattention.eval.harness import evaluate
    from conceptattention.eval.manifest import FolderLock, build_manifest, check_or_write, model_identity
    from conceptattention.eval.protocol import layers_used
    from conceptattention.eval.report import summarize, write_report
    from conceptattention.loading import load_pipeline

    # Without CUDA, processes started by `accelerate launch --multi_gpu` join a gloo (multi-CPU) group.
    state = PartialState(cpu=not torch.cuda.is_available())
    dataset = open_dataset(dataset_name, data, **({"words": words} if dataset_name == "imagenet-seg" else {}))
    protocol = dataclasses.replace(PROTOCOLS[dataset_name], **{k: v for k, v in overrides.items() if v is not None})
    pipe = load_pipeline(model, dtype=dtype, device=state.device)
    pipe.set_progress_bar_config(disable=True)
    manifest = build_manifest(
        dataset=dataset_name,
        dataset_size=len(dataset),
        limit=limit,
        words=words if dataset_name == "imagenet-seg" else None,
        model=model_identity(model, pipe),
        dtype=str(pipe.transformer.dtype).replace("torch.", ""),
        protocol={k: v for k, v in protocol.to_dict().items() if k != "t"},  # more timesteps may be added
        layers=layers_used(pipe, ConceptAttentionConfig(layers=layers)),
        seed=seed,
        per_block=per_block,
    )
    if not overwrite:
        check_or_write(out, manifest, overwrite=False, write=False)  # every process refuses alike
    with FolderLock(out) if state.is_main_process else contextlib.nullcontext():
        if state.is_main_process:
            check_or_write(out, manifest, overwrite=overwrite)
        state.wait_for_everyone()
        columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())  # fmt: skip
        with Progress(*columns, console=console, disable=not state.is_main_process) as bar:

            def progress(todo: int, planned: int):
                label = f"{dataset_name} (rank {state.process_index}, {planned - todo} done before)"
                task = bar.add_task(label, total=todo)
                return lambda n: bar.advance(task, n)

            evaluate(pipe, dataset, out, methods=methods, t_values=t_values, protocol=protocol, per_block=per_block,
                     layers=layers, seed=seed, limit=limit, batch_size=batch_size, rank=state.process_index,
                     world=state.num_processes, progress=progress)  # fmt: skip
        state.wait_for_everyone()
    if not state.is_main_process:
        return []
    expected = dataset.ids()[: limit or None]
    rows = summarize(out, len(dataset.class_names), expected)
    title = f"{dataset_name}: {model or 'bundled model'}, protocol {protocol.to_dict()}"
    return write_report(out, rows, title)
