"""Zero-shot segmentation of held-out synthetic scenes with the bundled model (through the eval harness).

Multi-class argmax segmentation with each scene's concepts as vocabulary; pixel
accuracy, mIoU (per class over the dataset, then mean) and mAP (per-image mean AP
of the soft maps over the scene's concepts). Methods: ConceptAttention (output
space) and its ablations, cross attention, value space, per block; references: the
same method on the untrained (random-init) transformer, and a location-only prior.
Records go to ``--out`` as JSONL, so an interrupted run resumes.

Usage:
    python benchmarks/scenes.py [--scenes 500] [--model PATH] [--out DIR]

``--out`` defaults to a new folder ``outputs/benchmarks/scenes-<UTC time>``: a benchmark computes
fresh results; the committed ``benchmarks/results/scenes`` is a report of one run, not a cache.

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from conceptattention import load_pipeline
from conceptattention.bundled.model import BundledModelConfig, build_untrained
from conceptattention.data.scenes import CLASSES, SyntheticScenes
from conceptattention.eval.config import EvalConfig
from conceptattention.eval.datasets import SceneDataset
from conceptattention.eval.harness import METHODS, score_dataset
from conceptattention.eval.protocol import multiclass_stats
from conceptattention.eval.report import summarize_stats, write_report
from conceptattention.loading import bundled_model_path


def _bar(todo: int, planned: int):
    bar = tqdm(total=todo, leave=False)
    return bar.update


def _summary(row: dict) -> dict:
    ious = row["iou_per_class"]
    return {
        "acc": round(row["acc"], 4),
        "miou": round(row["miou"], 4),
        "map": round(row["map"], 4),
        "iou_per_concept": {c: (None if np.isnan(v) else round(v, 4)) for c, v in zip(CLASSES, ious)},
    }


def layout_prior(dataset: SceneDataset, train_count: int) -> dict:
    """Per-pixel class frequency over training scenes; argmax over each test scene's classes."""
    counts = np.zeros((len(CLASSES), 32, 32))
    for scene in SyntheticScenes("train", train_count):
        np.add.at(counts, (scene.labels, *np.indices(scene.labels.shape)), 1.0)
    frequency = torch.from_numpy(counts / train_count).float()
    stats = []
    for i in range(len(dataset)):
        item = dataset[i]
        maps = frequency[list(item.class_ids)]
        stats.append(asdict(multiclass_stats(maps, torch.from_numpy(item.labels), item.class_ids, len(item.classes),
                                             len(CLASSES))))  # fmt: skip
    return summarize_stats(stats, len(CLASSES))


def markdown(results: dict) -> str:
    lines = ["| method | acc | mIoU | mAP | " + " | ".join(CLASSES) + " |", "|---" * (4 + len(CLASSES)) + "|"]
    for name, r in results.items():
        ious = ["-" if r["iou_per_concept"][c] is None else f"{r['iou_per_concept'][c]:.2f}" for c in CLASSES]
        lines.append(f"| {name} | {r['acc']:.3f} | {r['miou']:.3f} | {r['map']:.3f} | " + " | ".join(ious) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="pipeline folder (default: the bundled model)")
    parser.add_argument("--scenes", type=int, default=500)
    parser.add_argument("--prior-scenes", type=int, default=5000)
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/benchmarks") / time.strftime("scenes-%Y%m%d-%H%M%S", time.gmtime())
    )
    args = parser.parse_args()

    pipe = load_pipeline(args.model, dtype="float32")
    pipe.set_progress_bar_config(disable=True)
    dataset = SceneDataset("test", args.scenes)
    config = EvalConfig(dataset="scenes", methods=tuple(METHODS), per_block=True)
    trained_rows = score_dataset(pipe, dataset, config, out=args.out / "trained", progress=_bar)
    write_report(args.out / "trained", trained_rows, f"scenes ({args.scenes} test scenes), bundled model")
    rows = {row["method"]: row for row in trained_rows}

    architecture = BundledModelConfig.of_model(args.model or bundled_model_path())
    pipe.transformer = build_untrained(architecture, seed=0).transformer.to(pipe.transformer.dtype)
    rows["untrained"] = score_dataset(pipe, dataset, EvalConfig(dataset="scenes"), out=args.out / "untrained",
                                      progress=_bar)[0]  # fmt: skip
    rows["layout_prior"] = layout_prior(dataset, args.prior_scenes)

    results = {name: _summary(row) for name, row in rows.items()}
    print(markdown(results))
    per_block = {
        name: {"layers": rows[name]["layers"], "miou": [round(b["miou"], 4) for b in rows[name]["blocks"]]}
        for name in ("concept_attention", "cross_attention", "value_space")
    }
    for name, blocks in per_block.items():
        print(
            f"per block, {name}: " + ", ".join(f"block {i}: {m:.3f}" for i, m in zip(blocks["layers"], blocks["miou"]))
        )
    record = {
        **{k: results[k] for k in ("concept_attention", "cross_attention", "value_space", "untrained", "layout_prior")},
        "ablations": {
            k: results[k] for k in ("concept_attention_no_softmax", "concept_keys_image", "concept_keys_concepts")
        },
        "per_block": per_block,
        "seconds_per_scene": {k: round(rows[k]["seconds_per_image"], 4) for k in METHODS},
        "scenes": args.scenes,
    }
    (args.out / "summary.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
