"""Metrics on hand-computed cases and against a brute-force reference."""

from __future__ import annotations

import math

import pytest
import torch

from conceptattention.core import (
    SegmentationCounts,
    average_precision,
    binary_map_ap,
    confusion_matrix,
    iou_per_class,
    mean_iou,
    miou_paper_compat,
    pixel_accuracy,
)


def test_confusion_matrix_accuracy_and_iou_hand_case():
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 1, 0]])
    cm = confusion_matrix(pred, target, 3, ignore_index=255)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [0, 1, 0]]
    assert pixel_accuracy(cm) == pytest.approx(3 / 5)
    # IoU: class0 = 1/2, class1 = 2/4, class2 = 0/1
    assert iou_per_class(cm).tolist() == pytest.approx([0.5, 0.5, 0.0])
    assert mean_iou(cm) == pytest.approx(1 / 3)


def test_classes_with_empty_union_are_skipped():
    cm = confusion_matrix(torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1]), 4)
    assert math.isnan(float(iou_per_class(cm)[3]))
    assert mean_iou(cm) == 1.0


def test_counts_merge_exactly_across_shards():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randint(0, 3, (4, 8, 8), generator=g), torch.randint(0, 3, (4, 8, 8), generator=g)
    whole = SegmentationCounts(3)
    whole.update(pred, target)
    left, right = SegmentationCounts(3), SegmentationCounts(3)
    left.update(pred[:2], target[:2])
    right.update(pred[2:], target[2:])
    left.merge(right)
    assert torch.equal(left.confmat, whole.confmat) and left.miou() == whole.miou()


def _brute_force_ap(scores, target):
    """AP = sum over positives of precision at that positive's threshold (ties counted together)."""
    positives = [s for s, t in zip(scores, target) if t]
    total = 0.0
    for s in positives:
        retrieved = [t for x, t in zip(scores, target) if x >= s]
        total += sum(retrieved) / len(retrieved)
    return total / len(positives)


@pytest.mark.parametrize("seed", range(5))
def test_average_precision_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (40,), generator=g).float()  # many ties
    target = torch.rand(40, generator=g) < 0.4
    assert average_precision(scores, target) == pytest.approx(_brute_force_ap(scores.tolist(), target.tolist()))


def test_average_precision_hand_cases():
    assert average_precision(torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([1, 0, 1, 0])) == pytest.approx(5 / 6)
    assert average_precision(torch.tensor([0.1, 0.9]), torch.tensor([0, 1])) == 1.0
    assert math.isnan(average_precision(torch.tensor([0.1, 0.9]), torch.tensor([0, 0])))


def test_paper_compat_differs_from_miou_and_equals_acc_over_two_minus_acc():
    # 10 pixels: 8 background, 2 foreground; prediction finds 1 of the 2 and adds 1 false positive
    target = torch.tensor([0] * 8 + [1, 1])
    pred = torch.tensor([0] * 7 + [1] + [1, 0])
    cm = confusion_matrix(pred, target, 2)
    acc = pixel_accuracy(cm)
    assert acc == pytest.approx(0.8)
    # standard: bg IoU = 7/9, fg IoU = 1/3 -> 5/9
    assert mean_iou(cm) == pytest.approx((7 / 9 + 1 / 3) / 2)
    assert miou_paper_compat(cm) == pytest.approx(0.8 / 1.2)
    assert miou_paper_compat(cm) != pytest.approx(mean_iou(cm))


@pytest.mark.parametrize("seed", range(4))
def test_paper_compat_identity_on_random_binary_masks(seed):
    g = torch.Generator().manual_seed(seed)
    counts = SegmentationCounts(2)
    for _ in range(3):
        counts.update(torch.rand(16, 16, generator=g) > 0.5, torch.rand(16, 16, generator=g) > 0.3)
    acc = counts.accuracy()
    assert counts.miou_paper_compat() == pytest.approx(acc / (2 - acc))


def test_binary_map_ap_two_channel_hand_case():
    soft = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    mask = torch.tensor([[True, False], [True, False]])
    # scores: bg channel [0, 1, .5, .5] (targets F, T, F, T); fg channel [1, 0, .5, .5] (T, F, T, F)
    scores = torch.tensor([0.0, 1.0, 0.5, 0.5, 1.0, 0.0, 0.5, 0.5])
    target = torch.tensor([0, 1, 0, 1, 1, 0, 1, 0]).bool()
    assert binary_map_ap(soft, mask) == pytest.approx(_brute_force_ap(scores.tolist(), target.tolist()))
    assert binary_map_ap(mask.float(), mask) == 1.0
