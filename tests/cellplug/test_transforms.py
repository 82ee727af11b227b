"""Image preparation: Cellpose's channel convention, 1-99 percentile normalisation, resizing."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from cellplug.errors import CellplugError
from cellplug.transforms import (
    normalize_percentile,
    parse_channels,
    prepare_image,
    rescaled_shape,
    resize,
    select_channels,
)


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)


# -- channels ------------------------------------------------------------------------------
def test_parse_channels():
    assert parse_channels(None) == (0, 0)
    assert parse_channels([2, 3]) == (2, 3)
    for bad in ([1], [1, 2, 3], [-1, 0], [9, 0]):
        with pytest.raises(CellplugError, match="channels must be two integers"):
            parse_channels(bad)


def test_grayscale_is_its_own_cyto_channel_whatever_is_asked():
    img = np.arange(12, dtype=np.uint16).reshape(3, 4)
    for channels in ([0, 0], [1, 0], [2, 3], [3, 1]):
        out = select_channels(img, channels)
        assert out.shape == (2, 3, 4) and out.dtype == np.float32
        np.testing.assert_array_equal(out[0], img)
        np.testing.assert_array_equal(out[1], 0)


def test_one_channel_yxc_input_behaves_as_grayscale():
    img = np.arange(12, dtype=np.uint8).reshape(3, 4, 1)
    for channels in ([0, 0], [1, 2], [3, 3]):
        out = select_channels(img, channels)
        np.testing.assert_array_equal(out[0], img[:, :, 0])
        np.testing.assert_array_equal(out[1], 0)


def test_rgb_with_0_0_averages_all_channels_and_leaves_nucleus_empty(rgb):
    out = select_channels(rgb, [0, 0])
    np.testing.assert_allclose(out[0], rgb.astype(np.float32).mean(axis=2), rtol=1e-6)
    np.testing.assert_array_equal(out[1], 0)
    # cyto 0 ignores the nucleus channel, as Cellpose does
    np.testing.assert_array_equal(select_channels(rgb, [0, 3]), out)


def test_rgb_picks_are_one_based(rgb):
    out = select_channels(rgb, [2, 3])
    np.testing.assert_array_equal(out[0], rgb[:, :, 1])
    np.testing.assert_array_equal(out[1], rgb[:, :, 2])
    out = select_channels(rgb, [1, 0])
    np.testing.assert_array_equal(out[0], rgb[:, :, 0])
    np.testing.assert_array_equal(out[1], 0)


def test_two_channel_image(rgb):
    two = rgb[:, :, :2]
    out = select_channels(two, [2, 1])
    np.testing.assert_array_equal(out[0], two[:, :, 1])
    np.testing.assert_array_equal(out[1], two[:, :, 0])
    with pytest.raises(CellplugError, match="channel 3 requested but the image has 2"):
        select_channels(two, [3, 0])


def test_one_network_channel_keeps_only_cyto(rgb):
    out = select_channels(rgb, [2, 3], n_channels=1)
    assert out.shape == (1, 20, 30)
    np.testing.assert_array_equal(out[0], rgb[:, :, 1])


def test_bad_image_shape():
    with pytest.raises(CellplugError, match=r"expected an image \(Y, X\) or \(Y, X, C\)"):
        select_channels(np.zeros((2, 3, 4, 5)))


# -- normalisation ---------------------------------------------------------------------------
def test_percentiles_map_to_0_and_1():
    rng = np.random.default_rng(1)
    img = rng.gamma(2.0, 30.0, (2, 64, 64)).astype(np.float32)
    out = normalize_percentile(img)
    for c in range(2):
        lo, hi = np.percentile(out[c], [1, 99])
        assert abs(lo) < 1e-5 and abs(hi - 1) < 1e-5
    # the input is not modified
    assert not np.shares_memory(out, img) and img.max() > 1


def test_other_percentiles():
    img = np.linspace(0, 100, 101, dtype=np.float32).reshape(1, 1, 101)
    out = normalize_percentile(img, 10, 90)
    np.testing.assert_allclose(out[0, 0, [10, 90]], [0, 1], atol=1e-6)
    with pytest.raises(CellplugError, match="invalid percentiles"):
        normalize_percentile(img, 50, 40)


def test_constant_channel_is_left_alone_and_nearly_constant_becomes_zero():
    img = np.zeros((3, 10, 10), np.float32)
    img[0] = 5.0  # constant: untouched (an empty nucleus channel stays 0)
    img[1, 0, 0] = 1e-4  # percentiles closer than 1e-3: set to 0
    img[2] = np.arange(100).reshape(10, 10)
    out = normalize_percentile(img)
    np.testing.assert_array_equal(out[0], 5.0)
    np.testing.assert_array_equal(out[1], 0.0)
    assert out[2].max() > 0.99


def test_invert():
    ramp = np.arange(100, dtype=np.float32).reshape(10, 10)
    img = np.stack([ramp, np.zeros((10, 10), np.float32)])
    plain = normalize_percentile(img)
    inv = normalize_percentile(img, invert=True)
    np.testing.assert_allclose(inv[0], 1 - plain[0], atol=1e-6)
    np.testing.assert_array_equal(inv[1], 0)  # constant channels are not inverted (Cellpose)


def test_large_channels_use_a_subsample_for_percentiles():
    img = np.zeros((1, 2300, 2300), np.float32)  # 5.3 M pixels > 224^3
    img[0, ::2] = 10.0
    out = normalize_percentile(img)
    assert set(np.unique(out)) <= {0.0, 1.0}


def test_prepare_image_shape_and_dtype(rgb):
    out = prepare_image(rgb, (2, 1))
    assert out.shape == (2, 20, 30) and out.dtype == np.float32
    assert out.min() < 0.05 and out.max() > 0.95


# -- resizing --------------------------------------------------------------------------------
def _half_pixel_bilinear(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Independent reference: sample at (i + 0.5) * scale - 0.5, negative coordinates clamped
    to 0 and the last row/column repeated (OpenCV INTER_LINEAR's convention)."""
    sy, sx = img.shape[0] / shape[0], img.shape[1] / shape[1]
    yy = np.maximum((np.arange(shape[0]) + 0.5) * sy - 0.5, 0)
    xx = np.maximum((np.arange(shape[1]) + 0.5) * sx - 0.5, 0)
    coords = np.meshgrid(yy, xx, indexing="ij")
    return ndi.map_coordinates(img.astype(np.float64), coords, order=1, mode="nearest")


