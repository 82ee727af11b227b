"""masks -> flows (heat diffusion): against a slow reference written from the definition,
and geometric properties that hold whatever the implementation."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from cellplug_flows.heat import masks_to_flows, relabel_sequential


def reference_flows(labels: np.ndarray, niter: int | None = None):
    """The definition, written plainly: per object, on its bounding box padded by one pixel,
    add 1 at the centre then replace every object pixel by the mean of its 3x3 neighbourhood
    (zero outside the object), ``2 * (h + 2 + w + 2)`` times; flow = central differences.

    Returns (unnormalised gradient float64 (2, H, W), centres {label: (y, x)}).
    """
    grad = np.zeros((2, *labels.shape))
    centres = {}
    for v in np.unique(labels[labels > 0]):
        ys, xs = np.nonzero(labels == v)
        y0, x0 = ys.min(), xs.min()
        h, w = ys.max() - y0 + 1, xs.max() - x0 + 1
        inside = np.zeros((h + 2, w + 2), bool)
        inside[ys - y0 + 1, xs - x0 + 1] = True
        d2 = (ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2
        k = int(np.argmin(d2))  # first in row-major order on ties
        cy, cx = ys[k] - y0 + 1, xs[k] - x0 + 1
        centres[int(v)] = (int(ys[k]), int(xs[k]))
        T = np.zeros(inside.shape)
        for _ in range(2 * (h + 2 + w + 2) if niter is None else niter):
            T[cy, cx] += 1
            window = sum(
                T[1 + dy : T.shape[0] - 1 + dy, 1 + dx : T.shape[1] - 1 + dx]
                for dy in (-1, 0, 1)
                for dx in (-1, 0, 1)
            )
            T[1:-1, 1:-1] = np.where(inside[1:-1, 1:-1], window / 9.0, 0.0)
        gy = T[2:, 1:-1] - T[:-2, 1:-1]
        gx = T[1:-1, 2:] - T[1:-1, :-2]
        m = inside[1:-1, 1:-1]
        grad[0, y0 : y0 + h, x0 : x0 + w][m] = gy[m]
        grad[1, y0 : y0 + h, x0 : x0 + w][m] = gx[m]
    return grad, centres


def assert_matches_reference(labels, niter=None):
    flows, centres = masks_to_flows(labels, niter=niter, return_centers=True)
    grad, ref_centres = reference_flows(labels, niter)
    norm = np.hypot(grad[0], grad[1])
    # where the gradient vanishes (a flat field, or an exactly symmetric point) its direction
    # is rounding noise; compare everywhere else
    ok = norm > 1e-9
    expected = np.where(ok, grad / np.where(ok, norm, 1.0), 0.0)
    np.testing.assert_allclose(flows[:, ok], expected[:, ok], atol=2e-6)
    assert np.all(flows[:, labels == 0] == 0)
    ids = np.unique(labels[labels > 0])
    assert [tuple(c) for c in centres] == [ref_centres[int(v)] for v in ids]
    return flows, ok


def disc(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_shape_dtype_and_empty_image():
    flows = masks_to_flows(np.zeros((7, 9), np.uint16))
    assert flows.shape == (2, 7, 9) and flows.dtype == np.float32
    assert not flows.any()
    flows, centres = masks_to_flows(np.zeros((4, 4), np.int32), return_centers=True)
    assert centres.shape == (0, 2)


def test_matches_reference_on_real_crop(fluo_pair):
    _, labels = fluo_pair
    flows, ok = assert_matches_reference(labels.astype(np.int32))
    # the exceptions are isolated (symmetric points, flat one-pixel objects)
    assert (~ok & (labels > 0)).sum() <= len(np.unique(labels))


def test_matches_reference_on_messy_labels():
    """Random labels: non-convex, disconnected, touching, at every border."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, (24, 31)).astype(np.int32)
    assert_matches_reference(labels)


def test_niter_is_the_number_of_diffusion_steps():
    labels = np.zeros((40, 40), np.int32)
    labels[disc(labels.shape, 20, 20, 15)] = 1
    flows, _ = assert_matches_reference(labels, niter=3)
    # after 3 steps the heat has spread 3 pixels: farther pixels have no gradient
    yy, xx = np.nonzero(labels)
    far = np.maximum(abs(yy - 20), abs(xx - 20)) > 4
    assert not flows[:, yy[far], xx[far]].any()
    default = masks_to_flows(labels)
    assert np.all(np.hypot(*default[:, yy[far], xx[far]]) > 0.99)


def test_flows_point_to_the_centre_of_a_disc():
    labels = disc((41, 41), 20, 20, 14).astype(np.int32)
    flows = masks_to_flows(labels)
    yy, xx = np.nonzero(labels)
    to_centre = np.stack([20 - yy, 20 - xx]).astype(float)
    dist = np.hypot(*to_centre)
    away = dist >= 2
    cos = (flows[:, yy, xx] * to_centre)[:, away].sum(0) / dist[away]
    assert cos.min() > 0.9
    assert cos.mean() > 0.99


def test_unit_length_inside_zero_outside(fluo_pair):
    _, labels = fluo_pair
    flows = masks_to_flows(labels)
    norm = np.hypot(flows[0], flows[1])
    inside = labels > 0
    assert np.all(norm[~inside] == 0)
    unit = np.abs(norm[inside] - 1) < 1e-5
    # only flat one-pixel objects and exactly symmetric points may differ from 1
    assert (~unit).sum() <= len(np.unique(labels)) and unit.mean() > 0.995


