"""Reports computed from the JSONL records alone: markdown table, CSV and a per-block plot."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from conceptattention.core import SegmentationCounts
from conceptattention.eval.records import Records, read_records

COLUMNS = ("method", "t", "images", "acc", "miou", "miou_paper_compat", "map", "acc_argmax", "miou_argmax",
           "seconds_per_image")  # fmt: skip


def _counts(entries: Sequence[dict], field: str, num_classes: int) -> SegmentationCounts:
    """The sum of the images' sparse confusion matrices under ``field``."""
    counts = SegmentationCounts(num_classes)
    for stats in entries:
        counts.merge(SegmentationCounts.from_sparse(stats[field], num_classes))
    return counts


def summarize_stats(stats: Sequence[dict], num_classes: int) -> dict[str, Any]:
    """Dataset-level metrics from per-image statistics (sums of confusion matrices, mean of AP)."""
    counts = _counts(stats, "confusion", num_classes)
    aps = [s["ap"] for s in stats if s.get("ap") is not None]
    row: dict[str, Any] = {
        "acc": counts.accuracy(),
        "miou": counts.miou(),
        "miou_paper_compat": counts.miou_paper_compat(),
        "map": float(np.mean(aps)) if aps else float("nan"),
        "iou_per_class": counts.ious().tolist(),
    }
    if any(s.get("confusion_argmax") for s in stats):
        argmax = _counts(stats, "confusion_argmax", num_classes)
        row.update(acc_argmax=argmax.accuracy(), miou_argmax=argmax.miou())
    return row


def summarize_records(
    records: Records, num_classes: int, expected_ids: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """One row per (method, t), with per-block rows under ``"blocks"`` and any missing image ids."""
    rows = []
    for _, by_id in sorted(records.items()):
        kept = list(by_id.values())
        row = {"method": kept[0]["method"], "t": kept[0]["t"], "images": len(kept)}
        row.update(summarize_stats([r["stats"] for r in kept], num_classes))
        row["seconds_per_image"] = float(np.median([r["seconds"] for r in kept]))
        num_blocks = len(kept[0]["blocks"])
        row["blocks"] = [summarize_stats([r["blocks"][b] for r in kept], num_classes) for b in range(num_blocks)]
        row["layers"] = kept[0].get("layers")
        row["block_labels"] = kept[0].get("block_labels")
        if expected_ids is not None:
            row["missing"] = sorted(set(expected_ids) - set(by_id))
        rows.append(row)
    return rows


def summarize(folder: Path, num_classes: int, expected_ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """:func:`summarize_records` of the records in ``folder``."""
    return summarize_records(read_records(folder), num_classes, expected_ids)


PERCENT_COLUMNS = {"acc", "miou", "miou_paper_compat", "map", "acc_argmax", "miou_argmax"}


def _fmt(column: str, value: Any) -> str:
    if not isinstance(value, float):
        return str(value)
    if np.isnan(value):
        return "-"
    if column in PERCENT_COLUMNS:
        return f"{100 * value:.2f}"
    return f"{value:g}" if column == "t" else f"{value:.3f}"


def write_report(folder: Path, rows: list[dict[str, Any]], title: str) -> list[Path]:
    """``report.md`` (percent), ``report.csv`` (fractions) and, with per-block rows, ``per_block.png``."""
    md = [f"# {title}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(_fmt(c, row.get(c, float("nan"))) for c in COLUMNS) + " |" for row in rows]
    md += ["", "acc, mIoU, mAP in %; `miou_paper_compat` = acc/(2-acc), the quantity the reference code called mIoU."]
    missing = {f"{r['method']}@t={r['t']:g}": len(r.get("missing", [])) for r in rows if r.get("missing")}
    if missing:
        md += ["", f"Incomplete: images missing per run: {json.dumps(missing)}"]
    paths = [folder / "report.md", folder / "report.csv"]
    paths[0].write_text("\n".join(md) + "\n")
    with paths[1].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*COLUMNS, "blocks_miou"], extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "blocks_miou": json.dumps([round(b["miou"], 6) for b in row["blocks"]])})
    if any(row["blocks"] for row in rows):
        paths.append(folder / "per_block.png")
        _plot_blocks(rows, paths[-1])
    return paths


def _plot_blocks(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.5))
    axes = figure.add_subplot()
    mixed = False
    for row in rows:
        if row["blocks"]:
            labels = row.get("block_labels") or []
            x = row.get("layers") or list(range(len(row["blocks"])))
            if any(label.startswith("single") for label in labels):  # blocks of both kinds: one tick per block
                mixed, x = True, list(range(len(labels)))
                short = [label.replace("double ", "d").replace("single ", "s") for label in labels]
                axes.set_xticks(x, short, rotation=90, fontsize=6)
            axes.plot(x, [100 * b["miou"] for b in row["blocks"]], marker="o", label=f"{row['method']} t={row['t']:g}")
    axes.set_xlabel("block (d: double-stream, s: single-stream)" if mixed else "double-stream block")
    axes.set_ylabel("mIoU (%)")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
