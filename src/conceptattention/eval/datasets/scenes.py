"""The held-out synthetic scenes of the bundled model (generated on the fly; no files)."""

from __future__ import annotations

from typing import Literal

from conceptattention.eval.datasets.base import EvalItem, IndexedDataset, check_index


class SceneDataset(IndexedDataset):
    """The held-out synthetic scenes (generated, no files): multi-class, each scene's concepts as vocabulary.

    ``classes`` keep the caption's order, so the protocol's caption template reproduces the
    scene's own caption.
    """

    name = "scenes"
    kind: Literal["binary", "multiclass"] = "multiclass"

    def __init__(self, split: str = "test", count: int = 500) -> None:
        from conceptattention.data.scenes import CLASSES

        self.class_names = CLASSES
        self.split, self.count = split, count

    def __len__(self) -> int:
        return self.count

    def ids(self) -> list[str]:
        return [f"{self.split}-{i:05d}" for i in range(self.count)]

    def __getitem__(self, index: int) -> EvalItem:
        from conceptattention.data.scenes import make_scene

        index = check_index(index, self.count)
        scene = make_scene(self.split, index)
        return EvalItem(
            id=f"{self.split}-{index:05d}",
            image=scene.image,
            labels=scene.labels,
            classes=scene.concepts,
            class_ids=tuple(self.class_names.index(c) for c in scene.concepts),
        )
