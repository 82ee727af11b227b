"""flows_to_masks on the foreground pixels' list (the default, masks_from_end_points) gives
exactly the labels of the whole-image steps (sparse=False), whatever the options."""

from __future__ import annotations

import numpy as np
import pytest
from cellplug_flows import flows_to_masks, masks_to_flows


def _sparse_labels(shape=(300, 340), seed=0):
    """A few objects on much background, one ring around another object (hole filling)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.int32)
    for k in range(1, 12):
        cy, cx = rng.integers(20, shape[0] - 20), rng.integers(20, shape[1] - 20)
        r = rng.uniform(6, 14)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = k
    ring = ((yy - 150) ** 2 + (xx - 170) ** 2 < 30**2) & ((yy - 150) ** 2 + (xx - 170) ** 2 > 12**2)
    labels[ring] = 20
    labels[(yy - 150) ** 2 + (xx - 170) ** 2 < 5**2] = 21
    return labels


CASES = [{}, {"min_size": 0}, {"min_size": 400}, {"flow_threshold": 0},
         {"flow_threshold": 0.05}, {"max_size_fraction": 0.005}, {"interp": False},
         {"cellprob_threshold": 1.5}]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("options", CASES, ids=[str(c) for c in CASES])
def test_sparse_equals_whole_image_steps(seed, options):
    rng = np.random.default_rng(seed)
    labels = _sparse_labels(seed=seed)
    flows = masks_to_flows(labels) + rng.normal(0, 0.1, (2, *labels.shape))
    cellprob = np.where(labels > 0, 3.0, -3.0) + rng.normal(0, 1.0, labels.shape)
    flows, cellprob = flows.astype(np.float32), cellprob.astype(np.float32)
    dense = flows_to_masks(flows, cellprob, sparse=False, **options)
    sparse = flows_to_masks(flows, cellprob, **options)
    assert sparse.dtype == dense.dtype == np.uint32
    np.testing.assert_array_equal(sparse, dense)


def test_no_seed_and_no_foreground():
    flows = np.zeros((2, 40, 50), np.float32)
    few = np.full((40, 50), -1.0, np.float32)
    few[3, 4] = 1.0  # one pixel: no histogram bin reaches a seed's count
    for cellprob in (few, np.full((40, 50), -1.0, np.float32)):
        out = flows_to_masks(flows, cellprob)
        assert out.dtype == np.uint32 and out.shape == (40, 50) and not out.any()
        np.testing.assert_array_equal(out, flows_to_masks(flows, cellprob, sparse=False))
