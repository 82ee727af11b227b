"""Padding, tile layout, mirroring for augmentation and taper blending."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cellplug import tiling


@pytest.mark.parametrize("size", [1, 15, 16, 17, 100, 224, 520, 696])
def test_padding_to_a_multiple_of_16_plus_8_each_side(size):
    t, b, left, r = tiling.pad_amounts(size, size + 3)
    for lo, hi, n in ((t, b, size), (left, r, size + 3)):
        total = n + lo + hi
        assert total % 16 == 0
        assert lo >= 8 and hi >= 8 and total - n < 32
        assert 0 <= hi - lo <= 1  # the odd pixel goes after the image


def test_pad_image_returns_slices_of_the_original():
    img = np.random.default_rng(0).random((2, 37, 50)).astype(np.float32)
    padded, (sy, sx) = tiling.pad_image(img)
    assert padded.shape == (2, 64, 80)
    np.testing.assert_array_equal(padded[:, sy, sx], img)
    assert padded.sum() == pytest.approx(img.sum(), rel=1e-6)  # zero padding


def test_small_image_is_one_tile():
    grid = tiling.tile_grid(176, 96)
    assert grid.n_tiles == 1 and (grid.tile_y, grid.tile_x) == (176, 96)


@pytest.mark.parametrize(("size", "n"), [(240, 2), (528, 3), (1040, 6), (2064, 12)])
def test_tile_count_and_overlap_as_cellpose(size, n):
    """ceil(1.2 * L / 224) tiles per axis, evenly spread from 0 to L - 224."""
    grid = tiling.tile_grid(size, size)
    assert len(grid.ystarts) == n and grid.n_tiles == n * n
    assert grid.ystarts[0] == 0 and grid.ystarts[-1] == size - 224
    steps = np.diff(grid.ystarts)
    assert steps.max() <= 224 * 0.9 + 1  # at least ~10 % overlap everywhere
    covered = np.zeros(size, bool)
    for y0 in grid.ystarts:
        covered[y0 : y0 + 224] = True
    assert covered.all()


def test_cut_then_blend_identity_reproduces_the_image():
    img = np.random.default_rng(1).random((3, 300, 470)).astype(np.float32)
    grid = tiling.tile_grid(300, 470)
    tiles = tiling.cut_tiles(img, grid)
    assert tiles.shape == (grid.n_tiles, 3, 224, 224)
    np.testing.assert_allclose(tiling.blend_tiles(tiles, grid), img, atol=1e-5)


def test_augmented_tiles_are_mirrored_and_restored():
    img = np.random.default_rng(2).random((3, 150, 260)).astype(np.float32)
    grid = tiling.tile_grid(150, 260, augment=True)
    assert grid.flipped and grid.ly == 224 and grid.n_tiles == 2 * 3
    tiles = tiling.cut_tiles(img, grid)
    # tile (row 0, column 1) is mirrored in Y, (1, 0) in X, (1, 1) in both
    y0, x0 = grid.ystarts[0], grid.xstarts[1]
    padded = np.pad(img, ((0, 0), (0, 74), (0, 0)))
    np.testing.assert_array_equal(tiles[1], padded[:, y0 : y0 + 224, x0 : x0 + 224][:, ::-1])
    # an identity "network": its scalar channel (2) blends back into the image
    restored = tiling.unflip_outputs(tiles, grid, vector_channels=(0, 1))
    blended = tiling.blend_tiles(restored, grid)[:, :150, :260]
    np.testing.assert_allclose(blended[2], img[2], atol=1e-5)


def test_unflipping_negates_the_mirrored_flow_components():
    grid = tiling.tile_grid(300, 300, augment=True)
    # a network that predicts flow (+1, +1) in its own (mirrored) frame everywhere
    out = np.ones((grid.n_tiles, 3, 224, 224), np.float32)
    restored = tiling.unflip_outputs(out, grid, vector_channels=(0, 1))
    for k, (j, i, _, _) in enumerate(grid.positions()):
        flipped_y = j % 2 == 0 and i % 2 == 1 or j % 2 == 1 and i % 2 == 1
        flipped_x = j % 2 == 1
        assert restored[k, 0, 0, 0] == (-1 if flipped_y else 1)
        assert restored[k, 1, 0, 0] == (-1 if flipped_x else 1)
        assert restored[k, 2, 0, 0] == 1  # the scalar channel never changes sign


def _cellpose_taper(k: float) -> float:
    """Cellpose's 1-D taper at pixel k of a 224 px tile: a sigmoid of width 7.5 px centred
    20 px inside the tile edge (the centre of the tile is at 111.5)."""
    return 1 / (1 + math.exp((abs(k - 111.5) - (112 - 20)) / 7.5))


def test_taper_mask():
    mask = tiling.taper_mask(224, 224)
    assert mask.shape == (224, 224)
    assert mask[112, 112] == pytest.approx(1.0, abs=1e-3)
    assert mask[0, 0] < 0.01 and mask[0, 112] < 0.1
    np.testing.assert_allclose(mask, mask[::-1, ::-1])
    assert tiling.taper_mask(100, 50).shape == (100, 50)
    # the exact values: corner 1 / (1 + e^2.6)^2, edge middle ~1 / (1 + e^2.6), half weight
    # 20 px in
    assert mask[0, 0] == pytest.approx(1 / (1 + math.exp(2.6)) ** 2, rel=1e-9)  # 0.00478
    assert mask[0, 112] == pytest.approx(_cellpose_taper(0) * _cellpose_taper(112), rel=1e-9)
    assert mask[20, 112] == pytest.approx(0.5167, abs=1e-4)
    ref = np.array([_cellpose_taper(k) for k in range(224)])
    np.testing.assert_allclose(mask, np.outer(ref, ref), rtol=1e-9)
    # a smaller tile is the centre of the 224 px mask
    np.testing.assert_allclose(tiling.taper_mask(100, 50), np.outer(ref[62:162], ref[87:137]),
                               rtol=1e-9)


def test_matches_cellpose_make_tiles_when_installed():
    cp = pytest.importorskip("cellpose.transforms")
    img = np.random.default_rng(3).random((2, 528, 704)).astype(np.float32)
    for augment in (False, True):
        grid = tiling.tile_grid(528, 704, augment=augment)
        IMG, ysub, xsub, _, _ = cp.make_tiles(img, augment=augment)
        ours = tiling.cut_tiles(img, grid)
        np.testing.assert_array_equal(ours, IMG.reshape(ours.shape))
        starts = [[y0, y0 + grid.tile_y] for _, _, y0, _ in grid.positions()]
        assert [list(p) for p in ysub] == starts
        np.testing.assert_array_equal(tiling.taper_mask(224, 224), cp._taper_mask(224, 224))


def test_augmented_mirroring_is_a_checkerboard_on_large_grids():
    """Cellpose's rule on a 5 x 5 grid (more rows and columns than the tests above): the
    tile in row j, column i is mirrored in Y when i is odd and in X when j is odd."""
    grid = tiling.tile_grid(500, 500, augment=True)
    assert (len(grid.ystarts), len(grid.xstarts)) == (5, 5)
    yy, xx = np.mgrid[0:500, 0:500].astype(np.float32)
    tiles = tiling.cut_tiles(np.stack([yy, xx]), grid)
    out = np.ones((grid.n_tiles, 3, 224, 224), np.float32)
    restored = tiling.unflip_outputs(out, grid, vector_channels=(0, 1))
    for k, (j, i, y0, x0) in enumerate(grid.positions()):
        y_step = tiles[k, 0, 1, 0] - tiles[k, 0, 0, 0]  # +1 upright, -1 mirrored in Y
        x_step = tiles[k, 1, 0, 1] - tiles[k, 1, 0, 0]
        assert (y_step, x_step) == (-1 if i % 2 else 1, -1 if j % 2 else 1), (j, i)
        assert tiles[k, 0].min() == y0 and tiles[k, 1].min() == x0
        assert restored[k, 0, 0, 0] == (-1 if i % 2 else 1)
        assert restored[k, 1, 0, 0] == (-1 if j % 2 else 1)


def test_an_image_of_exactly_one_tile_is_one_tile_and_the_taper_defaults_to_224():
    grid = tiling.tile_grid(224, 448)
    assert (len(grid.ystarts), grid.tile_y) == (1, 224)
    assert len(grid.xstarts) == math.ceil(1.2 * 448 / 224)
    assert tiling.taper_mask().shape == (224, 224)
    np.testing.assert_array_equal(tiling.taper_mask(), tiling.taper_mask(224, 224))
