"""Property-based tests (hypothesis) of padding, tiling and blending on random image sizes.

An "identity network" (each tile's output is the tile itself) blended back must give the
image back wherever the taper weights are normalised, i.e. everywhere: the tiles cover the
image and every taper weight is positive. With test-time augmentation the mirrored tiles are
un-mirrored; the flow channels are then sign-flipped in some tiles, so only their shape and
magnitude are checked. ``run_network`` with such a network returns the image's shape.

Examples are derandomized (the same ones on every run) so CI is deterministic.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from cellplug import tiling

SIZES = st.integers(1, 700)
BSIZES = st.one_of(st.just(224), st.integers(8, 320))
OVERLAPS = st.one_of(st.just(0.1), st.floats(0.0, 0.7))


def image(c: int, ly: int, lx: int) -> np.ndarray:
    """A (c, ly, lx) float32 image with a different value at every pixel, in [1, 2)."""
    return (1 + np.arange(c * ly * lx, dtype=np.float64).reshape(c, ly, lx) / (c * ly * lx)).astype(
        np.float32
    )


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.integers(0, 700), st.integers(0, 700), st.sampled_from([8, 16, 32]))
def test_padding_is_to_a_multiple_of_div_and_keeps_the_image(ly, lx, div):
    img = np.ones((1, ly, lx), np.float32)
    padded, (sy, sx) = tiling.pad_image(img, div)
    assert padded.shape[1] % div == 0 and padded.shape[2] % div == 0
    assert padded.shape[1] - ly >= div and padded.shape[2] - lx >= div
    np.testing.assert_array_equal(padded[:, sy, sx], img)
    assert padded.sum() == img.sum()  # zeros around


@settings(max_examples=80, deadline=None, derandomize=True)
@given(st.integers(1, 3), SIZES, SIZES, BSIZES, OVERLAPS)
@example(1, 1, 1, 224, 0.1)
@example(2, 1, 700, 224, 0.1)
@example(1, 224, 225, 224, 0.1)
@example(1, 240, 240, 224, 0.0)
@example(1, 449, 17, 16, 0.7)
def test_cut_then_blend_identity_gives_the_image_back(c, ly, lx, bsize, overlap):
    grid = tiling.tile_grid(ly, lx, bsize, overlap)
    assert (grid.ly, grid.lx) == (ly, lx)
    assert (grid.tile_y, grid.tile_x) == (min(bsize, ly), min(bsize, lx))
    for starts, size, tile in ((grid.ystarts, ly, grid.tile_y), (grid.xstarts, lx, grid.tile_x)):
        assert starts[0] == 0 and starts[-1] == size - tile  # first and last tile at the edges
        assert all(0 <= b - a <= tile for a, b in pairwise(starts))  # no gap
    img = image(c, ly, lx)
    tiles = tiling.cut_tiles(img, grid)
    assert tiles.shape == (grid.n_tiles, c, grid.tile_y, grid.tile_x)
    blended = tiling.blend_tiles(tiles, grid)
    assert blended.shape == img.shape and blended.dtype == np.float32
    np.testing.assert_allclose(blended, img, rtol=1e-5)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(3, 4), SIZES, SIZES, BSIZES)
@example(3, 1, 1, 224)
@example(3, 224, 224, 224)
@example(3, 225, 17, 224)
def test_augmented_tiles_unmirror_and_blend_back(c, ly, lx, bsize):
    grid = tiling.tile_grid(ly, lx, bsize, augment=True)
    assert grid.flipped and (grid.ly, grid.lx) == (max(ly, bsize), max(lx, bsize))
    assert len(grid.ystarts) >= 2 and len(grid.xstarts) >= 2
    img = image(c, ly, lx)
    tiles = tiling.cut_tiles(img, grid)
    assert tiles.shape == (grid.n_tiles, c, bsize, bsize)
    restored = tiling.unflip_outputs(tiles, grid, vector_channels=(0, 1))
    blended = tiling.blend_tiles(restored, grid)[:, :ly, :lx]
    assert blended.shape == img.shape
    # scalar channels: back exactly (up to rounding); flow channels: a weighted mean of +x
    # and -x, so no larger than x
    np.testing.assert_allclose(blended[2:], img[2:], rtol=1e-5)
    assert (np.abs(blended[:2]) <= img[:2] * (1 + 1e-5)).all()


def identity_net(x):
    """A stand-in backbone: raw output = input, style a unit vector (as a backbone's is)."""
    import torch

    return x * 1.0, torch.full((x.shape[0], 4), 0.5)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    st.integers(1, 3).flatmap(
        lambda c: st.tuples(st.integers(1, 250), st.integers(1, 250)).map(lambda s: image(c, *s))
    ),
    st.sampled_from([True, False]),
    st.booleans(),
    st.sampled_from([64, 224]),
)
@example(image(3, 1, 1), True, True, 224)
@example(image(1, 1, 250), True, False, 64)
@example(image(3, 250, 1), False, True, 64)
def test_run_network_returns_the_image_shape(img, tile, augment, bsize):
    from cellplug.inference import run_network

    assume(not augment or img.shape[0] >= 2)  # augmentation needs the two flow channels

    out = run_network(identity_net, img, tile=tile, augment=augment, bsize=bsize, batch_size=16)
    assert out.raw.shape == img.shape and out.raw.dtype == np.float32
    assert out.tiled == (tile or augment)
    np.testing.assert_allclose(np.linalg.norm(out.style), 1.0, rtol=1e-6)
    if not augment:
        np.testing.assert_allclose(out.raw, img, rtol=1e-5)
    elif img.shape[0] > 2:
        np.testing.assert_allclose(out.raw[2:], img[2:], rtol=1e-5)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(1, 400), st.integers(1, 400))
def test_taper_weights_are_positive_and_at_most_1(ly, lx):
    mask = tiling.taper_mask(ly, lx)
    assert mask.shape == (ly, lx)
    assert (mask > 0).all() and (mask <= 1).all()  # so blending never divides by 0
    if ly % 2 == 0 and lx % 2 == 0:  # odd sizes are cut off-centre, as in Cellpose
        np.testing.assert_allclose(mask, mask[::-1, ::-1])
