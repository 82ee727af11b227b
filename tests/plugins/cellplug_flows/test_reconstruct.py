"""flows -> masks: round trips on real and synthetic labels, each parameter's effect, hole
filling, flow errors."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from cellplug_flows import fill_holes_and_remove_small, flow_errors, flows_to_masks
from cellplug_flows.heat import masks_to_flows

from cellplug.metrics import average_precision


def logit(labels, inside=5.0, outside=-5.0):
    return np.where(labels > 0, inside, outside).astype(np.float32)


def same_partition(a, b) -> bool:
    """Equal up to a renumbering of the objects."""
    if not np.array_equal(a > 0, b > 0):
        return False
    fg = a > 0
    pairs = np.unique(np.stack([a[fg], b[fg]]).astype(np.int64), axis=1)
    return pairs.shape[1] == len(np.unique(a[fg])) == len(np.unique(b[fg]))


def squares(n_side, size, gap, offset=0):
    """n_side^2 squares of ``size`` pixels, ``gap`` pixels apart, ids 1..n in row-major."""
    pitch = size + gap
    labels = np.zeros((n_side * pitch + offset, n_side * pitch + offset), np.int32)
    k = 0
    for i in range(n_side):
        for j in range(n_side):
            k += 1
            y, x = offset + i * pitch, offset + j * pitch
            labels[y : y + size, x : x + size] = k
    return labels


def disc(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


@pytest.mark.parametrize(
    "name", ["dsb2018_fluo", "dsb2018_he", "dsb2018_bf", "usiigaci_phc"]
)
def test_round_trip_recovers_real_labels(data_dir, name):
    labels = tifffile.imread(data_dir / f"{name}_masks.tif").astype(np.int32)
    masks = flows_to_masks(masks_to_flows(labels), logit(labels))
    assert masks.dtype == np.uint32 and masks.shape == labels.shape
    # objects below min_size (15 px, e.g. slivers cut by the crop) are dropped by design
    sizes = np.bincount(labels.ravel())[1:]
    kept = labels * np.isin(labels, np.nonzero(sizes >= 15)[0] + 1)
    ap = average_precision(kept, masks.astype(np.int64), [0.5, 0.9])
    assert ap[0] == 1.0 and ap[1] >= 0.95


def test_output_is_numbered_1_to_n_whatever_the_input_ids():
    labels = squares(4, 6, 2)
    sparse = np.where(labels > 0, labels * 1000 + 7, 0)
    masks = flows_to_masks(masks_to_flows(sparse), logit(sparse))
    assert masks.dtype == np.uint32
    assert set(np.unique(masks)) == set(range(17))
    assert same_partition(masks, labels)


def test_thousands_of_touching_objects():
    """3600 5x5 squares, touching in rows (no gap between columns)."""
    labels = np.zeros((360, 300), np.int32)
    k = 0
    for i in range(0, 360, 6):
        for j in range(0, 300, 5):
            k += 1
            labels[i : i + 5, j : j + 5] = k
    masks = flows_to_masks(masks_to_flows(labels), logit(labels))
    assert masks.max() == k == 3600
    assert same_partition(masks, labels)


def test_objects_cut_by_the_image_border():
    big = np.zeros((90, 90), np.int32)
    for k, (cy, cx) in enumerate([(0, 0), (0, 45), (45, 89), (89, 89), (89, 20), (45, 45)], 1):
        big[disc(big.shape, cy, cx, 12)] = k
    masks = flows_to_masks(masks_to_flows(big), logit(big))
    assert same_partition(masks, big)


def test_empty_and_flat_inputs_give_no_masks():
    flows = np.zeros((2, 32, 32), np.float32)
    assert not flows_to_masks(flows, np.full((32, 32), -5, np.float32)).any()
    # nothing moves: every end point is alone in its bin, no histogram peak
    assert not flows_to_masks(flows, np.full((32, 32), 5, np.float32)).any()
    empty = flows_to_masks(flows, np.full((32, 32), -5, np.float32))
    assert empty.dtype == np.uint32 and empty.shape == (32, 32)


def test_objects_need_more_than_10_converging_pixels():
    labels = np.zeros((40, 40), np.int32)
    labels[2:10:4, 2:40:4] = np.arange(1, 21).reshape(2, 10)  # one-pixel objects
    labels[15:18, 2:5] = 21  # 9 pixels
    labels[15:18, 10:13] = 22
    labels[25:29, 2:6] = 23  # 16 pixels
    masks = flows_to_masks(masks_to_flows(labels), logit(labels), min_size=0)
    assert masks.max() == 1
    np.testing.assert_array_equal(masks > 0, labels == 23)


def end_points(counts: dict[tuple[int, int], int]):
    """(final, start) with ``counts[(y, x)]`` pixels ending in histogram bin (y, x) (image
    coordinates), each starting from its own pixel of a 60 x 60 image."""
    ys, xs = [], []
    for (y, x), n in counts.items():
        ys += [y + 0.5] * n
        xs += [x + 0.5] * n
    final = np.array([ys, xs], np.float32)
    k = np.arange(final.shape[1])
    return final, (k // 60, k % 60)


def test_clustering_seeds_grow_five_steps_over_bins_with_more_than_two_points():
    from cellplug_flows.reconstruct import cluster_end_points

    counts = {(20, 20): 15}  # the only peak with more than 10 points
    counts.update({(20, 20 + d): 3 for d in range(1, 9)})  # a trail of 3-point bins
    counts[(21, 20)] = 2  # next to the seed, but too few points to grow into
    counts[(40, 40)] = 10  # a peak, but not above 10
    final, start = end_points(counts)
    labels = cluster_end_points(final, start, (60, 60))
    assert labels.dtype == np.int32
    got = labels[start]
    bins = list(counts)
    per_point = np.repeat(np.arange(len(bins)), list(counts.values()))
    for i, b in enumerate(bins):
        expect = 1 if b[0] == 20 and b[1] - 20 <= 5 else 0
        assert np.all(got[per_point == i] == expect), b


def test_clustering_larger_peaks_win_overlaps():
    from cellplug_flows.reconstruct import cluster_end_points

    counts = {(10, 10): 20, (10, 16): 12}
    counts.update({(10, x): 3 for x in range(11, 16)})  # reachable from both seeds
    final, start = end_points(counts)
    labels = cluster_end_points(final, start, (60, 60))
    sizes = sorted(np.bincount(labels[start])[1:])
    assert sizes == [12, 20 + 5 * 3]


def test_niter_more_steps_let_large_objects_converge():
    labels = np.zeros((120, 120), np.int32)
    labels[disc(labels.shape, 40, 40, 30)] = 1
    labels[disc(labels.shape, 90, 85, 25) & (labels == 0)] = 2
    flows, cellprob = masks_to_flows(labels), logit(labels)
    ap = {n: average_precision(labels, flows_to_masks(flows, cellprob, niter=n), [0.5])[0]
          for n in (0, 5, 200)}
    assert ap[200] == 1.0
    assert ap[0] == 0.0  # nothing moves, nothing converges
    assert ap[5] < ap[200]  # 5 steps bring border pixels nowhere near the centre


def test_cellprob_threshold_lower_gives_more_and_larger_masks():
    from scipy.ndimage import distance_transform_edt

    labels = squares(3, 14, 6, offset=3)
    # logit decreasing from the object cores outwards: +4 at the core, 0 at 3 px from the
    # border, negative outside
    depth = distance_transform_edt(labels > 0) - distance_transform_edt(labels == 0)
    cellprob = (depth - 3).astype(np.float32)
    flows = masks_to_flows(labels)
    areas = []
    for th in (-2.0, 0.0, 2.0, 100.0):
        masks = flows_to_masks(flows, cellprob, cellprob_threshold=th)
        areas.append(int((masks > 0).sum()))
        assert masks.max() in (0, 9)
    assert areas[0] > areas[1] > areas[2] > areas[3] == 0


def test_flow_threshold_drops_masks_whose_flows_disagree():
    labels = squares(2, 16, 4, offset=2)
    flows = masks_to_flows(labels)
    rng = np.random.default_rng(0)
    noisy = flows.copy()
    obj = labels == 4
    noisy[:, obj] += rng.normal(0, 0.6, (2, int(obj.sum()))).astype(np.float32)
    errors = flow_errors(labels, noisy)
    assert errors[:3].max() < 1e-10 and 0.4 < errors[3] < 1.5
    counts = {}
    for th in (0.0, None, 0.1, 0.4, 1.5):
        counts[th] = int(flows_to_masks(noisy, logit(labels), flow_threshold=th).max())
    assert counts[0.0] == counts[None] == counts[1.5] == 4  # off, or tolerant enough
    assert counts[0.4] == counts[0.1] == 3  # the noisy object is dropped
    masks = flows_to_masks(noisy, logit(labels), flow_threshold=0.4)
    assert not masks[obj].any() and same_partition(masks, labels * (labels < 4))


def test_min_size_drops_small_masks():
    labels = np.zeros((40, 60), np.int32)
    labels[5:9, 5:9] = 1  # 16 px
    labels[5:11, 20:26] = 2  # 36 px
    labels[20:30, 30:40] = 3  # 100 px
    flows, cellprob = masks_to_flows(labels), logit(labels)
    sizes = {m: sorted(np.bincount(flows_to_masks(flows, cellprob, min_size=m).ravel())[1:])
             for m in (0, 15, 20, 50, 101)}
    assert sizes[0] == sizes[15] == [16, 36, 100]  # default 15 keeps all
    assert sizes[20] == [36, 100]
    assert sizes[50] == [100]
    assert sizes[101] == []


def test_max_size_fraction_drops_huge_masks():
    labels = np.zeros((64, 64), np.int32)
    labels[:, :40] = 1  # 62.5 % of the image
    labels[50:60, 50:60] = 2
    flows, cellprob = masks_to_flows(labels), logit(labels)
    kept = {f: sorted(np.bincount(flows_to_masks(flows, cellprob, max_size_fraction=f).ravel())[1:])
            for f in (0.02, 0.4, 0.7)}
    assert kept[0.7] == [100, 2560]
    assert kept[0.4] == [100]  # the default drops the big one
    assert kept[0.02] == []


def test_extra_keywords_are_ignored():
    labels = squares(2, 8, 2)
    a = flows_to_masks(masks_to_flows(labels), logit(labels))
    b = flows_to_masks(masks_to_flows(labels), logit(labels), resample=True, foo=1)
    np.testing.assert_array_equal(a, b)


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="expected flows"):
        flows_to_masks(np.zeros((2, 8, 8), np.float32), np.zeros((8, 9), np.float32))
    with pytest.raises(ValueError, match="expected flows"):
        flows_to_masks(np.zeros((8, 8), np.float32), np.zeros((8, 8), np.float32))


def test_flow_errors_by_hand():
    labels = squares(2, 5, 2)
    flows = masks_to_flows(labels)
    np.testing.assert_allclose(flow_errors(labels, flows), 0, atol=1e-12)
    # zero flows: every pixel misses a unit vector (error 1) except each square's middle,
    # where the symmetric heat field has no gradient (error 0): 24 / 25
    zeros = np.zeros_like(flows)
    np.testing.assert_allclose(flow_errors(labels, zeros), 24 / 25, rtol=1e-6)
    # opposite flows: |2u|^2 = 4 on those 24 pixels
    np.testing.assert_allclose(flow_errors(labels, -flows), 4 * 24 / 25, rtol=1e-6)
    assert flow_errors(np.zeros((4, 4), np.int32), np.zeros((2, 4, 4))).shape == (0,)


# hole filling ---------------------------------------------------------------------------


def ring(shape, y0, x0, outer, width=1):
    """Square ring: ``outer`` x ``outer`` square at (y0, x0) minus its inside ``width`` px in."""
    m = np.zeros(shape, bool)
    m[y0 : y0 + outer, x0 : x0 + outer] = True
    m[y0 + width : y0 + outer - width, x0 + width : x0 + outer - width] = False
    return m


def test_fill_holes_fills_enclosed_background():
    labels = np.zeros((20, 20), np.int32)
    labels[ring(labels.shape, 2, 2, 9, 2)] = 1  # 9x9 ring, 5x5 hole
    out = fill_holes_and_remove_small(labels, min_size=0)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out[2:11, 2:11], 1)
    assert (out > 0).sum() == 81


def test_fill_holes_uses_4_connectivity_for_the_background():
    labels = np.zeros((9, 9), np.int32)
    labels[ring(labels.shape, 1, 1, 7, 1)] = 1
    labels[1, 1] = 0  # the hole touches the outside only diagonally: still a hole
    out = fill_holes_and_remove_small(labels, min_size=0)
    assert out[2:7, 2:7].all() and out[1, 1] == 0


def test_open_concavities_are_not_holes():
    labels = np.zeros((12, 12), np.int32)
    labels[ring(labels.shape, 1, 1, 9, 2)] = 1
    labels[4:7, 8:10] = 0  # a C: the inside opens to the right
    out = fill_holes_and_remove_small(labels, min_size=0)
    np.testing.assert_array_equal(out > 0, labels > 0)


def test_a_hole_swallows_an_object_inside_it():
    """Cellpose semantics: a hole is any part of the object's bounding box that the outside
    cannot reach without crossing the object, other objects included."""
    labels = np.zeros((20, 20), np.int32)
    labels[ring(labels.shape, 2, 2, 11, 2)] = 5
    labels[6:9, 6:9] = 9  # a separate object in the hole
    labels[15:19, 15:19] = 3
    out = fill_holes_and_remove_small(labels, min_size=0)
    assert out.max() == 2
    assert len(np.unique(out[2:13, 2:13])) == 1 and out[7, 7] > 0


def test_min_size_is_applied_before_and_after_filling():
    labels = np.zeros((30, 30), np.int32)
    labels[ring(labels.shape, 1, 1, 4, 1)] = 1  # 12 px, 16 filled: removed first
    labels[ring(labels.shape, 10, 10, 6, 1)] = 2  # 20 px, 36 filled: kept
    labels[20:23, 20:26] = 3  # 18 px
    out = fill_holes_and_remove_small(labels, min_size=15)
    assert sorted(np.bincount(out.ravel())[1:]) == [18, 36]
    out = fill_holes_and_remove_small(labels, min_size=19)
    assert sorted(np.bincount(out.ravel())[1:]) == [36]
    assert not fill_holes_and_remove_small(np.zeros((5, 5), np.int32)).any()


def test_min_size_with_gaps_in_the_ids_removes_only_small_objects():
    """Ids with gaps (e.g. after the flow-error check dropped a mask): only the small object
    goes. (Cellpose 3.1.1.2 indexes its size table as if ids were contiguous and drops the
    100-pixel object 3 here instead; this is deliberately not reproduced.)"""
    labels = np.zeros((40, 40), np.int32)
    labels[0:10, 0:10] = 2
    labels[20:30, 20:30] = 3
    labels[35:37, 0:5] = 4  # 10 px
    out = fill_holes_and_remove_small(labels, min_size=15)
    assert sorted(np.bincount(out.ravel())[1:]) == [100, 100]
    assert out[25, 25] > 0 and out[5, 5] > 0 and out[36, 2] == 0


def test_reconstructed_ring_comes_back_filled():
    labels = np.zeros((50, 50), np.int32)
    labels[disc(labels.shape, 25, 25, 18) & ~disc(labels.shape, 25, 25, 4)] = 1
    masks = flows_to_masks(masks_to_flows(labels), logit(labels))
    assert masks.max() == 1
    np.testing.assert_array_equal(masks > 0, disc(labels.shape, 25, 25, 18))


def test_flow_errors_of_an_empty_image():
    assert flow_errors(np.zeros((0, 5), np.int32), np.zeros((2, 0, 5), np.float32)).shape == (0,)


def test_cell_probability_must_exceed_the_threshold():
    """As Cellpose: pixels are followed where cellprob > threshold, so a map exactly at the
    threshold gives no masks, and just above it gives the object."""
    labels = np.zeros((40, 40), np.int32)
    labels[10:30, 10:30] = 1
    flows = masks_to_flows(labels)
    at = np.where(labels > 0, 0.0, -5.0).astype(np.float32)
    assert flows_to_masks(flows, at, cellprob_threshold=0.0).max() == 0
    masks = flows_to_masks(flows, at + 1e-3, cellprob_threshold=0.0)
    assert masks.max() == 1 and (masks == 1).sum() == 400


def test_remove_small_renumbers_even_when_nothing_is_removed():
    from cellplug_flows.reconstruct import remove_small

    labels = np.zeros((4, 4), np.int32)
    labels[0, 0], labels[3, 3] = 2, 5
    out = remove_small(labels, 1)
    assert out[0, 0] == 1 and out[3, 3] == 2 and out.sum() == 3
    assert remove_small(labels, 0) is labels


WARM_UP_CHECK = """
import sys, numpy as np, tifffile
from numba.core.registry import CPUDispatcher
from cellplug_flows import dynamics, heat, reconstruct
from cellplug.segmenter import Segmenter

