"""Following flows: bit-for-bit against a plain step-by-step loop, plus hand-made fields."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from cellplug_flows.dynamics import follow_flows
from cellplug_flows.heat import masks_to_flows


def reference_follow(flows, inside, niter):
    """Every step for every pixel, all in float32: bilinear weights (1-wy)(1-wx), (1-wy)wx,
    wy(1-wx), wy wx on the four neighbouring pixels (the far ones clamped to the image), then
    position + step clamped to [0, size - 1]."""
    flows = np.nan_to_num(np.asarray(flows, np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    ly, lx = inside.shape
    ys, xs = np.nonzero(inside)
    y = ys.astype(np.float32)
    x = xs.astype(np.float32)
    one = np.float32(1)
    for _ in range(niter):
        yf = y.astype(np.int64)
        xf = x.astype(np.int64)
        yf1 = np.minimum(ly - 1, yf + 1)
        xf1 = np.minimum(lx - 1, xf + 1)
        wy = y - yf.astype(np.float32)
        wx = x - xf.astype(np.float32)
        a, b = (one - wy) * (one - wx), (one - wy) * wx
        c, d = wy * (one - wx), wy * wx
        step = [f[yf, xf] * a + f[yf, xf1] * b + f[yf1, xf] * c + f[yf1, xf1] * d for f in flows]
        y = np.minimum(np.float32(ly - 1), np.maximum(np.float32(0), y + step[0]))
        x = np.minimum(np.float32(lx - 1), np.maximum(np.float32(0), x + step[1]))
    return np.stack([y, x])


def reference_follow_nearest(flows, inside, niter):
    """Cellpose's ``steps2D`` (``interp=False``) as a plain loop: the step is the field at
    ``(int(y), int(x))``, then position + step clamped to [0, size - 1], in float32."""
    flows = np.nan_to_num(np.asarray(flows, np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    ly, lx = inside.shape
    ys, xs = np.nonzero(inside)
    y = ys.astype(np.float32)
    x = xs.astype(np.float32)
    for _ in range(niter):
        yi, xi = y.astype(np.int64), x.astype(np.int64)
        dy, dx = flows[0, yi, xi], flows[1, yi, xi]
        y = np.minimum(np.float32(ly - 1), np.maximum(np.float32(0), y + dy))
        x = np.minimum(np.float32(lx - 1), np.maximum(np.float32(0), x + dx))
    return np.stack([y, x])


@pytest.fixture(scope="module")
def real_flows(fluo_pair):
    _, labels = fluo_pair
    return masks_to_flows(labels), labels > 0


@pytest.mark.parametrize("niter", [1, 2, 3, 17, 200, 201])
def test_bit_identical_to_plain_loop_on_real_flows(real_flows, niter):
    """The early exit on fixed points and 2-cycles must not change any position, including
    the parity of the step count inside a 2-cycle."""
    flows, inside = real_flows
    final, start = follow_flows(flows * inside, inside, niter)
    np.testing.assert_array_equal(final, reference_follow(flows * inside, inside, niter))
    for got, want in zip(start, np.nonzero(inside), strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("seed", [0, 1])
def test_bit_identical_to_plain_loop_on_random_fields(seed):
    rng = np.random.default_rng(seed)
    flows = rng.normal(0, 1.5, (2, 23, 31)).astype(np.float32)  # walks out of the image too
    inside = rng.random((23, 31)) < 0.6
    for niter in (5, 60):
        final, _ = follow_flows(flows, inside, niter)
        np.testing.assert_array_equal(final, reference_follow(flows, inside, niter))


@pytest.mark.parametrize("niter", [1, 2, 17, 200])
def test_without_interpolation_matches_the_nearest_pixel_loop(real_flows, niter):
    flows, inside = real_flows
    rng = np.random.default_rng(niter)
    noisy = (flows + rng.normal(0, 0.3, flows.shape)).astype(np.float32)
    for field in (flows * inside, noisy):
        final, _ = follow_flows(field, inside, niter, interp=False)
        np.testing.assert_array_equal(final, reference_follow_nearest(field, inside, niter))
    # the first step starts on pixel centres, where both agree; after it they differ
    interpolated = follow_flows(noisy, inside, niter)[0]
    assert np.array_equal(final, interpolated) == (niter == 1)


def test_without_interpolation_matches_cellpose_steps2d(real_flows):
    """Cellpose 3's ``steps2D``, which its size model runs (``interp=False``)."""
    cp_dynamics = pytest.importorskip("cellpose.dynamics")
    flows, inside = real_flows
    field = (flows * inside).astype(np.float32)
    p = np.stack(np.nonzero(inside)).astype(np.float32)
    want = cp_dynamics.steps2D(p, field, 200)
    final, _ = follow_flows(field, inside, 200, interp=False)
    np.testing.assert_array_equal(final, want)


