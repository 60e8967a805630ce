"""Segmentation metrics from summable sufficient statistics (so shards merge by addition).

Functional forms take predictions and targets; :class:`SegmentationCounts` accumulates
a confusion matrix over a dataset and computes the dataset-level values.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = None):
    """(K, K) int64 counts, rows = target class, columns = predicted class.

    Args:
        pred: (...) int predicted class per pixel.
        target: (...) int true class per pixel; ``ignore_index`` pixels are skipped.
        num_classes: K.
    """
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    for name, ids in (("pred", pred), ("target", target)):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_classes):
            raise ValueError(
                f"`{name}` holds class ids outside [0, {num_classes}) (min {int(ids.min())}, max {int(ids.max())}); "
                "they would be counted in the wrong cells"
            )
    return torch.bincount(target * num_classes + pred, minlength=num_classes**2).view(num_classes, num_classes)


def pixel_accuracy(confmat: torch.Tensor) -> float:
    """Correct pixels / labelled pixels."""
    total = int(confmat.sum())
    return float(confmat.diagonal().sum()) / total if total else float("nan")


def iou_per_class(confmat: torch.Tensor) -> torch.Tensor:
    """(K,) float64 intersection / union per class; NaN where the union is empty."""
    confmat = confmat.double()
    intersection = confmat.diagonal()
    union = confmat.sum(0) + confmat.sum(1) - intersection
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.full_like(union, float("nan")))


def mean_iou(confmat: torch.Tensor) -> float:
    """Mean IoU over classes with a non-empty union (standard mIoU)."""
    ious = iou_per_class(confmat)
    valid = ~ious.isnan()
    return float(ious[valid].mean()) if valid.any() else float("nan")


def miou_paper_compat(confmat: torch.Tensor) -> float:
    """The quantity the public ConceptAttention code reported as "mIoU" (kept for comparison only).

    Its binary evaluation skipped an argmax, so intersection became the correct pixels
    and union ``2 * labelled - correct``; the result equals ``acc / (2 - acc)``. It is not
    an IoU: use :func:`mean_iou` for the standard metric.
    """
    correct, labelled = float(confmat.diagonal().sum()), float(confmat.sum())
    return correct / (2 * labelled - correct) if labelled else float("nan")


def binary_map_ap(soft: torch.Tensor, mask: torch.Tensor) -> float:
    """Per-image AP of a soft foreground map, Chefer et al. (2021) style.

    The map in [0, 1] and its complement form a two-channel prediction scored against
    the one-hot (background, foreground) ground truth, flattened together.

    Args:
        soft: (height, width) float in [0, 1].
        mask: (height, width) bool foreground.
    """
    scores = torch.cat([1 - soft.reshape(-1), soft.reshape(-1)])
    target = torch.cat([~mask.reshape(-1).bool(), mask.reshape(-1).bool()])
    return average_precision(scores, target)


def average_precision(scores: torch.Tensor, target: torch.Tensor) -> float:
    """Average precision of soft scores against a binary target (step-wise, as sklearn).

    Args:
        scores: (...) float scores, higher = more likely positive.
        target: (...) bool or {0, 1}, same shape.

    Returns:
        AP in [0, 1]; NaN when there are no positives.
    """
    scores, target = scores.reshape(-1).double(), target.reshape(-1).bool()
    positives = int(target.sum())
    if positives == 0:
        return float("nan")
    order = torch.argsort(scores, descending=True, stable=True)
    scores, hits = scores[order], target[order].double()
    # group tied scores: precision/recall are evaluated at the last index of each distinct score
    last = torch.ones_like(scores, dtype=torch.bool)
    last[:-1] = scores[1:] != scores[:-1]
    tp = hits.cumsum(0)[last]
    seen = torch.arange(1, scores.numel() + 1, dtype=torch.float64)[last]
    precision, recall = tp / seen, tp / positives
    recall_steps = torch.diff(recall, prepend=torch.zeros(1, dtype=torch.float64))
    return float((recall_steps * precision).sum())


class SegmentationCounts:
    """Dataset-level accumulator of a confusion matrix (exact merge across batches and shards).

    Example:
        >>> counts = SegmentationCounts(2)
        >>> counts.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
        >>> round(counts.accuracy(), 3), round(counts.miou(), 3)
        (0.667, 0.5)
    """

    def __init__(self, num_classes: int, ignore_index: int | None = None) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confmat = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    @classmethod
    def from_sparse(cls, entries: Iterable[Sequence[int]], num_classes: int) -> SegmentationCounts:
        """Counts from :meth:`sparse` rows ``[target, pred, count]`` (e.g. read back from JSON)."""
        counts = cls(num_classes)
        for target, pred, count in entries:
            counts.confmat[target, pred] += count
        return counts

    def sparse(self) -> list[list[int]]:
        """The non-zero cells as ``[target, pred, count]`` rows: a compact, JSON-friendly form."""
        return [[t, p, int(self.confmat[t, p])] for t, p in self.confmat.nonzero().tolist()]

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.confmat += confusion_matrix(pred.cpu(), target.cpu(), self.num_classes, self.ignore_index)

    def merge(self, other: SegmentationCounts) -> None:
        self.confmat += other.confmat

    def accuracy(self) -> float:
        return pixel_accuracy(self.confmat)

    def miou(self) -> float:
        return mean_iou(self.confmat)

    def ious(self) -> torch.Tensor:
        return iou_per_class(self.confmat)

    def miou_paper_compat(self) -> float:
        return miou_paper_compat(self.confmat)
