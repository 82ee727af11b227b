"""Average precision at IoU thresholds, on hand-made cases whose answers are worked out
by hand: AP = TP / (TP + FP + FN) with one-to-one matching at IoU >= threshold."""

from __future__ import annotations

import numpy as np
import pytest

from cellplug.metrics import (
    DEFAULT_THRESHOLDS,
    MatchCounts,
    average_precision,
    iou_matrix,
    match_counts,
)


def boxes(shape, *rects):
    """Label image with rectangle k+1 = (y0, y1, x0, x1) (later ones overwrite)."""
    lab = np.zeros(shape, np.int32)
    for k, (y0, y1, x0, x1) in enumerate(rects, 1):
        lab[y0:y1, x0:x1] = k
    return lab


A = (0, 10, 0, 10)
B = (0, 10, 20, 30)
C = (15, 20, 0, 20)
TRUE = boxes((20, 30), A, B, C)


def test_default_thresholds():
    np.testing.assert_allclose(DEFAULT_THRESHOLDS, np.arange(10) * 0.05 + 0.5)


def test_perfect_match_any_ids():
    pred = np.where(TRUE > 0, 10 * TRUE + 3, 0).astype(np.int64)  # 13, 23, 33
    ap = average_precision(TRUE, pred)
    assert ap.shape == (10,)
    np.testing.assert_array_equal(ap, 1.0)
    c = match_counts(TRUE, pred)
    assert c.tp.tolist() == [3] * 10 and c.fp.sum() == c.fn.sum() == 0


def test_missing_object():
    pred = boxes((20, 30), A, B)
    c = match_counts(TRUE, pred, [0.5])
    assert (c.tp[0], c.fp[0], c.fn[0]) == (2, 0, 1)
    assert average_precision(TRUE, pred, [0.5])[0] == pytest.approx(2 / 3)
    assert c.precision[0] == 1.0 and c.recall[0] == pytest.approx(2 / 3)


def test_extra_object():
    pred = boxes((20, 30), A, B, C, (11, 14, 22, 28))
    c = match_counts(TRUE, pred, [0.5])
    assert (c.tp[0], c.fp[0], c.fn[0]) == (3, 1, 0)
    assert average_precision(TRUE, pred, [0.5])[0] == pytest.approx(3 / 4)
    assert c.f1[0] == pytest.approx(2 * 3 / (2 * 3 + 1))


def test_split_object():
    """C (5 x 20) predicted as two halves: each half has IoU exactly 0.5 with C."""
    pred = boxes((20, 30), A, B, (15, 20, 0, 10), (15, 20, 10, 20))
    iou = iou_matrix(TRUE, pred)
    assert iou[2, 2] == 0.5 and iou[2, 3] == 0.5
    c = match_counts(TRUE, pred, [0.5, 0.55])
    # at 0.5 one half matches C (one-to-one), the other is a false positive
    assert (c.tp.tolist(), c.fp.tolist(), c.fn.tolist()) == ([3, 2], [1, 2], [0, 1])
    np.testing.assert_allclose(c.ap, [3 / 4, 2 / 5])


def test_merged_objects():
    """A and a neighbour A2 predicted as one box: IoU 0.5 with each."""
    true = boxes((20, 30), (0, 10, 0, 10), (0, 10, 10, 20))
    pred = boxes((20, 30), (0, 10, 0, 20))
    c = match_counts(true, pred, [0.5, 0.51])
    assert (c.tp.tolist(), c.fp.tolist(), c.fn.tolist()) == ([1, 0], [0, 1], [1, 2])
    np.testing.assert_allclose(c.ap, [1 / 2, 0])


def test_iou_exactly_at_threshold_is_a_match():
    true = boxes((10, 10), (0, 4, 0, 4))  # 16 px
    pred = boxes((10, 10), (0, 4, 0, 3))  # 12 px inside it: IoU 12/16 = 0.75
    assert iou_matrix(true, pred)[0, 0] == 0.75
    np.testing.assert_array_equal(average_precision(true, pred, [0.7, 0.75, 0.8]), [1, 1, 0])