def test_one_and_two_pixel_objects():
    labels = np.zeros((6, 8), np.int32)
    labels[1, 1] = 4  # one pixel: heat is flat, no gradient
    labels[4, 3:5] = 9  # two pixels: the centre is the first one (tie, row-major)
    flows, centres = masks_to_flows(labels, return_centers=True)
    assert np.all(flows[:, 1, 1] == 0)
    assert [tuple(c) for c in centres] == [(1, 1), (4, 3)]
    # heat is released at (4, 3): the other pixel's flow points back at it, and the
    # centre's own flow points at its only warm neighbour
    np.testing.assert_allclose(flows[:, 4, 4], [0, -1])
    np.testing.assert_allclose(flows[:, 4, 3], [0, 1])


def test_centre_of_a_non_convex_object_is_an_object_pixel():
    labels = np.zeros((12, 12), np.int32)
    labels[1:11, 1:3] = 1  # an L: its mean (6.7, 3.5) lies outside it
    labels[9:11, 1:11] = 1
    _, centres = masks_to_flows(labels, return_centers=True)
    ys, xs = np.nonzero(labels)
    d2 = (ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2
    assert labels[tuple(centres[0])] == 1
    assert d2[(ys == centres[0][0]) & (xs == centres[0][1])][0] == d2.min()


def test_ids_need_not_be_contiguous():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, (20, 20)).astype(np.int64)
    base = masks_to_flows(labels)
    for mapping in ([0, 3, 17, 1000, 5], [0, 2**40, 7, 2**33, 1]):  # lookup and unique paths
        relabelled = np.asarray(mapping, np.int64)[labels]
        np.testing.assert_array_equal(masks_to_flows(relabelled), base)
    np.testing.assert_array_equal(masks_to_flows(labels.astype(np.uint8)), base)


def test_each_object_is_independent_of_the_others_and_of_its_position():
    """Objects touching each other and the image border: an object's flows are the same
    alone, among touching neighbours, or shifted; only its own pixels matter."""
    rng = np.random.default_rng(2)
    crowd = rng.integers(1, 4, (30, 30)).astype(np.int32)  # everything touches
    obj = disc((13, 13), 6, 6, 6)
    crowd[:13, :13][obj] = 10  # touching the top-left border and its neighbours
    alone = np.zeros((13, 13), np.int32)
    alone[obj] = 10
    ref = masks_to_flows(alone)[:, obj]
    np.testing.assert_array_equal(masks_to_flows(crowd)[:, :13, :13][:, obj], ref)
    shifted = np.zeros((40, 50), np.int32)
    shifted[20:33, 30:43][obj] = 1
    np.testing.assert_array_equal(masks_to_flows(shifted)[:, 20:33, 30:43][:, obj], ref)


def test_thousands_of_objects():
    """2500 separated 3x3 squares: every edge pixel flows straight to the middle, every
    corner pixel diagonally."""
    labels = np.zeros((200, 200), np.int32)
    k = 0
    for i in range(0, 200, 4):
        for j in range(0, 200, 4):
            k += 1
            labels[i : i + 3, j : j + 3] = k
    flows = masks_to_flows(labels)
    s = np.sqrt(0.5)
    expected = {(0, 1): (1, 0), (2, 1): (-1, 0), (1, 0): (0, 1), (1, 2): (0, -1),
                (0, 0): (s, s), (0, 2): (s, -s), (2, 0): (-s, s), (2, 2): (-s, -s)}
    for (dy, dx), vec in expected.items():
        got = flows[:, dy::4, dx::4][:, :50, :50].reshape(2, -1)
        np.testing.assert_allclose(got, np.repeat(np.array(vec)[:, None], 2500, 1), atol=1e-6)
    assert np.all(flows[:, labels == 0] == 0)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        masks_to_flows(np.zeros((2, 3, 4), np.int32))
    with pytest.raises(ValueError, match="integers"):
        masks_to_flows(np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="non-negative"):
        masks_to_flows(np.array([[0, -1]]))


def test_relabel_sequential_keeps_order():
    lab, n = relabel_sequential(np.array([[0, 40, 7], [7, 0, 2**35]], np.int64))
    assert n == 3
    np.testing.assert_array_equal(lab, [[0, 2, 1], [1, 0, 3]])


@pytest.mark.parametrize("name", ["dsb2018_he", "dsb2018_bf", "usiigaci_phc"])
def test_other_real_crops_match_reference(data_dir, name):
    labels = tifffile.imread(data_dir / f"{name}_masks.tif").astype(np.int32)
    if name == "usiigaci_phc":  # large cells: a quarter keeps the reference quick
        labels = labels[:128, :128]
    assert_matches_reference(labels)


def test_relabel_sequential_of_large_ids_without_background():
    """Ids far above the image size take the np.unique path; with no background pixel the
    smallest id becomes 1, not 0."""
    labels = np.array([[100_000, 7], [7, 200_000]])
    out, n = relabel_sequential(labels)
    assert n == 3 and out.dtype == np.int32
    np.testing.assert_array_equal(out, [[2, 1], [1, 3]])
    out, n = relabel_sequential(np.array([[0, 100_000], [7, 0]]))
    np.testing.assert_array_equal(out, [[0, 2], [1, 0]])
    assert n == 2
    with pytest.raises(ValueError, match="^labels must be non-negative$"):
        relabel_sequential(np.array([[0, -1]]))
