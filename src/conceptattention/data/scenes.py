"""Procedural synthetic scenes whose caption decides what is drawn.

Each scene is a small RGB image with an exact per-pixel label map and a caption
listing exactly the visible concepts. Nothing is fixed by layout: backgrounds
("stuff") are one or two textured regions split by a line at a random place and
angle, and 0-4 objects of random class, size and position are drawn in random
order (later ones occlude earlier ones). Colour helps but does not decide: some
objects share a colour and differ by shape, others share a shape.

Scenes are a pure function of (split, index): the train, validation and test
splits are disjoint seed streams fixed before any training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STUFF = ("sky", "grass", "sand", "water")
OBJECTS = ("apple", "brick", "lemon", "cheese", "leaf", "plum")
CLASSES = STUFF + OBJECTS

# (shape, RGB) per object: apple/brick share red, lemon/cheese share yellow; apple/lemon/plum share the disc.
_OBJECT_STYLE = {
    "apple": ("disc", (200, 30, 30)),
    "brick": ("square", (200, 30, 30)),
    "lemon": ("disc", (235, 215, 40)),
    "cheese": ("triangle", (235, 215, 40)),
    "leaf": ("triangle", (40, 150, 40)),
    "plum": ("disc", (120, 40, 150)),
}
_STUFF_COLOUR = {"sky": (120, 170, 235), "grass": (70, 160, 60), "sand": (215, 190, 130), "water": (30, 70, 160)}
SPLITS = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class Scene:
    """One synthetic scene.

    Attributes:
        image: (height, width, 3) uint8 RGB.
        labels: (height, width) int64 index into :data:`CLASSES`.
        concepts: visible class names, in caption order.
        caption: e.g. ``"a photo of apple, leaf and grass"``.
    """

    image: np.ndarray
    labels: np.ndarray
    concepts: tuple[str, ...]
    caption: str


def _stuff_texture(name: str, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(height, width, 3) float texture of a stuff class over the whole canvas."""
    base = np.array(_STUFF_COLOUR[name], dtype=np.float32)
    noise = rng.normal(0, 6, size=yy.shape)[..., None]
    if name == "sky":
        pattern = 12 * np.sin(0.25 * yy + rng.uniform(0, 6.3))[..., None]
    elif name == "grass":
        pattern = 18 * (((xx + rng.integers(0, 3)) % 3) == 0)[..., None] - 6
    elif name == "sand":
        pattern = 14 * (rng.random(yy.shape) < 0.15)[..., None]
    else:
        pattern = 18 * np.sin(1.2 * yy + 0.4 * xx + rng.uniform(0, 6.3))[..., None]
    return base + pattern + noise


def _shape_mask(shape: str, cy: float, cx: float, r: float, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    dy, dx = yy + 0.5 - cy, xx + 0.5 - cx
    if shape == "disc":
        return dy**2 + dx**2 <= r**2
    if shape == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    # upward triangle: apex at the top, base at the bottom
    return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)


def make_scene(split: str, index: int, size: int = 32) -> Scene:
    """The scene number ``index`` of ``split`` ("train", "val" or "test"); deterministic."""
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {sorted(SPLITS)}, got {split!r}")
    rng = np.random.default_rng([SPLITS[split], index, size])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    labels = np.zeros((size, size), dtype=np.int64)
    image = np.zeros((size, size, 3), dtype=np.float32)

    stuff = rng.choice(len(STUFF), size=1 + int(rng.random() < 0.6), replace=False)
    region = np.ones((size, size), dtype=bool)
    if len(stuff) == 2:
        angle = rng.uniform(0, 2 * np.pi)
        py, px = rng.uniform(0.3 * size, 0.7 * size, size=2)
        region = (yy - py) * np.cos(angle) + (xx - px) * np.sin(angle) > 0
    for k, stuff_index in enumerate(stuff):
        where = region if k == 0 else ~region
        image[where] = _stuff_texture(STUFF[stuff_index], yy, xx, rng)[where]
        labels[where] = stuff_index

    for _ in range(rng.choice(5, p=[0.1, 0.3, 0.3, 0.2, 0.1])):
        name = OBJECTS[rng.integers(len(OBJECTS))]
        shape, colour = _OBJECT_STYLE[name]
        r = rng.uniform(0.12, 0.24) * size
        cy, cx = rng.uniform(0.1 * size, 0.9 * size, size=2)
        mask = _shape_mask(shape, cy, cx, r, yy, xx)
        shade = 1.0 + 0.25 * ((yy - cy) / max(r, 1.0))[..., None] * -0.5  # lit from above
        image[mask] = (np.array(colour, np.float32) * shade + rng.normal(0, 5, size=(size, size, 1)))[mask]
        labels[mask] = CLASSES.index(name)

    counts = np.bincount(labels.ravel(), minlength=len(CLASSES))
    visible = [CLASSES[i] for i in np.flatnonzero(counts >= 4)]
    # Pixels of classes too small to name (< 4 px) take the label of a named neighbour class: the
    # caption and label map must agree exactly.
    if len(visible) < np.count_nonzero(counts):
        labels = _absorb_tiny(labels, counts, image, rng)
    order = rng.permutation(len(visible))
    concepts = tuple(visible[i] for i in order)
    caption = "a photo of " + (concepts[0] if len(concepts) == 1 else ", ".join(concepts[:-1]) + " and " + concepts[-1])
    return Scene(np.clip(image, 0, 255).round().astype(np.uint8), labels, concepts, caption)


def _absorb_tiny(labels: np.ndarray, counts: np.ndarray, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Relabel (and repaint) classes with fewer than 4 pixels as the stuff class under them."""
    labels = labels.copy()
    stuff_here = [i for i in range(len(STUFF)) if counts[i] >= 4]
    for cls in np.flatnonzero((counts > 0) & (counts < 4)):
        for y, x in zip(*np.nonzero(labels == cls)):
            window = labels[max(0, y - 2) : y + 3, max(0, x - 2) : x + 3]
            candidates = [c for c in np.unique(window) if c in stuff_here] or stuff_here
            labels[y, x] = candidates[0]
            image[y, x] = _STUFF_COLOUR[STUFF[candidates[0]]]
    return labels


class SyntheticScenes:
    """Indexable dataset of scenes of one split (the shared dataset interface).

    Items are :class:`Scene` objects; ``class_names`` lists the label values' names.
    """

    class_names = CLASSES

    def __init__(self, split: str, count: int, size: int = 32, start: int = 0) -> None:
        if split not in SPLITS:
            raise ValueError(f"`split` must be one of {sorted(SPLITS)}, got {split!r}")
        self.split, self.count, self.size, self.start = split, count, size, start

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> Scene:
        if not 0 <= i < self.count:
            raise IndexError(f"scene {i} out of range 0-{self.count - 1}")
        return make_scene(self.split, self.start + i, self.size)
