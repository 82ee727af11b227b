"""Property-based tests (hypothesis) of the AP metric on random label images.

A label image scores AP 1 against itself and against any renumbering of its objects; AP is
symmetric, within [0, 1] and never increases with the IoU threshold; TP is a maximum
one-to-one matching; the IoU matrix of an image with itself is the identity. Empty images
(all zero, or with no pixels at all) score 1 against each other, as ``match_counts``
defines it, and 0 against an image with objects.

Examples are derandomized (the same ones on every run) so CI is deterministic.
"""

from __future__ import annotations

import numpy as np
from cellplug_testutils import ids_for
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching

from cellplug.metrics import DEFAULT_THRESHOLDS, average_precision, iou_matrix, match_counts

DTYPES = [np.uint8, np.uint16, np.uint32, np.int32, np.int64]
# below 0.5 a true object may overlap several predictions enough to match: the matching
# is then not unique, which the monotonicity and symmetry properties also exercise
THRESHOLDS = [0.0, 0.1, 0.25, 0.4, *DEFAULT_THRESHOLDS, 1.0]
FAST = settings(max_examples=100, deadline=None, derandomize=True)



@st.composite
def label_images(draw, shape=None, dtype=None) -> np.ndarray:
    """A label image: an (h, w) grid of ids from a small palette (0 = background), each cell
    blown up to sy x sx pixels (pixel noise when 1 x 1, touching rectangles otherwise).
    Objects may be in several pieces; h or w may be 0."""
    dtype = draw(st.sampled_from(DTYPES)) if dtype is None else dtype
    palette = draw(st.lists(ids_for(dtype), max_size=8, unique=True))
    if shape is None:
        h, w = draw(st.integers(0, 10)), draw(st.integers(0, 10))
        sy, sx = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    else:  # cells that divide the requested shape
        ly, lx = shape
        sy = draw(st.sampled_from([d for d in range(1, 7) if ly % d == 0] or [1]))
        sx = draw(st.sampled_from([d for d in range(1, 7) if lx % d == 0] or [1]))
        h, w = ly // sy, lx // sx
    grid = draw(hnp.arrays(dtype, (h, w), elements=st.sampled_from([0, *palette])))
    return np.kron(grid, np.ones((sy, sx), dtype)).astype(dtype)


@st.composite
def relabelled(draw) -> tuple[np.ndarray, np.ndarray]:
    """A label image and the same objects under other distinct ids, in another dtype."""
    labels = draw(label_images())
    old = np.unique(labels[labels > 0])
    dtype = draw(st.sampled_from(DTYPES))
    new = draw(st.lists(ids_for(dtype), min_size=old.size, max_size=old.size, unique=True))
    out = np.zeros(labels.shape, dtype)
    for a, b in zip(old, new, strict=True):
        out[labels == a] = b
    return labels, out


@st.composite
def pairs(draw) -> tuple[np.ndarray, np.ndarray]:
    """Two label images of the same shape: independent, or the second one the first shifted
    by a few pixels, or the first with some cells taken from an independent image (partial
    overlaps at many IoU values)."""
    a = draw(label_images())
    other = draw(label_images(shape=a.shape))
    how = draw(st.sampled_from(["independent", "shifted", "mixed"]))
    if how == "shifted":
        shift = (draw(st.integers(-3, 3)), draw(st.integers(-3, 3)))
        return a, np.roll(a, shift, axis=(0, 1))
    if how == "mixed":
        take = draw(label_images(shape=a.shape, dtype=np.uint8)) % 2 == 1
        return a, np.where(take, other, a)
    return a, other


def n_objects(labels: np.ndarray) -> int:
    return int(np.unique(labels[labels > 0]).size)


@FAST
@given(label_images())
# regression: iou_matrix raised IndexError on an image with no pixels (uniq[0] of nothing)
@example(np.zeros((0, 0), np.int32))
@example(np.zeros((0, 9), np.uint16))
@example(np.zeros((6, 6), np.int32))
@example(np.full((1, 1), 70000, np.int32))
@example(np.arange(1, 301, dtype=np.int64).reshape(3, 100))  # 300 touching objects
def test_ap_of_an_image_against_itself_is_1(labels):
    n = n_objects(labels)
    iou = iou_matrix(labels, labels)
    assert iou.shape == (n, n)
    np.testing.assert_array_equal(iou, np.eye(n))
    counts = match_counts(labels, labels, THRESHOLDS)
    assert (counts.tp == n).all() and not counts.fp.any() and not counts.fn.any()
    np.testing.assert_array_equal(average_precision(labels, labels), 1.0)
    np.testing.assert_array_equal(counts.ap, 1.0)
    np.testing.assert_array_equal(counts.f1, 1.0)


@FAST
@given(relabelled())
def test_renumbering_the_objects_keeps_ap_1(pair):
    labels, renumbered = pair
    np.testing.assert_array_equal(average_precision(labels, renumbered, THRESHOLDS), 1.0)
    np.testing.assert_array_equal(average_precision(renumbered, labels, THRESHOLDS), 1.0)


@FAST
@given(pairs())
@example((np.zeros((0, 4), np.int32), np.zeros((0, 4), np.uint8)))  # regression, as above
@example((np.zeros((3, 4), np.int32), np.zeros((3, 4), np.uint8)))
@example((np.zeros((3, 4), np.int32), np.eye(3, 4, dtype=np.uint8)))
# at 0.5 the only match is 2-2 (IoU 0.5); maximising the summed IoU alone would pick 1-2
# (0.4) and 2-1 (0.25) and find no match
@example((np.array([[1, 1, 2, 2, 2, 2]]), np.array([[2, 2, 1, 2, 2, 2]])))
def test_ap_is_symmetric_bounded_and_non_increasing_in_the_threshold(pair):
    """Also: TP is a maximum matching (checked against scipy's bipartite matching)."""
    a, b = pair
    counts = match_counts(a, b, THRESHOLDS)
    assert ((counts.tp >= 0) & (counts.fp >= 0) & (counts.fn >= 0)).all()
    assert (counts.tp + counts.fn == n_objects(a)).all()
    assert (counts.tp + counts.fp == n_objects(b)).all()
    ap = counts.ap
    assert ((ap >= 0) & (ap <= 1)).all()
    assert (np.diff(counts.tp) <= 0).all() and (np.diff(ap) <= 0).all()
    np.testing.assert_array_equal(average_precision(b, a, THRESHOLDS), ap)
    # TP is the largest number of one-to-one matches with IoU >= threshold
    iou = iou_matrix(a, b)
    for t, tp in zip(THRESHOLDS, counts.tp, strict=True):
        edges = csr_matrix((iou >= t).astype(np.int8))
        best = (maximum_bipartite_matching(edges, perm_type="column") >= 0).sum() if iou.size else 0
        assert tp == best, t
    if n_objects(a) == n_objects(b) == 0:  # nothing to find, nothing found
        np.testing.assert_array_equal(ap, 1.0)
    elif n_objects(a) == 0 or n_objects(b) == 0:  # all misses or all false positives
        np.testing.assert_array_equal(ap, 0.0)
