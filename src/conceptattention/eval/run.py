"""The ``conceptattention eval`` job: one :class:`EvalConfig`, sharding, manifest and lock, progress, report."""

from __future__ import annotations

import contextlib
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from conceptattention.eval.config import EvalConfig


def run_eval(config: EvalConfig, console: Console) -> list[Path]:
    """Evaluate this process's shard, wait for all processes, then (main process) write the report."""
    import torch
    from accelerate import PartialState

    from conceptattention.eval.harness import score_dataset
    from conceptattention.eval.manifest import FolderLock, check_or_write, manifest_of
    from conceptattention.eval.report import write_report
    from conceptattention.loading import load_pipeline
    from conceptattention.plan import model_plan

    # Without CUDA, processes started by `accelerate launch --multi_gpu` join a gloo (multi-CPU) group.
    state = PartialState(cpu=not torch.cuda.is_available())
    out = config.out
    dataset = config.open_dataset()
    pipe = load_pipeline(config.model, dtype=config.dtype, device=state.device)
    model = model_plan(pipe)  # the run's plan: defaults, backend and layers resolved once
    model.require("image", "The evaluation datasets hold images", "evaluate an image model, or map real videos "
                  "with `conceptattention encode`")  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    manifest = manifest_of(config, pipe, len(dataset), model)
    if not config.overwrite:
        check_or_write(out, manifest, overwrite=False, write=False)  # every process refuses alike
    with FolderLock(out) if state.is_main_process else contextlib.nullcontext():
        if state.is_main_process:
            check_or_write(out, manifest, overwrite=config.overwrite)
        state.wait_for_everyone()
        columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())  # fmt: skip
        with Progress(*columns, console=console, disable=not state.is_main_process) as bar:

            def progress(todo: int, planned: int):
                label = f"{config.dataset} (rank {state.process_index}, {planned - todo} done before)"
                task = bar.add_task(label, total=todo)
                return lambda n: bar.advance(task, n)

            rows = score_dataset(pipe, dataset, config, out=out, rank=state.process_index, world=state.num_processes,
                                 progress=progress, wait=state.wait_for_everyone)  # fmt: skip
    if not state.is_main_process:
        return []
    title = f"{config.dataset}: {config.model or 'bundled model'}, protocol {config.protocol().to_dict()}"
    return write_report(out, rows, title)
