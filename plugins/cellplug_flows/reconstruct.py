"""Flows -> masks: follow the flows, cluster where pixels meet, check and clean the masks.

The steps and their defaults are those of Cellpose 3.1.1.2 (``dynamics.compute_masks`` and
``utils.fill_holes_and_remove_small_masks``); every loop over pixels or objects is numba.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .dynamics import follow_flows
from .heat import masks_to_flows

RPAD = 20  # histogram padding (pixels), as Cellpose
SEED_WINDOW = 5  # seeds grow inside a (2 * 5 + 1)^2 window
SEED_MIN_COUNT = 10  # a histogram peak needs more than this many end points
GROW_MIN_COUNT = 2  # seed growth only into bins with more than this many end points
GROW_ITERATIONS = 5


@njit(cache=True)
def _histogram(final, ly, lx):
    """Histogram of the truncated end points, padded by RPAD; returns (bin y, bin x, h)."""
    n = final.shape[1]
    py = np.empty(n, np.int32)
    px = np.empty(n, np.int32)
    h = np.zeros((ly + 2 * RPAD, lx + 2 * RPAD), np.int32)
    for k in range(n):
        y = min(max(int(final[0, k]) + RPAD, 0), ly + RPAD - 1)
        x = min(max(int(final[1, k]) + RPAD, 0), lx + RPAD - 1)
        py[k] = y
        px[k] = x
        h[y, x] += 1
    return py, px, h


@njit(cache=True)
def _paint(labels, ys, xs, M, py, px):
    """labels[ys[k], xs[k]] = M[py[k], px[k]] for every end point k."""
    for k in range(ys.shape[0]):
        labels[ys[k], xs[k]] = M[py[k], px[k]]


@njit(cache=True)
def _max_filter5(h):
    """5x5 maximum filter (windows clipped at the border), separable."""
    ny, nx = h.shape
    tmp = np.empty_like(h)
    out = np.empty_like(h)
    for i in range(ny):
        for j in range(nx):
            m = h[i, j]
            for d in range(-2, 3):
                jj = j + d
                if 0 <= jj < nx and h[i, jj] > m:
                    m = h[i, jj]
            tmp[i, j] = m
    for i in range(ny):
        for j in range(nx):
            m = tmp[i, j]
            for d in range(-2, 3):
                ii = i + d
                if 0 <= ii < ny and tmp[ii, j] > m:
                    m = tmp[ii, j]
            out[i, j] = m
    return out


@njit(cache=True)
def _grow_seeds(h, seeds_y, seeds_x):
    """Paint each seed's region (grown in its window over well-populated bins) into a map.

    Seeds are processed in the given order; a later seed overwrites an earlier one.
    """
    w = SEED_WINDOW
    size = 2 * w + 1
    M = np.zeros(h.shape, np.int32)
    reg = np.zeros((size, size), np.bool_)
    nxt = np.zeros((size, size), np.bool_)
    for k in range(seeds_y.shape[0]):
        sy = seeds_y[k]
        sx = seeds_x[k]
        reg[:, :] = False
        reg[w, w] = True
        for _ in range(GROW_ITERATIONS):
            for i in range(size):
                for j in range(size):
                    v = False
                    for di in range(-1, 2):
                        ii = i + di
                        if ii < 0 or ii >= size:
                            continue
                        for dj in range(-1, 2):
                            jj = j + dj
                            if 0 <= jj < size and reg[ii, jj]:
                                v = True
                    nxt[i, j] = v and h[sy - w + i, sx - w + j] > GROW_MIN_COUNT
            reg[:, :] = nxt
        for i in range(size):
            for j in range(size):
                if reg[i, j]:
                    M[sy - w + i, sx - w + j] = k + 1
    return M


def cluster_end_points(
    final: np.ndarray, start: tuple[np.ndarray, np.ndarray], shape: tuple[int, int],
    max_size_fraction: float = 0.4,
) -> np.ndarray:
    """Label pixels by where they ended up.

    A histogram of the (truncated) end points is made; its local maxima (5x5) with more than
    10 end points are seeds; each seed grows for 5 steps (3x3) over bins with more than 2
    end points, inside an 11x11 window; every pixel gets the label of the region its end
    point falls in (0 if none). Masks larger than ``max_size_fraction`` of the image are
    dropped.

    Returns
    -------
    ndarray
        int32 (H, W) labels numbered 1..N.
    """
    ly, lx = shape
    labels = np.zeros(shape, np.int32)
    if final.shape[1] == 0:
        return labels
    py, px, h = _histogram(final, ly, lx)
    hmax = _max_filter5(h)
    sy, sx = np.nonzero((h >= hmax) & (h > SEED_MIN_COUNT))
    if sy.size == 0:
        return labels
    order = np.argsort(h[sy, sx], kind="stable")  # fewest first: larger peaks win overlaps
    M = _grow_seeds(h, sy[order].astype(np.int64), sx[order].astype(np.int64))
    del hmax
    _paint(labels, start[0], start[1], M, py, px)
    counts = np.bincount(labels.ravel())
    too_big = np.nonzero(counts > labels.size * max_size_fraction)[0]
    too_big = too_big[too_big > 0]
    if too_big.size:
        labels[np.isin(labels, too_big)] = 0
    return renumber(labels)


def renumber(labels: np.ndarray) -> np.ndarray:
    """Relabel to 1..N in order of increasing old label (0 stays 0)."""
    counts = np.bincount(labels.ravel(), minlength=1)  # counts[0] exists even if empty
    present = counts > 0
    present[0] = False
    lut = np.zeros(counts.size, labels.dtype)
    lut[present] = np.arange(1, present.sum() + 1, dtype=labels.dtype)
    return lut[labels]


def flow_errors(labels: np.ndarray, flows: np.ndarray) -> np.ndarray:
    """Mean squared difference between the flows of ``labels`` and the given ``flows``.

    Parameters
    ----------
    labels
        (H, W) int labels 1..N.
    flows
        float32 (2, H, W) unit-scale flows (e.g. predicted by a network).

    Returns
    -------
    ndarray
        float64 (N,): for each object, the mean over its pixels of the squared difference
        summed over the two components.
    """
    labels = np.asarray(labels)
    n = int(labels.max()) if labels.size else 0
    if n == 0:
        return np.zeros(0)
    mflows = masks_to_flows(labels)
    return _mean_sq_error(labels, mflows, np.asarray(flows), n)


@njit(cache=True, nogil=True)
def _mean_sq_error(labels, a, b, n):
    """Per label 1..n: mean over its pixels of sum_c (a[c] - b[c])^2 (0 for absent labels)."""
    sums = np.zeros(n + 1, np.float64)
    counts = np.zeros(n + 1, np.int64)
    for i in range(labels.shape[0]):
        for j in range(labels.shape[1]):
            v = labels[i, j]
            if v > 0:
                d0 = np.float64(a[0, i, j]) - np.float64(b[0, i, j])
                d1 = np.float64(a[1, i, j]) - np.float64(b[1, i, j])
                sums[v] += d0 * d0 + d1 * d1
                counts[v] += 1
    out = np.zeros(n, np.float64)
    for k in range(1, n + 1):
        if counts[k] > 0:
            out[k - 1] = sums[k] / counts[k]
    return out


@njit(cache=True)
def _fill_holes(lab, n):
    """Fill holes in each object: pixels of its bounding box not reachable from the box
    border through non-object pixels (4-connectivity) become part of the object."""
    ny, nx = lab.shape
    y0 = np.full(n + 1, ny, np.int64)
    y1 = np.full(n + 1, -1, np.int64)
    x0 = np.full(n + 1, nx, np.int64)
    x1 = np.full(n + 1, -1, np.int64)
    for i in range(ny):
        for j in range(nx):
            v = lab[i, j]
            if v > 0:
                y0[v] = min(y0[v], i)
                y1[v] = max(y1[v], i)
                x0[v] = min(x0[v], j)
                x1[v] = max(x1[v], j)
    _fill_holes_in_boxes(lab, n, y0, y1, x0, x1)


@njit(cache=True)
def _fill_holes_in_boxes(lab, n, y0, y1, x0, x1):
    """:func:`_fill_holes` given each label's bounding box (inclusive, y1 < 0: absent)."""
    for k in range(1, n + 1):
        if y1[k] < 0:
            continue
        h = y1[k] - y0[k] + 1
        w = x1[k] - x0[k] + 1
        if h < 3 or w < 3:
            continue
        reach = np.zeros((h, w), np.bool_)
        stack = np.empty(h * w, np.int64)
        top = 0
        for i in range(h):
            for j in range(w):
                if (i == 0 or j == 0 or i == h - 1 or j == w - 1) and lab[
                    y0[k] + i, x0[k] + j
                ] != k:
                    reach[i, j] = True
                    stack[top] = i * w + j
                    top += 1
        while top > 0:
            top -= 1
            p = stack[top]
            i = p // w
            j = p % w
            for d in range(4):
                ii = i + (d == 0) - (d == 1)
                jj = j + (d == 2) - (d == 3)
                if 0 <= ii < h and 0 <= jj < w and not reach[ii, jj]:
                    if lab[y0[k] + ii, x0[k] + jj] != k:
                        reach[ii, jj] = True
                        stack[top] = ii * w + jj
                        top += 1
        for i in range(1, h - 1):
            for j in range(1, w - 1):
                if not reach[i, j]:
                    lab[y0[k] + i, x0[k] + j] = k


def remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Drop objects with fewer than ``min_size`` pixels and renumber (no-op if <= 0)."""
    if min_size <= 0 or labels.size == 0 or labels.max() == 0:
        return labels
    counts = np.bincount(labels.ravel())
    small = counts < min_size
    small[0] = False
    if small.any():
        labels = np.where(small[labels], 0, labels).astype(labels.dtype)
        labels = renumber(labels)
    return labels


def fill_holes_and_remove_small(labels: np.ndarray, min_size: int = 15) -> np.ndarray:
    """Remove objects below ``min_size`` pixels, fill holes, remove small ones again.

    Parameters
    ----------
    labels
        (H, W) integer labels 1..N (modified copy returned).
    min_size
        Minimum object size in pixels; ``<= 0`` keeps every object (holes are still filled).

    Returns
    -------
    ndarray
        int32 (H, W) labels numbered 1..M.
    """
    lab = remove_small(np.asarray(labels, dtype=np.int32).copy(), min_size)
    n = int(lab.max()) if lab.size else 0
    if n:
        _fill_holes(lab, n)
        lab = remove_small(renumber(lab), min_size)
    return lab


# -- flows -> masks on the list of foreground pixels ---------------------------------------
# The steps above each pass over the whole image (histogram maxima, renumbering, bounding
# boxes, object sizes). On sparse images (a few per cent foreground, as real microscopy
# often is) those full passes cost more than following the flows; Cellpose's cost falls with
# the foreground. The functions below give the same labels from the foreground pixels'
# list (and each object's bounding box) only; the whole image is touched once, at the end.
@njit(cache=True)
def _seeds(h, py, px):
    """The bins :func:`cluster_end_points` takes as seeds (more than SEED_MIN_COUNT end points
    and the maximum of their clipped 5x5 window), looking only at bins end points fell in."""
    ny, nx = h.shape
    seen = np.zeros(h.shape, np.bool_)
    cy = np.empty(py.shape[0], np.int64)
    cx = np.empty(py.shape[0], np.int64)
    m = 0
    for k in range(py.shape[0]):
        y = py[k]
        x = px[k]
        if seen[y, x]:
            continue
        seen[y, x] = True
        v = h[y, x]
        if v <= SEED_MIN_COUNT:
            continue
        peak = True
        for yy in range(max(0, y - 2), min(ny, y + 3)):
            for xx in range(max(0, x - 2), min(nx, x + 3)):
                if h[yy, xx] > v:
                    peak = False
        if peak:
            cy[m] = y
            cx[m] = x
            m += 1
    return cy[:m], cx[:m]


@njit(cache=True)
def _gather(M, py, px):
    out = np.empty(py.shape[0], np.int32)
    for k in range(py.shape[0]):
        out[k] = M[py[k], px[k]]
    return out


@njit(cache=True)
def _boxes_of(ys, xs, vals, n):
    """Bounding boxes [y0, y1, x0, x1] (inclusive; y1 = -1: absent) of labels 0..n."""
    box = np.empty((n + 1, 4), np.int64)
    box[:, 0] = 1 << 40
    box[:, 1] = -1
    box[:, 2] = 1 << 40
    box[:, 3] = -1
    for k in range(vals.shape[0]):
        v = vals[k]
        if v > 0:
            b = box[v]
            b[0] = min(b[0], ys[k])
            b[1] = max(b[1], ys[k])
            b[2] = min(b[2], xs[k])
            b[3] = max(b[3], xs[k])
    return box


@njit(cache=True)
def _scatter(lab, ys, xs, vals):
    for k in range(vals.shape[0]):
        lab[ys[k], xs[k]] = vals[k]


@njit(cache=True, nogil=True)
def _mean_sq_error_list(ys, xs, vals, a, b, n):
    """:func:`_mean_sq_error` over a row-major pixel list (same sums, same order)."""
    sums = np.zeros(n + 1, np.float64)
    counts = np.zeros(n + 1, np.int64)
    for k in range(vals.shape[0]):
        v = vals[k]
        if v > 0:
            i = ys[k]
            j = xs[k]
            d0 = np.float64(a[0, i, j]) - np.float64(b[0, i, j])
            d1 = np.float64(a[1, i, j]) - np.float64(b[1, i, j])
            sums[v] += d0 * d0 + d1 * d1
            counts[v] += 1
    out = np.zeros(n, np.float64)
    for k in range(1, n + 1):
        if counts[k] > 0:
            out[k - 1] = sums[k] / counts[k]
    return out


@njit(cache=True)
def _count_in_boxes(lab, box, n):
    counts = np.zeros(n + 1, np.int64)
    for k in range(1, n + 1):
        if box[k, 1] < 0:
            continue
        for i in range(box[k, 0], box[k, 1] + 1):
            for j in range(box[k, 2], box[k, 3] + 1):
                if lab[i, j] == k:
                    counts[k] += 1
    return counts


@njit(cache=True)
def _relabel_in_boxes(lab, box, lut, out):
    for k in range(1, lut.shape[0]):
        if box[k, 1] < 0 or lut[k] == 0:
            continue
        for i in range(box[k, 0], box[k, 1] + 1):
            for j in range(box[k, 2], box[k, 3] + 1):
                if lab[i, j] == k:
                    out[i, j] = lut[k]


def _renumber_values(vals: np.ndarray) -> np.ndarray:
    """:func:`renumber` of the label values of a pixel list."""
    return renumber(vals)


def _remove_small_values(vals: np.ndarray, min_size: int) -> np.ndarray:
    """:func:`remove_small` of the label values of a pixel list."""
    if min_size <= 0 or vals.size == 0 or vals.max() == 0:
        return vals
    counts = np.bincount(vals)
    small = counts < min_size
    small[0] = False
    if small.any():
        vals = np.where(small[vals], 0, vals).astype(vals.dtype)
        vals = renumber(vals)
    return vals


def masks_from_end_points(
    final: np.ndarray, start: tuple[np.ndarray, np.ndarray], flows: np.ndarray,
    shape: tuple[int, int], flow_threshold: float | None = 0.4, min_size: int = 15,
    max_size_fraction: float = 0.4,
) -> np.ndarray:
    """The labels :func:`flows_to_masks` makes from followed pixels, in work proportional to
    the foreground: :func:`cluster_end_points`, the flow-error check and
    :func:`fill_holes_and_remove_small`, on the pixel list (row-major, as ``start``)."""
    ly, lx = shape
    ys, xs = start
    py, px, h = _histogram(final, ly, lx)
    sy, sx = _seeds(h, py, px)
    if sy.size == 0:
        return np.zeros(shape, np.uint32)
    rowmajor = np.argsort(sy * h.shape[1] + sx)  # the order np.nonzero gives
    sy, sx = sy[rowmajor], sx[rowmajor]
    order = np.argsort(h[sy, sx], kind="stable")
    M = _grow_seeds(h, sy[order], sx[order])
    vals = _gather(M, py, px)
    del M, h
    counts = np.bincount(vals)
    too_big = counts > ly * lx * max_size_fraction
    too_big[0] = False
    if too_big.any():
        vals[too_big[vals]] = 0
    vals = _renumber_values(vals)
    n = int(vals.max())
    if flow_threshold is not None and flow_threshold > 0 and n > 0:
        from .heat import _all_objects

        lab = np.zeros(shape, np.int32)
        _scatter(lab, ys, xs, vals)
        box = _boxes_of(ys, xs, vals, n)[1:]
        box[:, 1] += 1  # heat's boxes: exclusive stops
        box[:, 3] += 1
        area = (box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2])
        mflows = np.zeros((2, ly, lx), np.float32)
        centers = np.zeros((n, 2), np.int64)
        import numba

        with numba.parallel_chunksize(1):  # as heat.masks_to_flows: largest first
            _all_objects(lab, box, np.argsort(-area, kind="stable").astype(np.int64), -1,
                         mflows, centers)
        errors = _mean_sq_error_list(ys, xs, vals, mflows, np.asarray(flows), n)
        del mflows, lab
        bad = np.concatenate([[False], errors > flow_threshold])
        if bad.any():
            vals[bad[vals]] = 0
    vals = _remove_small_values(vals, min_size)
    n = int(vals.max()) if vals.size else 0
    out = np.zeros(shape, np.uint32)
    if n == 0:
        return out
    lab = np.zeros(shape, np.int32)
    _scatter(lab, ys, xs, vals)
    box = _boxes_of(ys, xs, vals, n)
    _fill_holes_in_boxes(lab, n, box[:, 0], box[:, 1], box[:, 2], box[:, 3])
    counts = _count_in_boxes(lab, box, n)  # a fill stays inside its object's box
    keep = counts > 0
    if min_size > 0:
        keep &= counts >= min_size
    keep[0] = False
    lut = np.zeros(n + 1, np.uint32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
    _relabel_in_boxes(lab, box, lut, out)
    return out


def flows_to_masks(
    flows: np.ndarray,
    cellprob: np.ndarray,
    *,
    niter: int = 200,
    cellprob_threshold: float = 0.0,
    flow_threshold: float = 0.4,
    min_size: int = 15,
    max_size_fraction: float = 0.4,
    interp: bool = True,
    sparse: bool = True,
    **_ignored: object,
) -> np.ndarray:
    """Rebuild a label image from a flow field and a cell-probability map.

    Parameters
    ----------
    flows
        float32 (2, H, W) unit-scale flow field (Y then X), pointing towards object centres.
    cellprob
        float32 (H, W) cell-probability logit.
    niter
        Euler steps; default 200 (the segmenter scales it with the object diameter, as
        Cellpose does when resampling).
    cellprob_threshold
        Pixels with ``cellprob > cellprob_threshold`` are followed; default 0.0. Lower it to
        get more and larger masks.
    flow_threshold
        Masks whose flows, recomputed from the mask, differ from ``flows`` by a mean squared
        error above this are dropped; default 0.4. ``0`` or ``None`` turns the check off.
    min_size
        Masks smaller than this many pixels are dropped; default 15. ``<= 0`` keeps all.
    max_size_fraction
        Masks larger than this fraction of the image are dropped; default 0.4.
    interp
        Bilinear interpolation of the flows during the dynamics (default); ``False``
        steps with the flow of the pixel a position lies in, as Cellpose's size model does.
    sparse
        After following the flows, work on the foreground pixels' list
        (:func:`masks_from_end_points`, the default); ``False``: the whole-image steps
        (:func:`cluster_end_points`, ...). The labels are the same.

    Returns
    -------
    ndarray
        uint32 (H, W) labels, 0 = background, objects 1..N.
    """
    flows = np.asarray(flows, dtype=np.float32)
    cellprob = np.asarray(cellprob, dtype=np.float32)
    if flows.ndim != 3 or flows.shape[0] != 2 or flows.shape[1:] != cellprob.shape:
        raise ValueError(
            f"expected flows (2, H, W) and cellprob (H, W); got {flows.shape} and {cellprob.shape}"
        )
    inside = cellprob > cellprob_threshold
    if not inside.any():
        return np.zeros(cellprob.shape, np.uint32)
    final, start = follow_flows(flows, inside, niter=niter, zero_outside=True, interp=interp)
    if sparse:
        return masks_from_end_points(final, start, flows, cellprob.shape, flow_threshold,
                                     min_size, max_size_fraction)
    labels = cluster_end_points(final, start, cellprob.shape, max_size_fraction)
    if flow_threshold is not None and flow_threshold > 0 and labels.max() > 0:
        errors = flow_errors(labels, flows)
        bad = np.nonzero(errors > flow_threshold)[0] + 1
        if bad.size:
            labels[np.isin(labels, bad)] = 0
    labels = fill_holes_and_remove_small(labels, min_size=min_size)
    return labels.astype(np.uint32)


def warm_up() -> None:
    """Run :func:`flows_to_masks` on a small synthetic field (two objects, 40 x 40), with and
    without interpolation (the size model's pass), so that numba's compiled code (from its
    on-disk cache) and its lowering registries are loaded. The segmenter calls it in a
    background thread while the network runs, off the first image's critical path.
    """
    labels = np.zeros((40, 40), np.int32)
    labels[4:16, 4:16] = 1
    labels[20:36, 18:34] = 2
    flows = np.asarray(masks_to_flows(labels), np.float32)
    cellprob = np.where(labels > 0, 4.0, -4.0).astype(np.float32)
    for interp in (True, False):  # the argument types the segmenter passes
        flows_to_masks(flows, cellprob, niter=200, cellprob_threshold=0.0, flow_threshold=0.4,
                       min_size=15, max_size_fraction=0.4, interp=interp)
