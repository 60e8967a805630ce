"""Resumable, shardable evaluation: per-image records appended to JSONL, reports computed from them.

Each process (``accelerate launch``) takes every ``world``-th pending image and appends
one JSON line per (method, image) to its own ``records.rank<k>.jsonl``, flushed as
written. A restarted run skips what is already recorded; the report merges all rank
files and drops duplicates, so kills, restarts and changes of world size lose nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from conceptattention.config import ConceptAttentionConfig
from conceptattention.eval.protocol import Protocol, concepts_for, evaluate_batch, layers_used

logger = logging.getLogger(__name__)

METHODS: dict[str, ConceptAttentionConfig] = {
    "concept_attention": ConceptAttentionConfig(),
    "concept_attention_no_softmax": ConceptAttentionConfig(softmax=False),
    "concept_keys_image": ConceptAttentionConfig(concept_keys="image"),
    "concept_keys_concepts": ConceptAttentionConfig(concept_keys="concepts"),
    "cross_attention": ConceptAttentionConfig(score_space="cross_attention"),
    "value_space": ConceptAttentionConfig(score_space="value"),
}


def run_key(method: str, t: float) -> str:
    return f"{method}@t={t:g}"


_RECORD_FIELDS: dict[str, type | tuple[type, ...]] = {
    "key": str, "id": str, "method": str, "t": (int, float), "stats": dict, "blocks": list,
}  # fmt: skip


def _valid_record(record: Any) -> bool:
    return isinstance(record, dict) and all(isinstance(record.get(k), t) for k, t in _RECORD_FIELDS.items())


def read_records(folder: Path) -> dict[str, dict[str, dict]]:
    """All complete records under ``folder``: {run key: {image id: record}} (first wins on duplicates).

    A last line without its newline (cut by a kill) is dropped quietly: its image is simply
    evaluated again. Other lines that do not parse or lack a record's fields are skipped with
    one warning per file naming their count and line numbers.
    """
    records: dict[str, dict[str, dict]] = defaultdict(dict)
    for path in sorted(folder.glob("records.rank*.jsonl")):
        data = path.read_bytes()
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()  # the file ends with a newline
        elif lines:
            lines.pop()  # a partial last line
        bad = []
        for number, raw in enumerate(lines, start=1):
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                record = None
            if not _valid_record(record):
                bad.append(number)
                continue
            records[record["key"]].setdefault(record["id"], record)
        if bad:
            shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
            logger.warning("%s: skipped %d unreadable record line(s) (line %s)", path, len(bad), shown)
    return records


def _open_for_append(path: Path):
    """Append handle; a trailing partial line (killed mid-write) is cut first."""
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            path.write_bytes(data[: data.rfind(b"\n") + 1])
    return path.open("a", encoding="utf-8")


def _batches(items: list[Any], protocol: Protocol, batch_size: int) -> list[list[Any]]:
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


def evaluate(
    pipe: Any,
    dataset: Any,
    out: Path,
    *,
    methods: Iterable[str] = ("concept_attention",),
    t_values: Iterable[float] = (0.5,),
    protocol: Protocol,
    per_block: bool = False,
    layers: tuple[int, ...] | None = None,
    seed: int = 0,
    limit: int | None = None,
    batch_size: int = 1,
    rank: int = 0,
    world: int = 1,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
    **encode_kwargs: Any,
) -> int:
    """Evaluate this process's share of the pending (method, t, image) triples; returns how many ran."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
    out.mkdir(parents=True, exist_ok=True)
    done = read_records(out)
    ids = dataset.ids()[: limit or None]
    mine = [i for i in range(len(ids)) if i % world == rank]
    plan = [(m, t) for m in methods for t in t_values]
    todo = {(m, t): [i for i in mine if ids[i] not in done.get(run_key(m, t), {})] for m, t in plan}
    total = sum(len(v) for v in todo.values())
    advance = progress(total, len(ids) * len(plan)) if progress else (lambda n: None)
    count = 0
    with _open_for_append(out / f"records.rank{rank}.jsonl") as sink:
        for (method, t), indices in todo.items():
            config = ConceptAttentionConfig(**{**METHODS[method].to_dict(), "per_block": per_block, "layers": layers})
            run_protocol = Protocol(**{**protocol.to_dict(), "t": t})
            used_layers = layers_used(pipe, config)
            for batch in _batches([dataset[i] for i in indices], run_protocol, batch_size):
                start = time.perf_counter()
                results = evaluate_batch(pipe, batch, dataset.kind, len(dataset.class_names), run_protocol, config,
                                         seed, max_batch=batch_size, **encode_kwargs)  # fmt: skip
                seconds = (time.perf_counter() - start) / len(batch)
                for item, (stats, blocks) in zip(batch, results):
                    record = {
                        "key": run_key(method, t),
                        "id": item.id,
                        "method": method,
                        "t": t,
                        "stats": asdict(stats),
                        "layers": used_layers,
                        "blocks": [asdict(b) for b in blocks],
                        "seconds": round(seconds, 4),
                    }
                    sink.write(json.dumps(record) + "\n")
                    sink.flush()
                count += len(batch)
                advance(len(batch))
    return count
