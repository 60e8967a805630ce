"""Resumable, shardable evaluation, and :func:`score_dataset`: evaluate, then summarise.

Each process (``accelerate launch``) takes every ``world``-th pending image and appends
one JSON line per (method, t, image) to its own ``records.rank<k>.jsonl``, flushed as
written (:mod:`conceptattention.eval.records`). A restarted run skips what is already
recorded; the report merges all rank files and drops duplicates, so kills, restarts and
changes of world size lose nothing.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from conceptattention.eval.config import EvalConfig
from conceptattention.eval.protocol import METHODS, EvalProtocol, blocks_used, concepts_for, evaluate_batch
from conceptattention.eval.records import group_records, open_for_append, read_records, run_key
from conceptattention.eval.report import summarize_records

__all__ = ["METHODS", "read_records", "run_key", "score_dataset"]

Progress = Callable[[int, int], Callable[[int], None]]
"""``progress(todo, planned)`` -> ``advance(n)``: told how many triples run now and are planned in all."""


def _batches(items: list[Any], protocol: EvalProtocol, batch_size: int) -> list[list[Any]]:
    """Batches of items sharing one concept list (encode_image takes one concept list per call).

    ``batch_size`` counts forwards (image x noise draw rows): a call takes
    ``max(1, batch_size // num_samples)`` images, and encode_image runs their draws in rows of
    at most ``batch_size``.
    """
    per_call = max(1, batch_size // protocol.num_samples)
    groups: dict[tuple[str, ...], list[Any]] = defaultdict(list)
    for item in items:
        groups[concepts_for(item, protocol)].append(item)
    return [group[i : i + per_call] for group in groups.values() for i in range(0, len(group), per_call)]


def _records(
    pipe: Any,
    dataset: Any,
    config: EvalConfig,
    todo: dict[tuple[str, float], list[int]],
    advance: Callable[[int], Any],
    encode_kwargs: dict[str, Any],
) -> Iterator[dict[str, Any]]:
    """One record per (method, t, image) of ``todo``, computed in batches that share a concept list."""
    from conceptattention.encode import default_rows
    from conceptattention.plan import model_plan

    protocol = config.protocol()
    model = model_plan(pipe)  # resolved once for every method's layer list
    batch_size = config.batch_size or default_rows(pipe, protocol.resolution)
    for (method, t), indices in todo.items():
        method_config = config.method_config(method)
        run_protocol = replace(protocol, t=t)
        used = blocks_used(model, method_config)
        for batch in _batches([dataset[i] for i in indices], run_protocol, batch_size):
            start = time.perf_counter()
            results = evaluate_batch(pipe, batch, dataset_kind=dataset.kind, num_classes=len(dataset.class_names),
                                     protocol=run_protocol, config=method_config, seed=config.seed,
                                     max_batch=batch_size, **encode_kwargs)  # fmt: skip
            seconds = (time.perf_counter() - start) / len(batch)
            for item, (stats, blocks) in zip(batch, results):
                yield {
                    "key": run_key(method, t),
                    "id": item.id,
                    "method": method,
                    "t": t,
                    "stats": asdict(stats),
                    "layers": list(used.double),
                    "single_layers": list(used.single),
                    "block_labels": used.labels,
                    "blocks": [asdict(b) for b in blocks],
                    "seconds": round(seconds, 4),
                }
            advance(len(batch))


def score_dataset(
    pipe: Any,
    dataset: Any,
    config: EvalConfig,
    *,
    out: Path | None = None,
    rank: int = 0,
    world: int = 1,
    progress: Progress | None = None,
    wait: Callable[[], Any] | None = None,
    **encode_kwargs: Any,
) -> list[dict[str, Any]]:
    """Evaluate ``dataset`` under ``config`` and summarise it: one row per (method, t), sorted by run key.

    The one evaluate -> summarise path of the CLI, the training criterion, the scenes benchmark and
    the tests. Rows hold ``acc``, ``miou``, ``miou_paper_compat``, ``map`` (binary datasets also
    ``acc_argmax`` and ``miou_argmax``), ``iou_per_class``, ``seconds_per_image``, ``layers``, ``blocks``
    (the same per selected block with ``per_block``) and ``missing`` (image ids without a record).
    ``encode_kwargs`` go to :func:`~conceptattention.encode.encode_image` (e.g. ``max_sequence_length``).

    Without ``out`` the records stay in memory and the rows summarise this call's images. With
    ``out`` each record is appended to ``out/records.rank<rank>.jsonl`` as it is computed, images
    already recorded there are skipped (a rerun resumes), and the rows summarise every record in the
    folder. Several processes each take every ``world``-th image and pass a ``wait`` barrier; only
    rank 0 gets the rows (the others get ``[]``).
    """
    done = {} if out is None else read_records(out)
    ids = dataset.ids()[: config.limit or None]
    mine = [i for i in range(len(ids)) if i % world == rank]
    plan = [(m, t) for m in config.methods for t in config.t_values]
    todo = {(m, t): [i for i in mine if ids[i] not in done.get(run_key(m, t), {})] for m, t in plan}
    advance = progress(sum(map(len, todo.values())), len(ids) * len(plan)) if progress else (lambda n: None)
    records = _records(pipe, dataset, config, todo, advance, encode_kwargs)
    if out is None:
        return summarize_records(group_records(records), len(dataset.class_names), ids)
    out.mkdir(parents=True, exist_ok=True)
    with open_for_append(out / f"records.rank{rank}.jsonl") as sink:
        for record in records:
            sink.write(json.dumps(record) + "\n")
            sink.flush()
    if wait is not None:
        wait()
    return summarize_records(read_records(out), len(dataset.class_names), ids) if rank == 0 else []
