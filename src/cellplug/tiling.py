"""Tiles: padding, cutting an image into overlapping tiles, blending tile outputs back.

The layout follows Cellpose 3 (``core.run_net`` / ``transforms.make_tiles``) so the same
weights see the same pixels: images are padded to a multiple of 16 plus 8 pixels each side,
tiles are ``bsize`` square (224 by default) with at least ``overlap`` (10 %) overlap, and
tile outputs are blended with a sigmoid taper.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAD_DIV = 16


def pad_amounts(ly: int, lx: int, div: int = PAD_DIV, extra: int = 1) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) padding to a multiple of ``div`` plus ``extra * div / 2``
    on each side."""
    out = []
    for size in (ly, lx):
        lpad = int(div * np.ceil(size / div) - size)
        out += [extra * div // 2 + lpad // 2, extra * div // 2 + lpad - lpad // 2]
    return out[0], out[1], out[2], out[3]


def pad_image(image: np.ndarray, div: int = PAD_DIV) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Zero-pad (C, Y, X) as :func:`pad_amounts`; also return the slices of the original."""
    t, b, lft, r = pad_amounts(image.shape[-2], image.shape[-1], div)
    padded = np.pad(image, ((0, 0), (t, b), (lft, r)))
    return padded, (slice(t, t + image.shape[-2]), slice(lft, lft + image.shape[-1]))


@dataclass(frozen=True)
class TileGrid:
    """Where tiles sit in a (padded) image of size ``ly`` x ``lx``."""

    ly: int
    lx: int
    tile_y: int
    tile_x: int
    ystarts: tuple[int, ...]
    xstarts: tuple[int, ...]
    flipped: bool = False  # test-time augmentation: neighbouring tiles are mirrored

    @property
    def n_tiles(self) -> int:
        return len(self.ystarts) * len(self.xstarts)

    def positions(self) -> list[tuple[int, int, int, int]]:
        """(j, i, y0, x0) for each tile in row-major order."""
        return [
            (j, i, y0, x0)
            for j, y0 in enumerate(self.ystarts)
            for i, x0 in enumerate(self.xstarts)
        ]


def tile_grid(
    ly: int, lx: int, bsize: int = 224, overlap: float = 0.1, augment: bool = False
) -> TileGrid:
    """Tile layout for an image of ``ly`` x ``lx`` pixels.

    Without augmentation the number of tiles per axis is ``ceil((1 + 2 * overlap) * L /
    bsize)`` (1 if the image fits), evenly spread; tiles are ``min(bsize, L)`` wide. With
    augmentation tiles overlap by half and the image is zero-padded up to ``bsize``.
    """
    if augment:
        ly, lx = max(ly, bsize), max(lx, bsize)
        ny = max(2, int(np.ceil(2.0 * ly / bsize)))
        nx = max(2, int(np.ceil(2.0 * lx / bsize)))
        ty, tx = bsize, bsize
    else:
        overlap = min(0.5, max(0.05, overlap))
        ty, tx = min(bsize, ly), min(bsize, lx)
        ny = 1 if ly <= bsize else int(np.ceil((1.0 + 2 * overlap) * ly / bsize))
        nx = 1 if lx <= bsize else int(np.ceil((1.0 + 2 * overlap) * lx / bsize))
    ys = tuple(int(v) for v in np.linspace(0, ly - ty, ny).astype(int))
    xs = tuple(int(v) for v in np.linspace(0, lx - tx, nx).astype(int))
    return TileGrid(ly, lx, ty, tx, ys, xs, augment)


def _flip_axes(j: int, i: int) -> tuple[int, ...]:
    """Axes mirrored for tile (row j, column i) under augmentation: none, Y, X or both."""
    axes = []
    if j % 2 == 1 and i % 2 == 0:
        axes = [-1]
    elif j % 2 == 0 and i % 2 == 1:
        axes = [-2]
    elif j % 2 == 1 and i % 2 == 1:
        axes = [-2, -1]
    return tuple(axes)


def cut_tiles(image: np.ndarray, grid: TileGrid) -> np.ndarray:
    """Cut (C, Y, X) into float32 (n_tiles, C, tile_y, tile_x) following ``grid``."""
    c = image.shape[0]
    if grid.flipped and (image.shape[1] < grid.ly or image.shape[2] < grid.lx):
        pad_y, pad_x = grid.ly - image.shape[1], grid.lx - image.shape[2]
        image = np.pad(image, ((0, 0), (0, pad_y), (0, pad_x)))
    tiles = np.empty((grid.n_tiles, c, grid.tile_y, grid.tile_x), np.float32)
    for k, (j, i, y0, x0) in enumerate(grid.positions()):
        tile = image[:, y0 : y0 + grid.tile_y, x0 : x0 + grid.tile_x]
        if grid.flipped:
            axes = _flip_axes(j, i)
            if axes:
                tile = np.flip(tile, axis=axes)
        tiles[k] = tile
    return tiles


def unflip_outputs(
    outputs: np.ndarray, grid: TileGrid, vector_channels: tuple[int, int] = (0, 1)
) -> np.ndarray:
    """Undo the mirroring of augmented tiles in network outputs (n_tiles, K, ty, tx).

    Mirroring along Y flips the sign of the Y flow channel, along X of the X flow channel.
    """
    if not grid.flipped:
        return outputs
    out = outputs.copy()
    cy, cx = vector_channels
    for k, (j, i, _, _) in enumerate(grid.positions()):
        axes = _flip_axes(j, i)
        if not axes:
            continue
        out[k] = np.flip(outputs[k], axis=axes)
        if -2 in axes:
            out[k, cy] *= -1
        if -1 in axes:
            out[k, cx] *= -1
    return out


def taper_mask(ly: int = 224, lx: int = 224, sig: float = 7.5) -> np.ndarray:
    """Blending weights (ly, lx): ~1 in the middle, falling off ~20 px from the tile edge."""
    bsize = max(224, ly, lx)
    xm = np.arange(bsize)
    xm = np.abs(xm - xm.mean())
    mask1 = 1 / (1 + np.exp((xm - (bsize / 2 - 20)) / sig))
    mask = mask1 * mask1[:, None]
    return mask[
        bsize // 2 - ly // 2 : bsize // 2 + ly // 2 + ly % 2,
        bsize // 2 - lx // 2 : bsize // 2 + lx // 2 + lx % 2,
    ]


def blend_tiles(outputs: np.ndarray, grid: TileGrid) -> np.ndarray:
    """Blend tile outputs (n_tiles, K, ty, tx) into float32 (K, ly, lx) with taper weights."""
    k = outputs.shape[1]
    acc = np.zeros((k, grid.ly, grid.lx), np.float32)
    weight = np.zeros((grid.ly, grid.lx), np.float64)
    mask = taper_mask(grid.tile_y, grid.tile_x)
    for n, (_, _, y0, x0) in enumerate(grid.positions()):
        acc[:, y0 : y0 + grid.tile_y, x0 : x0 + grid.tile_x] += outputs[n] * mask
        weight[y0 : y0 + grid.tile_y, x0 : x0 + grid.tile_x] += mask
    acc /= weight
    return acc
