"""Zero-shot segmentation of held-out synthetic scenes with the bundled model.

Multi-class argmax segmentation with each scene's concepts as vocabulary; pixel
accuracy, mIoU (per class over the dataset, then mean) and mAP (per-image mean AP
of the soft maps). Methods: ConceptAttention (output space) and its ablations,
cross attention, value space, per block; references: the same method on the
untrained (random-init) transformer, and a location-only prior.

Usage:
    python benchmarks/scenes.py [--scenes 500] [--model PATH]

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from conceptattention import ConceptAttentionConfig, load_pipeline
from conceptattention.bundled.model import BundledModelConfig, build_untrained
from conceptattention.data.scenes import CLASSES, SyntheticScenes
from conceptattention.eval.scenes import LayoutPrior, SceneScores, evaluate_method

METHODS = {
    "concept_attention": ConceptAttentionConfig(per_block=True),
    "concept_attention_no_softmax": ConceptAttentionConfig(softmax=False),
    "concept_keys_image_only": ConceptAttentionConfig(concept_keys="image"),
    "concept_keys_concepts_only": ConceptAttentionConfig(concept_keys="concepts"),
    "cross_attention": ConceptAttentionConfig(score_space="cross_attention", per_block=True),
    "value_space": ConceptAttentionConfig(score_space="value"),
}


def markdown(results: dict) -> str:
    lines = ["| method | acc | mIoU | mAP | " + " | ".join(CLASSES) + " |", "|---" * (4 + len(CLASSES)) + "|"]
    for name, r in results.items():
        ious = [("-" if r["iou_per_concept"][c] is None else f"{r['iou_per_concept'][c]:.2f}") for c in CLASSES]
        lines.append(f"| {name} | {r['acc']:.3f} | {r['miou']:.3f} | {r['map']:.3f} | " + " | ".join(ious) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="pipeline folder (default: the bundled model)")
    parser.add_argument("--scenes", type=int, default=500)
    parser.add_argument("--prior-scenes", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scenes.json"))
    args = parser.parse_args()

    pipe = load_pipeline(args.model, dtype="float32")
    scenes = list(SyntheticScenes("test", args.scenes))
    results: dict[str, dict] = {}
    per_block: dict[str, list[dict]] = {}
    seconds: dict[str, float] = {}
    for name, config in METHODS.items():
        start = time.perf_counter()
        total, blocks = evaluate_method(pipe, scenes, config, progress=lambda x, n=name: tqdm(x, desc=n, leave=False))
        seconds[name] = round((time.perf_counter() - start) / len(scenes), 4)
        results[name] = total.summary()
        if blocks:
            per_block[name] = [{k: v for k, v in b.summary().items() if k != "iou_per_concept"} for b in blocks]

    untrained = build_untrained(BundledModelConfig(), seed=0).transformer.to(pipe.transformer.dtype)
    trained, pipe.transformer = pipe.transformer, untrained
    try:
        total, _ = evaluate_method(pipe, scenes, ConceptAttentionConfig(), progress=lambda x: tqdm(x, desc="untrained"))
    finally:
        pipe.transformer = trained
    results["untrained"] = total.summary()

    prior = LayoutPrior(list(SyntheticScenes("train", args.prior_scenes)))
    prior_scores = SceneScores()
    for scene in scenes:
        prior_scores.add(scene, prior.maps(scene))
    results["layout_prior"] = prior_scores.summary()

    print(markdown(results))
    for name, blocks in per_block.items():
        print(f"\nper block, {name}: " + ", ".join(f"block {i}: mIoU {b['miou']:.3f}" for i, b in enumerate(blocks)))
    record = {
        **{k: results[k] for k in ("concept_attention", "cross_attention", "value_space", "untrained", "layout_prior")},
        "ablations": {k: v for k, v in results.items() if k.startswith(("concept_attention_", "concept_keys"))},
        "per_block": per_block,
        "seconds_per_scene": seconds,
        "scenes": args.scenes,
        "torch_threads": torch.get_num_threads(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
