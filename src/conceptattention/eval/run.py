"""The ``conceptattention eval`` job: protocol defaults per dataset, sharding, progress, report."""

from __future__ import annotations

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
) -> list[Path]:
    """Evaluate this process's shard, wait for all processes, then (main process) write the report."""
    import torch
    from accelerate import PartialState

    from conceptattention.eval.datasets import open_dataset
    from conceptattention.eval.harness import evaluate
    from conceptattention.eval.report import summarize, write_report
    from conceptattention.loading import load_pipeline

    # Without CUDA, processes started by `accelerate launch --multi_gpu` join a gloo (multi-CPU) group.
    state = PartialState(cpu=not torch.cuda.is_available())
    dataset = open_dataset(dataset_name, data, **({"words": words} if dataset_name == "imagenet-seg" else {}))
    protocol = dataclasses.replace(PROTOCOLS[dataset_name], **{k: v for k, v in overrides.items() if v is not None})
    pipe = load_pipeline(model, dtype=dtype, device=state.device)
    pipe.set_progress_bar_config(disable=True)
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
