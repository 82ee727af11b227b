"""Masks -> flows: the Cellpose (2021) flow representation, computed with numba.

For each object, "heat" is released at its centre pixel and diffuses inside the object
(Jacobi iterations of a 3x3 mean, zero outside the object) for ``2 * (h + 2 + w + 2)``
iterations, ``h`` and ``w`` being the object's bounding-box size; the flow is the spatial
gradient of the resulting field, normalised to unit length. The centre is the object pixel
nearest to the mean of the object's coordinates (what Cellpose 3.1.1.2 computes).

Objects are independent, so they are spread over threads (largest first, one at a time);
each is computed on a dense copy of its own bounding box (one pixel of padding), which
vectorises well.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange


def relabel_sequential(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Map the distinct positive values of ``labels`` to 1..N (order kept).

    Returns ``(relabelled int32 array, N)``. Uses a lookup table when the largest label is
    small enough, otherwise ``np.unique``.
    """
    labels = np.asarray(labels)
    if labels.size == 0:
        return labels.astype(np.int32), 0
    if labels.min() < 0:
        raise ValueError("labels must be non-negative")
    lmax = int(labels.max())
    if lmax == 0:
        return np.zeros(labels.shape, np.int32), 0
    if lmax <= max(4 * labels.size, 1 << 16):
        present = np.zeros(lmax + 1, bool)
        present[labels.ravel()] = True
        present[0] = False
        lut = np.zeros(lmax + 1, np.int32)
        n = int(present.sum())
        lut[present] = np.arange(1, n + 1, dtype=np.int32)
        return lut[labels], n
    uniq, inv = np.unique(labels, return_inverse=True)
    offset = 1 if uniq[0] == 0 else 0
    out = (inv.reshape(labels.shape) + (1 - offset)).astype(np.int32)
    if offset:
        out[labels == 0] = 0
    return out, len(uniq) - offset


@njit(cache=True, nogil=True)
def _boxes(lab: np.ndarray, n: int) -> np.ndarray:
    """Bounding boxes [y0, y1, x0, x1) (exclusive stops) of labels 1..n; row k = label k+1."""
    box = np.empty((n, 4), np.int64)
    box[:, 0] = lab.shape[0]
    box[:, 1] = -1
    box[:, 2] = lab.shape[1]
    box[:, 3] = -1
    for i in range(lab.shape[0]):
        for j in range(lab.shape[1]):
            v = lab[i, j]
            if v > 0:
                b = box[v - 1]
                if i < b[0]:
                    b[0] = i
                if i > b[1]:
                    b[1] = i
                if j < b[2]:
                    b[2] = j
                if j > b[3]:
                    b[3] = j
    box[:, 1] += 1
    box[:, 3] += 1
    return box


@njit(cache=True, nogil=True)
def _one_object(lab, k, y0, y1, x0, x1, niter_override, out, centers):
    """Diffuse heat in object ``k`` (label value) and write its unit flows into ``out``."""
    ly = y1 - y0 + 2
    lx = x1 - x0 + 2
    mask = np.zeros((ly, lx), np.bool_)
    sy = 0.0
    sx = 0.0
    cnt = 0
    for i in range(y0, y1):
        for j in range(x0, x1):
            if lab[i, j] == k:
                mask[i - y0 + 1, j - x0 + 1] = True
                sy += i - y0 + 1
                sx += j - x0 + 1
                cnt += 1
    my = sy / cnt
    mx = sx / cnt
    # centre: the object pixel closest to the mean (first in row-major order on ties)
    best = np.inf
    cy = 0
    cx = 0
    for i in range(1, ly - 1):
        for j in range(1, lx - 1):
            if mask[i, j]:
                d = (i - my) ** 2 + (j - mx) ** 2
                if d < best:
                    best = d
                    cy = i
                    cx = j
    centers[k - 1, 0] = cy - 1 + y0
    centers[k - 1, 1] = cx - 1 + x0
    niter = 2 * (ly + lx) if niter_override <= 0 else niter_override
    T = np.zeros((ly, lx), np.float64)
    H = np.zeros((ly, lx), np.float64)
    fm = mask.astype(np.float64)
    for _ in range(niter):
        T[cy, cx] += 1.0
        # separable 3x3 sum: rows first, then columns (Jacobi: reads old T only)
        for i in range(ly):
            for j in range(1, lx - 1):
                H[i, j] = T[i, j - 1] + T[i, j] + T[i, j + 1]
        for i in range(1, ly - 1):
            for j in range(1, lx - 1):
                T[i, j] = (H[i - 1, j] + H[i, j] + H[i + 1, j]) * (1.0 / 9.0) * fm[i, j]
    for i in range(1, ly - 1):
        for j in range(1, lx - 1):
            if mask[i, j]:
                dy = T[i + 1, j] - T[i - 1, j]
                dx = T[i, j + 1] - T[i, j - 1]
                norm = np.sqrt(dy * dy + dx * dx) + 1e-60
                out[0, i - 1 + y0, j - 1 + x0] = dy / norm
                out[1, i - 1 + y0, j - 1 + x0] = dx / norm


@njit(cache=True, parallel=True)
def _all_objects(lab, boxes, order, niter_override, out, centers):
    # largest objects first, handed out one at a time (the caller sets a parallel chunk
    # size of 1), so threads finish together even when other processes slow some down
    for m in prange(order.shape[0]):
        k = order[m]
        b = boxes[k]
        if b[1] > b[0]:
            _one_object(lab, k + 1, b[0], b[1], b[2], b[3], niter_override, out, centers)


def masks_to_flows(
    labels: np.ndarray, niter: int | None = None, return_centers: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Flow field of a label image (the Cellpose training target).

    Parameters
    ----------
    labels
        (H, W) integer label image, 0 = background. Ids need not be contiguous.
    niter
        Diffusion iterations per object; default ``2 * (h + w + 4)`` from the object's
        bounding box ``h`` x ``w`` (as Cellpose).
    return_centers
        Also return the diffusion source of every object.

    Returns
    -------
    flows : ndarray
        float32 (2, H, W): Y then X components, unit length inside objects (zero where the
        heat field is flat, e.g. one-pixel objects), zero outside objects.
    centers : ndarray, optional
        int64 (N, 2) (y, x) centre pixel per object, in order of sequential relabelling
        (increasing original id).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D (H, W), got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    lab, n = relabel_sequential(labels)
    out = np.zeros((2, *labels.shape), np.float32)
    centers = np.zeros((n, 2), np.int64)
    if n > 0:
        boxes = _boxes(lab, n)
        area = (boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])
        order = np.argsort(-area, kind="stable").astype(np.int64)
        with numba.parallel_chunksize(1):
            _all_objects(lab, boxes, order, -1 if niter is None else int(niter), out, centers)
    return (out, centers) if return_centers else out