def test_one_to_one_below_one_half():
    """At threshold 0.3 one prediction overlaps two objects with IoU 0.5 each: it matches
    only one of them."""
    true = boxes((10, 20), (0, 10, 0, 10), (0, 10, 10, 20))
    pred = boxes((10, 20), (0, 10, 0, 20))
    c = match_counts(true, pred, [0.3])
    assert (c.tp[0], c.fp[0], c.fn[0]) == (1, 0, 1)


def test_matching_maximises_the_number_of_matches():
    """1-row images (objects are intervals). t1's best partner is p1 (IoU 0.5), but p1 is
    also t2's only partner; pairing t1-p2 (0.3) and t2-p1 (4/11) gives two matches at 0.25,
    where matching best pairs first would give one."""
    true = np.zeros((1, 20), np.int32)
    true[0, 0:10] = 1  # t1
    true[0, 10:14] = 2  # t2
    pred = np.zeros((1, 20), np.int32)
    pred[0, 3:14] = 1  # p1
    pred[0, 0:3] = 2  # p2
    np.testing.assert_allclose(iou_matrix(true, pred), [[7 / 14, 3 / 10], [4 / 11, 0]])
    c = match_counts(true, pred, [0.25, 0.4])
    assert c.tp.tolist() == [2, 1]
    assert c.fp.tolist() == [0, 1] and c.fn.tolist() == [0, 1]


def test_empty_images():
    empty = np.zeros((8, 8), np.int32)
    some = boxes((8, 8), (1, 4, 1, 4))
    np.testing.assert_array_equal(average_precision(empty, empty), 1.0)  # nothing to find
    assert average_precision(empty, some, [0.5])[0] == 0.0
    assert average_precision(some, empty, [0.5])[0] == 0.0
    c = match_counts(some, empty, [0.5])
    assert (c.tp[0], c.fp[0], c.fn[0]) == (0, 0, 1)
    assert iou_matrix(empty, some).shape == (0, 1)


def test_iou_matrix_by_hand_and_in_id_order():
    true = boxes((10, 10), (0, 4, 0, 4), (6, 10, 6, 10))
    true = np.where(true == 1, 50, np.where(true == 2, 7, 0))  # ids 50 and 7
    pred = boxes((10, 10), (0, 4, 2, 6))  # 8 px shared with id 50
    iou = iou_matrix(true, pred)
    assert iou.shape == (2, 1)
    np.testing.assert_allclose(iou[:, 0], [0.0, 8 / 24])  # rows: id 7, then id 50


def test_counts_add_up_over_images():
    c1 = match_counts(TRUE, boxes((20, 30), A, B), [0.5, 0.9])
    c2 = match_counts(TRUE, TRUE, [0.5, 0.9])
    total = c1 + c2
    assert total.tp.tolist() == [5, 5] and total.fn.tolist() == [1, 1]
    np.testing.assert_allclose(total.ap, [5 / 6, 5 / 6])
    with pytest.raises(ValueError, match="thresholds"):
        c1 + match_counts(TRUE, TRUE, [0.5])
    assert isinstance(total, MatchCounts)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        iou_matrix(np.zeros((4, 4), int), np.zeros((4, 5), int))
    with pytest.raises(ValueError, match="integer"):
        iou_matrix(np.zeros((4, 4), float), np.zeros((4, 4), float))


def test_a_match_exactly_at_the_threshold_beats_a_larger_total_iou():
    """1-row intervals: t1 = [0, 10), t2 = [10, 16); p1 = [2, 16), p2 = [0, 2).
    IoU(t1, p1) = 8 / 16 = 0.5 exactly, IoU(t2, p1) = 6 / 14, IoU(t1, p2) = 2 / 10. Pairing
    t1-p2 and t2-p1 has the larger total IoU (0.63 > 0.5) but no match at 0.5; the matching
    must take the one match that counts: TP 1, FP 1, FN 1."""
    true = np.zeros((1, 16), np.int32)
    true[0, 0:10], true[0, 10:16] = 1, 2
    pred = np.zeros((1, 16), np.int32)
    pred[0, 2:16], pred[0, 0:2] = 1, 2
    np.testing.assert_allclose(iou_matrix(true, pred), [[0.5, 0.2], [6 / 14, 0.0]])
    c = match_counts(true, pred, [0.5])
    assert (c.tp[0], c.fp[0], c.fn[0]) == (1, 1, 1)
    assert average_precision(true, pred, [0.5])[0] == pytest.approx(1 / 3)
