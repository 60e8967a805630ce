"""The per-image records of an eval folder: one JSON line per (method, t, image), appended and flushed.

Each process appends to its own ``records.rank<k>.jsonl``; readers merge all rank files and
drop duplicates, so kills, restarts and changes of world size lose nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def run_key(method: str, t: float) -> str:
    return f"{method}@t={t:g}"


_RECORD_FIELDS: dict[str, type | tuple[type, ...]] = {
    "key": str, "id": str, "method": str, "t": (int, float), "stats": dict, "blocks": list,
}  # fmt: skip


def _valid_record(record: Any) -> bool:
    return isinstance(record, dict) and all(isinstance(record.get(k), t) for k, t in _RECORD_FIELDS.items())


Records = dict[str, dict[str, dict]]
"""{run key: {image id: record}}."""


def group_records(records: Iterable[dict], into: Records | None = None) -> Records:
    """Records by run key and image id; the first record of a (key, id) wins."""
    grouped: Records = {} if into is None else into
    for record in records:
        grouped.setdefault(record["key"], {}).setdefault(record["id"], record)
    return grouped


def read_records(folder: Path) -> Records:
    """All complete records under ``folder``: {run key: {image id: record}} (first wins on duplicates).

    A last line without its newline (cut by a kill) is dropped quietly: its image is simply
    evaluated again. Other lines that do not parse or lack a record's fields are skipped with
    one warning per file naming their count and line numbers.
    """
    records: Records = {}
    for path in sorted(folder.glob("records.rank*.jsonl")):
        data = path.read_bytes()
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()  # the file ends with a newline
        elif lines:
            lines.pop()  # a partial last line
        bad, good = [], []
        for number, raw in enumerate(lines, start=1):
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                record = None
            if not _valid_record(record):
                bad.append(number)
                continue
            good.append(record)
        group_records(good, into=records)
        if bad:
            shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
            logger.warning("%s: skipped %d unreadable record line(s) (line %s)", path, len(bad), shown)
    return records


def open_for_append(path: Path):
    """Append handle; a trailing partial line (killed mid-write) is cut first."""
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            path.write_bytes(data[: data.rfind(b"\n") + 1])
    return path.open("a", encoding="utf-8")
