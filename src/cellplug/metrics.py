"""Instance-segmentation metrics: average precision at IoU thresholds.

AP at threshold t is ``TP / (TP + FP + FN)`` where a true and a predicted object match
(one-to-one) when their intersection over union is at least t; the matching maximises the
number of matches, then the summed IoU (the definition used by the Cellpose and StarDist
papers and by the DSB 2018 challenge per threshold).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix

DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(np.round(np.arange(0.5, 1.0, 0.05), 2))


def _sequential(labels: np.ndarray) -> tuple[np.ndarray, int]:
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 2-D integer array, got {labels.dtype} {labels.shape}")
    uniq, inv = np.unique(labels, return_inverse=True)
    if uniq.size and uniq[0] != 0:  # no background: ids start at 1 (empty image: no ids)
        inv = inv + 1
    return inv.reshape(labels.shape), int(np.count_nonzero(uniq))


def iou_matrix(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """IoU of every (true object, predicted object) pair.

    Parameters
    ----------
    true, pred
        (H, W) integer label images of the same shape, 0 = background; ids need not be
        contiguous.

    Returns
    -------
    ndarray
        float64 (n_true, n_pred), objects in increasing id order.
    """
    if np.shape(true) != np.shape(pred):
        raise ValueError(f"shape mismatch: true {np.shape(true)} vs pred {np.shape(pred)}")
    t, nt = _sequential(true)
    p, npred = _sequential(pred)
    overlap = coo_matrix(
        (np.ones(t.size, np.int64), (t.ravel(), p.ravel())), shape=(nt + 1, npred + 1)
    ).toarray()
    area_t = overlap.sum(axis=1, keepdims=True)
    area_p = overlap.sum(axis=0, keepdims=True)
    union = area_t + area_p - overlap
    iou = np.divide(overlap, union, out=np.zeros(overlap.shape), where=union > 0)
    return iou[1:, 1:]


def _n_matches(iou: np.ndarray, threshold: float) -> int:
    if iou.size == 0:
        return 0
    n_min = min(iou.shape)
    # maximise matches above threshold first, then total IoU as a tie-breaker
    cost = -(iou >= threshold).astype(float) - iou / (2 * n_min)
    rows, cols = linear_sum_assignment(cost)
    return int((iou[rows, cols] >= threshold).sum())


@dataclass(frozen=True)
class MatchCounts:
    """Matching result of one image at several thresholds (arrays over thresholds)."""

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray

    @property
    def ap(self) -> np.ndarray:
        denom = self.tp + self.fp + self.fn
        return np.divide(self.tp, denom, out=np.ones(self.tp.shape), where=denom > 0)

    @property
    def precision(self) -> np.ndarray:
        d = self.tp + self.fp
        return np.divide(self.tp, d, out=np.ones(self.tp.shape), where=d > 0)

    @property
    def recall(self) -> np.ndarray:
        d = self.tp + self.fn
        return np.divide(self.tp, d, out=np.ones(self.tp.shape), where=d > 0)

    @property
    def f1(self) -> np.ndarray:
        d = 2 * self.tp + self.fp + self.fn
        return np.divide(2 * self.tp, d, out=np.ones(self.tp.shape), where=d > 0)

    def __add__(self, other: MatchCounts) -> MatchCounts:
        if not np.array_equal(self.thresholds, other.thresholds):
            raise ValueError("cannot add counts at different thresholds")
        return MatchCounts(
            self.thresholds, self.tp + other.tp, self.fp + other.fp, self.fn + other.fn
        )


def match_counts(
    true: np.ndarray, pred: np.ndarray, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> MatchCounts:
    """True positives, false positives and false negatives at each IoU threshold.

    An image with no objects in either image scores AP 1 (nothing to find, nothing found).
    """
    th = np.asarray(thresholds, dtype=float)
    iou = iou_matrix(true, pred)
    nt, npred = iou.shape
    tp = np.array([_n_matches(iou, t) for t in th], dtype=np.int64)
    return MatchCounts(th, tp, npred - tp, nt - tp)


def average_precision(
    true: np.ndarray, pred: np.ndarray, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> np.ndarray:
    """AP = TP / (TP + FP + FN) at each threshold for one image; float64 (len(thresholds),)."""
    return match_counts(true, pred, thresholds).ap
