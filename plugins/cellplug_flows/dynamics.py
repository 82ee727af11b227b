"""Following a flow field: Euler integration with bilinear interpolation (numba)."""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True, fastmath=False)
def _follow(flows, ys, xs, niter, out):
    ly = flows.shape[1]
    lx = flows.shape[2]
    ymax = np.float32(ly - 1)
    xmax = np.float32(lx - 1)
    zero = np.float32(0.0)
    one = np.float32(1.0)
    for n in prange(ys.shape[0]):
        y = np.float32(ys[n])
        x = np.float32(xs[n])
        for _ in range(niter):
            yf = int(y)
            xf = int(x)
            yf1 = min(ly - 1, yf + 1)
            xf1 = min(lx - 1, xf + 1)
            wy = y - np.float32(yf)
            wx = x - np.float32(xf)
            a = (one - wy) * (one - wx)
            b = (one - wy) * wx
            c = wy * (one - wx)
            d = wy * wx
            dy = (
                flows[0, yf, xf] * a
                + flows[0, yf, xf1] * b
                + flows[0, yf1, xf] * c
                + flows[0, yf1, xf1] * d
            )
            dx = (
                flows[1, yf, xf] * a
                + flows[1, yf, xf1] * b
                + flows[1, yf1, xf] * c
                + flows[1, yf1, xf1] * d
            )
            if dy == zero and dx == zero:
                break  # a fixed point: every further step is zero too
            y = min(ymax, max(zero, y + dy))
            x = min(xmax, max(zero, x + dx))
        out[0, n] = y
        out[1, n] = x


def follow_flows(
    flows: np.ndarray, inside: np.ndarray, niter: int = 200
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Move every pixel of ``inside`` along ``flows`` for ``niter`` Euler steps.

    Parameters
    ----------
    flows
        float32 (2, H, W) step field (Y then X), in pixels per step. Positions are clamped
        to the image; the field is sampled with bilinear interpolation.
    inside
        bool (H, W): the pixels to move (those above the cell-probability threshold).
    niter
        Number of steps.

    Returns
    -------
    final : ndarray
        float32 (2, N) final (y, x) positions, N = ``inside.sum()``, in row-major order.
    start : tuple of ndarray
        The (y, x) integer coordinates the pixels started from (``np.nonzero(inside)``).
    """
    flows = np.ascontiguousarray(flows, dtype=np.float32)
    if flows.ndim != 3 or flows.shape[0] != 2:
        raise ValueError(f"flows must be (2, H, W), got shape {flows.shape}")
    if inside.shape != flows.shape[1:]:
        raise ValueError(f"inside {inside.shape} does not match flows {flows.shape[1:]}")
    start = np.nonzero(inside)
    out = np.empty((2, start[0].size), np.float32)
    if start[0].size:
        _follow(flows, start[0].astype(np.int32), start[1].astype(np.int32), int(niter), out)
    return out, start
