"""The Cellpose flow decoder: targets, decoding (flows x 5 convention), loss, registration."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cellplug_flows import flows_to_masks
from cellplug_flows.decoder import FLOW_SCALE, CellposeFlows
from cellplug_flows.heat import masks_to_flows

from cellplug.metrics import average_precision
from cellplug.plugins import get_registry


@pytest.fixture(scope="module")
def decoder() -> CellposeFlows:
    return CellposeFlows()


def test_registered_under_its_names(decoder):
    reg = get_registry()
    assert isinstance(reg.get("decoder", "cellpose-flows"), CellposeFlows)
    recon = reg.get("reconstructor", "cellpose-dynamics")
    # a numba-free stand-in that imports the reconstructor on first use (or warm-up)
    assert recon.__module__ == "cellplug_flows.plugin" and callable(recon.warm_up)
    labels = np.zeros((40, 40), np.int32)
    labels[5:18, 5:18], labels[20:35, 22:38] = 3, 7
    flows = masks_to_flows(labels)
    cellprob = np.where(labels > 0, 4.0, -4.0).astype(np.float32)
    np.testing.assert_array_equal(recon(flows, cellprob, min_size=5),
                                  flows_to_masks(flows, cellprob, min_size=5))


def test_targets_are_foreground_and_unit_flows(decoder, fluo_pair):
    _, labels = fluo_pair
    t = decoder.targets(labels)
    assert t.shape == (3, *labels.shape) and t.dtype == np.float32
    np.testing.assert_array_equal(t[0], (labels > 0).astype(np.float32))
    np.testing.assert_array_equal(t[1:], masks_to_flows(labels))
    assert decoder.n_outputs == 3 and decoder.vector_channels == (1, 2)
    assert len(decoder.target_interpolation) == t.shape[0]


def test_decode_divides_flows_by_five_and_keeps_the_logit(decoder):
    rng = np.random.default_rng(0)
    raw = rng.normal(0, 3, (3, 8, 9)).astype(np.float64)
    flows, cellprob = decoder.decode(raw)
    assert FLOW_SCALE == 5.0
    assert flows.dtype == np.float32 and cellprob.dtype == np.float32
    np.testing.assert_allclose(flows, raw[:2] / 5, rtol=1e-6)
    np.testing.assert_allclose(cellprob, raw[2], rtol=1e-6)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        decoder.decode(raw[:2])


def test_an_ideal_network_output_decodes_to_the_labels(decoder, fluo_pair):
    _, labels = fluo_pair
    t = decoder.targets(labels)
    raw = np.concatenate([FLOW_SCALE * t[1:], np.where(t[:1] > 0, 6.0, -6.0)])
    flows, cellprob = decoder.decode(raw)
    np.testing.assert_allclose(flows, t[1:], atol=1e-6)
    masks = flows_to_masks(flows, cellprob)
    small = np.nonzero(np.bincount(labels.ravel())[1:] < 15)[0] + 1  # dropped by min_size
    kept = np.where(np.isin(labels, small), 0, labels)
    assert average_precision(kept, masks.astype(np.int64), [0.5])[0] == 1.0


def test_loss_is_half_flow_mse_at_scale_5_plus_bce(decoder):
    torch.manual_seed(0)
    raw = torch.randn(2, 3, 6, 7)
    targets = torch.cat([(torch.rand(2, 1, 6, 7) > 0.5).float(), torch.randn(2, 2, 6, 7)], 1)
    expected_flow = ((raw[:, :2] - 5 * targets[:, 1:]) ** 2).mean() / 2
    p = torch.sigmoid(raw[:, 2])
    y = targets[:, 0]
    expected_bce = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    loss = decoder.loss(raw, targets)
    assert loss.ndim == 0
    torch.testing.assert_close(loss, expected_flow + expected_bce, rtol=1e-5, atol=1e-6)


def test_loss_is_smallest_for_the_ideal_output(decoder, fluo_pair):
    _, labels = fluo_pair
    t = torch.from_numpy(decoder.targets(labels))[None]
    ideal = torch.cat([FLOW_SCALE * t[:, 1:], torch.where(t[:, :1] > 0, 20.0, -20.0)], 1)
    worse = ideal.clone()
    worse[:, :2] += 0.5
    assert decoder.loss(ideal, t).item() < 1e-6 < decoder.loss(worse, t).item()
