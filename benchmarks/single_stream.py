"""Double- vs single-stream blocks: zero-shot segmentation of held-out scenes, per block selection.

On the held-out synthetic scenes (the protocol of ``benchmarks/scenes.py``, through the eval
harness), ConceptAttention (output space) and cross attention are scored with three block
selections: the double-stream blocks (the paper's default), the single-stream blocks only, and
all blocks, plus per-block mIoU over every block of both kinds. Records go to ``--out`` as
JSONL per selection, so an interrupted run resumes.

Usage:
    python benchmarks/single_stream.py [--scenes 500] [--model PATH] [--out DIR]

The last line of output is one JSON object (also written to ``--out``/summary.json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tqdm import tqdm

from conceptattention import load_pipeline
from conceptattention.eval.config import EvalConfig
from conceptattention.eval.datasets import SceneDataset
from conceptattention.eval.harness import score_dataset

SELECTIONS = {
    "double": {"layers": "all", "single_layers": "none"},
    "single": {"layers": "none", "single_layers": "all"},
    "all": {"layers": "all", "single_layers": "all"},
}
METHODS = ("concept_attention", "cross_attention")


def _bar(todo: int, planned: int):
    return tqdm(total=todo, leave=False).update


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="pipeline folder (default: the bundled model)")
    parser.add_argument("--scenes", type=int, default=500)
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/benchmarks") / time.strftime("single-%Y%m%d-%H%M%S", time.gmtime())
    )
    args = parser.parse_args()

    pipe = load_pipeline(args.model, dtype="float32")
    pipe.set_progress_bar_config(disable=True)
    dataset = SceneDataset("test", args.scenes)
    results: dict[str, dict] = {}
    per_block: dict[str, dict] = {}
    for name, blocks in SELECTIONS.items():
        config = EvalConfig(dataset="scenes", methods=METHODS, per_block=name == "all", **blocks)
        rows = score_dataset(pipe, dataset, config, out=args.out / name, progress=_bar)
        for row in rows:
            results.setdefault(row["method"], {})[name] = {
                "miou": round(row["miou"], 4), "acc": round(row["acc"], 4), "map": round(row["map"], 4),
                "blocks": row["block_labels"],
            }  # fmt: skip
            if row["blocks"]:
                per_block[row["method"]] = dict(zip(row["block_labels"], (round(b["miou"], 4) for b in row["blocks"])))
    lines = ["| method | double-stream blocks | single-stream blocks | all blocks |", "|---|---|---|---|"]
    for method, by_selection in results.items():
        cells = [f"{by_selection[name]['miou']:.3f}" for name in SELECTIONS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    for method, blocks in per_block.items():
        print(f"per block, {method}: " + ", ".join(f"{label}: {m:.3f}" for label, m in blocks.items()))
    record = {"mIoU": results, "per_block_miou": per_block, "scenes": args.scenes, "model": args.model or "bundled"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