@pytest.mark.parametrize("shape", [(37, 53), (13, 9), (20, 31), (64, 64), (5, 80)])
def test_bilinear_matches_half_pixel_reference(shape):
    rng = np.random.default_rng(2)
    img = rng.random((2, 20, 31)).astype(np.float32)
    out = resize(img, shape)
    assert out.shape == (2, *shape) and out.dtype == np.float32
    for c in range(2):
        np.testing.assert_allclose(out[c], _half_pixel_bilinear(img[c], shape), atol=2e-6)


def test_bilinear_2d_input():
    img = np.arange(30, dtype=np.float32).reshape(5, 6)
    out = resize(img, (10, 12))
    assert out.shape == (10, 12)
    np.testing.assert_allclose(out, _half_pixel_bilinear(img, (10, 12)), atol=2e-6)


def test_nearest_keeps_labels_and_dtype():
    labels = np.array([[1, 2], [3, 4]], dtype=np.uint32)
    up = resize(labels, (4, 6), nearest=True)
    assert up.dtype == np.uint32
    np.testing.assert_array_equal(up, np.repeat(np.repeat(labels, 2, axis=0), 3, axis=1))
    # downsampling picks floor(i * scale): OpenCV INTER_NEAREST
    big = np.arange(49, dtype=np.int32).reshape(7, 7)
    down = resize(big, (3, 3), nearest=True)
    idx = np.floor(np.arange(3) * 7 / 3).astype(int)
    np.testing.assert_array_equal(down, big[np.ix_(idx, idx)])


def test_same_size_is_a_no_op_and_empty_target_fails():
    img = np.ones((3, 4), np.float32)
    assert resize(img, (3, 4)) is img
    with pytest.raises(CellplugError, match="cannot resize"):
        resize(img, (0, 4))


