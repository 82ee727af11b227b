"""Network output for any window of an image, the same wherever the window falls
(``tile="grid"``).

Cellpose's tiling (:mod:`cellplug.tiling`) spreads its tiles evenly over the image it is
given, so the tiles, and with them the network output at a pixel, move when the image is
cropped differently: two whole-image runs whose crops differ by half a tile agree on only
~97 % of the objects (AP@0.5, ``benchmarks/scale.py seams``). Block-wise segmentation would
inherit that as seams.

Here every step is a function of *global* coordinates only:

1. **Rescale.** The image of ``shape`` is conceptually resized to ``rescaled_shape(shape,
   rescale)``; a window of it is computed directly from the source pixels it needs, with the
   same bilinear samples (half-pixel centres) a resize of the whole image takes.
2. **Tiles.** ``bsize`` tiles start at ``-PAD + k * stride`` in the rescaled image (stride
   ``bsize / (1 + 2 * overlap)``, the spacing of Cellpose's tiles; zeros outside the image).
   A window runs the tiles that meet it, and blends them with Cellpose's taper: every pixel
   of the window gets exactly the tiles, and so the values, a whole-image run gives it.
3. **Back to the image's size.** The window's output is resampled to the original pixels
   with the same bilinear samples as a whole-image resample.

A block-wise run (:mod:`cellplug.blockwise`) therefore computes, inside its blocks, the
network output of a whole-image ``tile="grid"`` run, up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from . import tiling
from .errors import CellplugError
from .transforms import rescaled_shape

PAD = 8  # the grid starts this far before the image, as Cellpose's padding does
Reader = Callable[[slice, slice], np.ndarray]
"""``read(ys, xs)`` -> float32 (C, len(ys), len(xs)): normalised network input pixels."""


def linear_samples(n_src: int, n_dst: int, start: int,
                   stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear samples of destination pixels ``start..stop-1`` on an axis resized from
    ``n_src`` to ``n_dst`` pixels (half-pixel centres, the source coordinate clamped at 0,
    as :func:`cellplug.transforms.resize` and OpenCV's ``INTER_LINEAR``): lower and upper
    source index (int64) and the upper one's weight (float32), each of length
    ``stop - start``."""
    d = np.arange(start, stop, dtype=np.float64)
    s = np.maximum((d + 0.5) * (n_src / n_dst) - 0.5, 0.0)
    i0 = np.minimum(np.floor(s).astype(np.int64), n_src - 1)
    i1 = np.minimum(i0 + 1, n_src - 1)
    return i0, i1, (s - i0).astype(np.float32)


def resize_window(read: Reader, src_shape: tuple[int, int], dst_shape: tuple[int, int],
                  ys: tuple[int, int], xs: tuple[int, int]) -> np.ndarray:
    """Rows ``ys`` and columns ``xs`` (start, stop) of the image ``read`` gives (of
    ``src_shape``) resized to ``dst_shape``: float32 (C, ys[1] - ys[0], xs[1] - xs[0]).
    Only the source pixels those samples use are read."""
    if tuple(src_shape) == tuple(dst_shape):
        return np.asarray(read(slice(*ys), slice(*xs)), np.float32)
    y0, y1, wy = linear_samples(src_shape[0], dst_shape[0], *ys)
    x0, x1, wx = linear_samples(src_shape[1], dst_shape[1], *xs)
    ry, rx = int(y0.min()), int(x0.min())
    src = np.asarray(read(slice(ry, int(y1.max()) + 1), slice(rx, int(x1.max()) + 1)),
                     np.float32)
    rows = src[:, y0 - ry] * (1 - wy)[:, None] + src[:, y1 - ry] * wy[:, None]
    return (rows[:, :, x0 - rx] * (1 - wx) + rows[:, :, x1 - rx] * wx).astype(np.float32)


def grid_stride(bsize: int = 224, overlap: float = 0.1) -> int:
    """Spacing of the grid's tiles: Cellpose's spacing for a large image (``bsize / (1 + 2 x
    overlap)``, overlap clipped to 0.05..0.5), a multiple of nothing in particular."""
    overlap = min(0.5, max(0.05, overlap))
    return max(1, int(bsize / (1 + 2 * overlap)))


