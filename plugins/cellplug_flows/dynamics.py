"""Following a flow field: Euler integration with bilinear interpolation (numba).

Two exact shortcuts make it fast without changing a single output bit (the tests compare
against a plain step-by-step loop):

* **Cycle detection.** A step is a deterministic function of the float32 position, so once a
  position repeats, the rest of the trajectory is periodic and its position after ``niter``
  steps is known. Near an object's centre, positions settle on a fixed point or a 2-cycle,
  typically after a few dozen of the default 200 steps; a trajectory stops as soon as its new
  position equals the one two steps back (a fixed point is caught one step after it is
  reached, as a 2-cycle of two equal positions).
* **Interleaved trajectories.** One step depends on the previous one (float -> int -> load ->
  multiply-add -> clamp), so a lone trajectory is bound by latency. Each thread advances
  four trajectories in turn, held in registers, so the CPU overlaps their independent
  chains; a finished trajectory's lane is refilled with the next pixel at once.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

LANES = 4  # trajectories interleaved per thread (the hot loop below is written out for 4)
_IDLE = -(1 << 40)  # step count of an idle lane: never reaches niter


@njit(cache=True, nogil=True, inline="always")
def _step(fl, y, x, ly, lx, interp):
    """One Euler step from (y, x), clamped to the image.

    ``fl`` is the field flattened from (H + 1, W + 1, 2): both components of a pixel side by
    side, plus a row and a column of zeros, so the far neighbours of the last row and column
    need no clamping (their weight is exactly 0 there, as positions are clamped to H - 1 and
    W - 1). Unsigned indices spare numba's negative-index wraparound code. Without
    ``interp`` the step is the field at the pixel the position lies in (Cellpose's
    ``steps2D``, used by its size model).
    """
    zero = np.float32(0.0)
    one = np.float32(1.0)
    yf = np.uint64(int(y))
    xf = np.uint64(int(x))
    if not interp:
        p = (yf * np.uint64(lx + 1) + xf) * np.uint64(2)
        ny = min(np.float32(ly - 1), max(zero, y + fl[p]))
        nx = min(np.float32(lx - 1), max(zero, x + fl[p + np.uint64(1)]))
        return ny, nx
    oy = np.uint64(2 * (lx + 1))  # next row
    ox = np.uint64(2)  # next column
    wy = y - np.floor(y)  # == y - float(int(y)) for y >= 0, and cheaper
    wx = x - np.floor(x)
    a = (one - wy) * (one - wx)
    b = (one - wy) * wx
    c = wy * (one - wx)
    d = wy * wx
    p = (yf * np.uint64(lx + 1) + xf) * np.uint64(2)
    dy = fl[p] * a + fl[p + ox] * b + fl[p + oy] * c + fl[p + oy + ox] * d
    p1 = p + np.uint64(1)
    dx = fl[p1] * a + fl[p1 + ox] * b + fl[p1 + oy] * c + fl[p1 + oy + ox] * d
    ny = min(np.float32(ly - 1), max(zero, y + dy))
    nx = min(np.float32(lx - 1), max(zero, x + dx))
    return ny, nx


@njit(cache=True, nogil=True, inline="always")
def _done(ny, nx, py, px, t, niter):
    """0: go on; 1: finished at the new position; 2: finished at the current position.

    ``(ny, nx)`` is the position after ``t`` steps, ``(py, px)`` the one after ``t - 2``.
    If they are equal the trajectory alternates between the new and the current position
    from now on, and the parity of the remaining steps picks the final one.
    """
    if ny == py and nx == px:
        return 1 if (niter - t) % 2 == 0 else 2
    if t >= niter:
        return 1
    return 0


@njit(cache=True, nogil=True)
def _follow_range(fl3, ys, xs, lo, hi, niter, interp, out):
    """Follow pixels ``lo..hi-1`` of (ys, xs) for ``niter`` steps; write end points to out.

    Lanes live in registers in the hot loop; the rare bookkeeping (a lane finished) goes
    through the small arrays ``st`` (y, x, previous y, previous x), ``tt`` (steps done) and
    ``pix`` (pixel followed, -1 when idle). Idle lanes keep stepping from (0, 0), harmlessly.
    """
    ly = fl3.shape[0] - 1  # fl3 is padded by one row and column
    lx = fl3.shape[1] - 1
    fl = fl3.reshape(-1)
    nan = np.float32(np.nan)  # "no previous position": compares unequal to everything
    pix = np.full(LANES, -1, np.int64)
    st = np.zeros((LANES, 4), np.float32)
    tt = np.full(LANES, _IDLE, np.int64)
    nxt = lo
    for k in range(LANES):
        st[k, 2] = nan
        st[k, 3] = nan
        if nxt < hi:
            pix[k] = nxt
            st[k, 0] = ys[nxt]
            st[k, 1] = xs[nxt]
            tt[k] = 0
            nxt += 1
    active = 0
    for k in range(LANES):
        active += pix[k] >= 0
    y0, x0, py0, px0, t0 = st[0, 0], st[0, 1], st[0, 2], st[0, 3], tt[0]
    y1, x1, py1, px1, t1 = st[1, 0], st[1, 1], st[1, 2], st[1, 3], tt[1]
    y2, x2, py2, px2, t2 = st[2, 0], st[2, 1], st[2, 2], st[2, 3], tt[2]
    y3, x3, py3, px3, t3 = st[3, 0], st[3, 1], st[3, 2], st[3, 3], tt[3]
    while active > 0:
        ny0, nx0 = _step(fl, y0, x0, ly, lx, interp)
        ny1, nx1 = _step(fl, y1, x1, ly, lx, interp)
        ny2, nx2 = _step(fl, y2, x2, ly, lx, interp)
        ny3, nx3 = _step(fl, y3, x3, ly, lx, interp)
        t0 += 1
        t1 += 1
        t2 += 1
        t3 += 1
        c0 = _done(ny0, nx0, py0, px0, t0, niter)
        c1 = _done(ny1, nx1, py1, px1, t1, niter)
        c2 = _done(ny2, nx2, py2, px2, t2, niter)
        c3 = _done(ny3, nx3, py3, px3, t3, niter)
        py0, px0, y0, x0 = y0, x0, ny0, nx0
        py1, px1, y1, x1 = y1, x1, ny1, nx1
        py2, px2, y2, x2 = y2, x2, ny2, nx2
        py3, px3, y3, x3 = y3, x3, ny3, nx3
        if c0 | c1 | c2 | c3:
            codes = (c0, c1, c2, c3)
            st[0, 0], st[0, 1], st[0, 2], st[0, 3], tt[0] = y0, x0, py0, px0, t0
            st[1, 0], st[1, 1], st[1, 2], st[1, 3], tt[1] = y1, x1, py1, px1, t1
            st[2, 0], st[2, 1], st[2, 2], st[2, 3], tt[2] = y2, x2, py2, px2, t2
            st[3, 0], st[3, 1], st[3, 2], st[3, 3], tt[3] = y3, x3, py3, px3, t3
            for k in range(LANES):
                c = codes[k]
                if c == 0:
                    continue
                n = pix[k]
                if n >= 0:
                    # st[k] already holds (new, current): code 1 -> new, 2 -> current
                    out[0, n] = st[k, 0] if c == 1 else st[k, 2]
                    out[1, n] = st[k, 1] if c == 1 else st[k, 3]
                    if nxt < hi:
                        pix[k] = nxt
                        st[k, 0] = ys[nxt]
                        st[k, 1] = xs[nxt]
                        st[k, 2] = nan
                        st[k, 3] = nan
                        tt[k] = 0
                        nxt += 1
                        continue
                    pix[k] = -1
                    active -= 1
                tt[k] = _IDLE  # an idle lane that fell into a cycle: keep it idle
            y0, x0, py0, px0, t0 = st[0, 0], st[0, 1], st[0, 2], st[0, 3], tt[0]
            y1, x1, py1, px1, t1 = st[1, 0], st[1, 1], st[1, 2], st[1, 3], tt[1]
            y2, x2, py2, px2, t2 = st[2, 0], st[2, 1], st[2, 2], st[2, 3], tt[2]
            y3, x3, py3, px3, t3 = st[3, 0], st[3, 1], st[3, 2], st[3, 3], tt[3]


@njit(cache=True, parallel=True)
def _follow(fl, ys, xs, niter, interp, out, nchunks):
    n = ys.shape[0]
    for c in prange(nchunks):
        lo = c * n // nchunks
        hi = (c + 1) * n // nchunks
        _follow_range(fl, ys, xs, lo, hi, niter, interp, out)


@njit(cache=True, nogil=True)
def _interleave(flows, inside, zero_outside):
    """(2, H, W) -> (H + 1, W + 1, 2) float32 with a zero last row and column; non-finite
    values (and, optionally, those outside ``inside``) -> 0."""
    ly, lx = inside.shape
    fl = np.zeros((ly + 1, lx + 1, 2), np.float32)
    zero = np.float32(0.0)
    for i in range(ly):
        for j in range(lx):
            fy = np.float32(flows[0, i, j])
            fx = np.float32(flows[1, i, j])
            if (zero_outside and not inside[i, j]) or not (np.isfinite(fy) and np.isfinite(fx)):
                fy = zero
                fx = zero
            fl[i, j, 0] = fy
            fl[i, j, 1] = fx
    return fl


@njit(cache=True, nogil=True)
def _coords(inside):
    """Row-major (y, x) int32 coordinates of the True pixels (np.nonzero, in 4-byte ints)."""
    n = 0
    for i in range(inside.shape[0]):
        for j in range(inside.shape[1]):
            n += inside[i, j]
    ys = np.empty(n, np.int32)
    xs = np.empty(n, np.int32)
    k = 0
    for i in range(inside.shape[0]):
        for j in range(inside.shape[1]):
            if inside[i, j]:
                ys[k] = i
                xs[k] = j
                k += 1
    return ys, xs


def follow_flows(
    flows: np.ndarray,
    inside: np.ndarray,
    niter: int = 200,
    *,
    zero_outside: bool = False,
    interp: bool = True,
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Move every pixel of ``inside`` along ``flows`` for ``niter`` Euler steps.

    Each step samples the field at the current position with bilinear interpolation
    (float32 arithmetic), adds it to the position and clamps the result to the image.

    Parameters
    ----------
    flows
        float32 (2, H, W) step field (Y then X), in pixels per step. A pixel with a
        non-finite component is treated as 0.
    inside
        bool (H, W): the pixels to move (those above the cell-probability threshold).
    niter
        Number of steps (>= 0); default 200.
    zero_outside
        Treat the flows outside ``inside`` as 0 (Cellpose follows ``flows * inside``);
        default False.
    interp
        Bilinear interpolation (default). ``False`` takes the field at the pixel the
        position lies in, ``flows[:, int(y), int(x)]``, as Cellpose's ``interp=False``
        dynamics do (its size model segments that way).

    Returns
    -------
    final : ndarray
        float32 (2, N) final (y, x) positions, N = ``inside.sum()``, in row-major order.
    start : tuple of ndarray
        int32 (N,) y and x coordinates the pixels started from (``np.nonzero(inside)``).
    """
    flows = np.asarray(flows)
    inside = np.asarray(inside, dtype=bool)
    if flows.ndim != 3 or flows.shape[0] != 2:
        raise ValueError(f"flows must be (2, H, W), got shape {flows.shape}")
    if inside.shape != flows.shape[1:]:
        raise ValueError(f"inside {inside.shape} does not match flows {flows.shape[1:]}")
    niter = int(niter)
    if niter < 0:
        raise ValueError(f"niter must be >= 0, got {niter}")
    start = _coords(inside)
    npix = start[0].size
    out = np.empty((2, npix), np.float32)
    if npix == 0:
        return out, start
    if niter == 0:
        out[0] = start[0]
        out[1] = start[1]
        return out, start
    # (H + 1, W + 1, 2): both components of a pixel share a cache line. Non-finite values
    # become 0: NaN would make the integer positions undefined.
    fl = _interleave(flows, inside, bool(zero_outside))
    # contiguous chunks keep a thread on nearby objects; many small chunks handed out
    # dynamically balance the load when other processes take CPU time from some threads
    nchunks = max(1, min(npix // 1024, 64 * numba.get_num_threads()))
    with numba.parallel_chunksize(1):
        _follow(fl, start[0], start[1], niter, bool(interp), out, nchunks)
    return out, start