def signatures():
    return {(m.__name__, name): list(f.signatures) for m in (dynamics, heat, reconstruct)
            for name, f in vars(m).items() if isinstance(f, CPUDispatcher)}

reconstruct.warm_up()
warm = signatures()
seg = Segmenter.from_model(None)
seg.start_warm_up = lambda: None  # the warm-up above is the only one
image = tifffile.imread(sys.argv[1])
seg.segment(image)                  # size model: its pass without interpolation, then masks
seg.segment(image, diameter=30.0)   # rescaled: labels resized back
new = {k: v[len(warm.get(k, [])):] for k, v in signatures().items() if v != warm.get(k, [])}
assert not new, f"compiled after the warm-up: {new}"
assert sum(map(len, warm.values())) > 10
"""


def test_warm_up_loads_every_signature_the_segmenter_uses(data_dir):
    """In a fresh process: after ``reconstruct.warm_up()`` no numba function of the
    flow engine gets a new signature while the segmenter segments (size model, rescaled
    and plain passes), so the warm-up loads what the first image needs."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", WARM_UP_CHECK,
                           str(data_dir / "dsb2018_fluo.tif")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_registering_the_plugin_imports_no_numba_and_its_warm_up_does():
    """Registration stays light (numba's import is ~0.25 s of every process); the registered
    reconstructor's ``warm_up`` imports it, and the reconstructor is the documented one."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from cellplug.plugins import get_registry\n"
        "recon = get_registry().get('reconstructor', 'cellpose-dynamics')\n"
        "get_registry().get('decoder', 'cellpose-flows')\n"
        "assert 'numba' not in sys.modules, 'numba imported at registration'\n"
        "recon.warm_up()\n"
        "assert 'numba' in sys.modules\n"
        "import numpy as np\n"
        "from cellplug_flows.heat import masks_to_flows\n"
        "lab = np.zeros((30, 30), np.int32); lab[5:15, 5:15] = 1\n"
        "flows = masks_to_flows(lab)\n"
        "out = recon(flows, np.where(lab > 0, 4.0, -4.0).astype(np.float32))\n"
        "assert out.dtype == np.uint32 and out.max() == 1\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