def grid_starts(lo: int, hi: int, bsize: int, stride: int) -> np.ndarray:
    """Starts (int64, increasing) of the grid's tiles ``[-PAD + k * stride, ... + bsize)``
    that meet ``[lo, hi)``."""
    kmin = -((PAD + lo - bsize + 1) // -stride) if lo - bsize + 1 + PAD > 0 else 0
    kmax = (hi - 1 + PAD) // stride
    return -PAD + stride * np.arange(kmin, kmax + 1, dtype=np.int64)


def network_window(
    net: object,
    read: Reader,
    shape: tuple[int, int],
    rescale: float,
    box: tuple[int, int, int, int],
    *,
    bsize: int = 224,
    tile_overlap: float = 0.1,
    batch_size: int = 8,
    precision: str = "fp32",
    resample: bool = True,
) -> tuple[np.ndarray, np.ndarray, int]:
    """The grid-tiled network output over ``box`` (y0, y1, x0, x1) of an image of ``shape``
    (Y, X) whose normalised pixels ``read`` gives, at scale ``rescale``.

    Returns raw float32 (K, y1 - y0, x1 - x0) at the image's size (``resample``), or, with
    ``resample=False``, over the whole rescaled image (``box`` must then be the whole image);
    the style float32 (S,) of the tiles run (L2-normalised sum); the number of tiles.
    """
    from .inference import forward_batches, pooled_style, resolve_precision

    y0, y1, x0, x1 = (int(v) for v in box)
    dst = rescaled_shape(shape, rescale)
    if resample:
        sy0, sy1, _ = linear_samples(dst[0], shape[0], y0, y1)
        sx0, sx1, _ = linear_samples(dst[1], shape[1], x0, x1)
        wy = (int(sy0.min()), int(sy1.max()) + 1)
        wx = (int(sx0.min()), int(sx1.max()) + 1)
    else:
        if (y0, y1, x0, x1) != (0, shape[0], 0, shape[1]):
            raise CellplugError("resample=False needs the whole image as the box")
        wy, wx = (0, dst[0]), (0, dst[1])
    stride = grid_stride(bsize, tile_overlap)
    ty, tx = grid_starts(*wy, bsize, stride), grid_starts(*wx, bsize, stride)
    cy0, cx0 = int(ty[0]), int(tx[0])
    cy1, cx1 = int(ty[-1]) + bsize, int(tx[-1]) + bsize
    # the rescaled image's pixels under the tiles (zeros beyond the image, as padding)
    iy = (max(cy0, 0), min(cy1, dst[0]))
    ix = (max(cx0, 0), min(cx1, dst[1]))
    inside = resize_window(read, shape, dst, iy, ix)
    canvas = np.zeros((inside.shape[0], cy1 - cy0, cx1 - cx0), np.float32)
    canvas[:, iy[0] - cy0 : iy[1] - cy0, ix[0] - cx0 : ix[1] - cx0] = inside
    del inside
    starts = [(int(a) - cy0, int(b) - cx0) for a in ty for b in tx]
    tiles = np.stack([canvas[:, a : a + bsize, b : b + bsize] for a, b in starts])
    del canvas
    raw, styles = forward_batches(net, tiles, batch_size=batch_size,
                                  precision=resolve_precision(precision, net))
    del tiles
    grid = tiling.TileGrid(cy1 - cy0, cx1 - cx0, bsize, bsize,
                           tuple(int(a) - cy0 for a in ty), tuple(int(b) - cx0 for b in tx))
    blended = tiling.blend_tiles(raw, grid)
    del raw
    win = blended[:, wy[0] - cy0 : wy[1] - cy0, wx[0] - cx0 : wx[1] - cx0]
    if resample:
        win = resize_window(
            lambda a, b: win[:, a.start - wy[0] : a.stop - wy[0], b.start - wx[0] : b.stop - wx[0]],
            dst, shape, (y0, y1), (x0, x1),
        )
    return np.ascontiguousarray(win, np.float32), pooled_style(styles), len(starts)