def test_rescaled_shape_truncates_as_cellpose():
    assert rescaled_shape((520, 696), 17 / 25) == (int(520 * 17 / 25), int(696 * 17 / 25))
    assert rescaled_shape((3, 3), 0.1) == (1, 1)


def test_percentiles_of_a_channel_over_224_cubed_pixels_come_from_a_regular_subsample():
    """As Cellpose: past 224^3 pixels, every (Y // 224)-th row and (X // 224)-th column, at
    least every one. A 113 x 100000 channel (11.3 M pixels) samples every row and every
    446th column; its odd rows are 1000, its even rows their own index (0 .. 112)."""
    rows = np.arange(113, dtype=np.float32)
    col = np.where(rows % 2 == 1, 1000.0, rows).astype(np.float32)
    img = np.broadcast_to(col[None, :, None], (1, 113, 100_000))
    out = normalize_percentile(img)
    sample = img[0, :, ::446]
    assert sample.shape == (113, 225)
    lo, hi = np.percentile(sample, [1, 99])  # every row sampled: the 99th percentile is 1000
    assert hi == 1000.0 and lo == 2.0
    np.testing.assert_allclose(out[0, :, 0], (col - lo) / (hi - lo), rtol=1e-6)
    np.testing.assert_allclose(out[0, 1::2, 5], 1.0, rtol=1e-6)


def test_percentile_bounds():
    img = np.linspace(0, 100, 101, dtype=np.float32).reshape(1, 1, 101)
    np.testing.assert_allclose(normalize_percentile(img, 0, 100)[0, 0, [0, 100]], [0, 1])
    np.testing.assert_allclose(normalize_percentile(img, 0.5, 99.5)[0, 0, [0, 100]],
                               [-0.5 / 99, 99.5 / 99], rtol=1e-5)
    for lower, upper in ((-1, 99), (1, 100.5), (50, 50)):
        with pytest.raises(CellplugError, match="invalid percentiles"):
            normalize_percentile(img, lower, upper)


def test_pixel_value_checks():
    from cellplug.transforms import check_pixel_values

    check_pixel_values(np.zeros((3, 3), bool))
    check_pixel_values(np.zeros((3, 3), np.uint64))
    check_pixel_values(np.array([[-1e38, 2e38]]))  # a range of 3e38 fits in float32
    check_pixel_values(np.array([[2e38, 3e38]]))  # so does this one: 1e38 wide
    with pytest.raises(CellplugError, match="exceed what float32"):
        check_pixel_values(np.array([[-3e38, 3e38]]))
    with pytest.raises(CellplugError, match="unsupported pixel type"):
        check_pixel_values(np.zeros((3, 3), complex))
    for bad, what in ((np.nan, "NaN"), (np.inf, "infinite")):
        with pytest.raises(CellplugError, match=what):
            check_pixel_values(np.array([[0.0, bad]], np.float32))


def test_prepare_image_passes_network_channels_and_inversion(rgb):
    one = prepare_image(rgb, (2, 1), n_channels=1)
    assert one.shape == (1, 20, 30)
    two = prepare_image(rgb, (2, 1))
    np.testing.assert_array_equal(one[0], two[0])
    inv = prepare_image(rgb, (2, 1), invert=True)
    np.testing.assert_allclose(inv, 1 - two, atol=1e-6)
    np.testing.assert_allclose(prepare_image(rgb, (2, 0), percentiles=(0, 100))[0],
                               (rgb[..., 1] - rgb[..., 1].min())
                               / float(np.ptp(rgb[..., 1])), rtol=1e-6)


@pytest.mark.parametrize("src,dst", [((37, 53), (61, 40)), ((256, 256), (333, 190)),
                                     ((100, 80), (100, 81)), ((5, 300), (2, 1000))])
def test_torch_free_resize_is_torch_resize_to_an_ulp(src, dst):
    """Array backbones segment without torch: their bilinear resize must give torch's
    samples (same positions and weights; only float rounding of the sums may differ)."""
    rng = np.random.default_rng(0)
    image = rng.random((3, *src), dtype=np.float32)
    want = resize(image, dst)
    got = resize(image, dst, torch_free=True)
    assert got.shape == want.shape == (3, *dst) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=2.5e-7)
    flat = resize(image[0], dst, torch_free=True)
    np.testing.assert_array_equal(flat, got[0])