def test_constant_field_moves_straight_and_stops_at_the_border():
    flows = np.zeros((2, 5, 12), np.float32)
    flows[1] = 1.0  # one pixel to the right per step
    flows[0] = 0.25
    inside = np.zeros((5, 12), bool)
    inside[0, 0] = inside[2, 9] = True
    final, _ = follow_flows(flows, inside, 6)
    np.testing.assert_array_equal(final, [[1.5, 3.5], [6.0, 11.0]])


def test_flows_pointing_out_are_clamped_to_the_image():
    flows = np.full((2, 4, 4), -3.0, np.float32)
    final, _ = follow_flows(flows, np.ones((4, 4), bool), 10)
    assert np.all(final == 0)


def test_two_cycle_parity_and_fixed_point():
    flows = np.zeros((2, 1, 8), np.float32)
    flows[1, 0, 2] = 1.0  # x = 2 -> 3
    flows[1, 0, 3] = -1.0  # x = 3 -> 2
    inside = np.zeros((1, 8), bool)
    inside[0, [2, 3, 6]] = True  # x = 6 sits on zero flow
    for niter in (1, 2, 199, 200):
        final, _ = follow_flows(flows, inside, niter)
        odd = niter % 2
        np.testing.assert_array_equal(final[1], [3 if odd else 2, 2 if odd else 3, 6])
        assert np.all(final[0] == 0)


def test_zero_steps_and_no_pixels():
    flows = np.ones((2, 3, 3), np.float32)
    inside = np.eye(3, dtype=bool)
    final, _ = follow_flows(flows, inside, 0)
    np.testing.assert_array_equal(final, [[0, 1, 2], [0, 1, 2]])
    final, start = follow_flows(flows, np.zeros((3, 3), bool), 10)
    assert final.shape == (2, 0) and start[0].size == 0


def test_zero_outside_equals_masking_the_flows(real_flows):
    flows, inside = real_flows
    rng = np.random.default_rng(3)
    noisy = flows + rng.normal(0, 0.3, flows.shape).astype(np.float32)
    a, _ = follow_flows(noisy, inside, 50, zero_outside=True)
    b, _ = follow_flows(noisy * inside, inside, 50)
    np.testing.assert_array_equal(a, b)


def test_non_finite_flows_count_as_zero():
    rng = np.random.default_rng(4)
    flows = rng.normal(0, 1, (2, 9, 9)).astype(np.float32)
    flows[0, 4, 4] = np.nan
    flows[1, 2, 3] = np.inf
    inside = np.ones((9, 9), bool)
    final, _ = follow_flows(flows, inside, 30)
    clean = flows.copy()
    clean[:, 4, 4] = 0
    clean[:, 2, 3] = 0
    np.testing.assert_array_equal(final, reference_follow(clean, inside, 30))


def test_same_result_with_one_or_more_threads(real_flows):
    flows, inside = real_flows
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one, _ = follow_flows(flows, inside, 200)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many, _ = follow_flows(flows, inside, 200)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(one, many)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(2, H, W\)"):
        follow_flows(np.zeros((3, 4, 4), np.float32), np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="does not match"):
        follow_flows(np.zeros((2, 4, 4), np.float32), np.ones((4, 5), bool))
    with pytest.raises(ValueError, match="niter"):
        follow_flows(np.zeros((2, 4, 4), np.float32), np.ones((4, 4), bool), -1)
