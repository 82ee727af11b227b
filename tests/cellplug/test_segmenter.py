"""The whole pipeline on real test images with a tiny random-weight model."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from cellplug.errors import CellplugError
from cellplug.inference import run_network
from cellplug.models import SizeModel, save_model
from cellplug.plugins import get_registry
from cellplug.segmenter import Segmenter, SegmentOptions, median_diameter, remove_small_objects
from cellplug.transforms import prepare_image


def _tiny_model(folder, image, metadata, seed=0):
    """A small random U-Net whose output layer is rescaled so that it finds objects.

    Random weights give nearly constant outputs; centring and scaling the last 1x1
    convolution (flows ~1 px per step, cell probability spread around 0) turns the random
    features into a flow field with sinks, i.e. masks, on ``image``.
    """
    torch.manual_seed(seed)
    net = (
        get_registry()
        .get("backbone", "cellpose-unet")(
            n_channels=2, n_outputs=3, nbase=(8, 16, 32, 64), diam_mean=17.0
        )
        .eval()
    )
    raw = run_network(net, prepare_image(image), tile=False, precision="fp32").raw
    mean, std = raw.reshape(3, -1).mean(axis=1), raw.reshape(3, -1).std(axis=1)
    scale = torch.tensor([5.0, 5.0, 3.0]) / torch.from_numpy(std)
    conv = net.output[2]
    with torch.no_grad():
        conv.bias.copy_((conv.bias - torch.from_numpy(mean)) * scale + torch.tensor([0, 0, 0.5]))
        conv.weight.mul_(scale[:, None, None, None])
    return save_model(folder / "tiny.pth", net, {"name": "tiny", **metadata})


@pytest.fixture(scope="module")
def fluo(data_dir) -> np.ndarray:
    return tifffile.imread(data_dir / "dsb2018_fluo.tif")


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory, fluo) -> Segmenter:
    folder = tmp_path_factory.mktemp("tiny")
    path = _tiny_model(folder, fluo, {"diam_mean": 17.0, "diam_labels": 20.0})
    return Segmenter.from_model(str(path))


def test_segments_a_real_image_end_to_end(segmenter, fluo):
    result = segmenter.segment(fluo, tile=True)
    assert result.labels.shape == fluo.shape and result.labels.dtype == np.uint32
    n = result.n_objects
    assert n > 0
    np.testing.assert_array_equal(np.unique(result.labels), np.arange(n + 1))  # 0, 1..N
    assert result.flows.shape == (2, *fluo.shape) and result.flows.dtype == np.float32
    assert result.cellprob.shape == fluo.shape and result.cellprob.dtype == np.float32
    assert abs(np.linalg.norm(result.style) - 1) < 1e-5
    # no size model and no diameter: the model's mean training diameter, as Cellpose
    assert result.diameter == 20.0
    assert result.n_tiles == 1
    assert {"prepare", "network", "masks", "total"} <= set(result.timings)
    assert (result.cellprob[result.labels > 0] > 0).mean() > 0.9  # masks sit on cell pixels


def test_default_options_tiles_and_bf16(segmenter, fluo):
    opts = SegmentOptions()
    assert (opts.tile, opts.precision) == (True, "auto")
    default = segmenter.segment(fluo, diameter=17.0)
    exact = segmenter.segment(fluo, diameter=17.0, precision="fp32")
    assert default.labels.shape == fluo.shape
    # bfloat16 moves outputs by a few % of their spread at most
    spread = exact.cellprob.std()
    assert np.median(np.abs(default.cellprob - exact.cellprob)) < 0.05 * spread
    auto = segmenter.segment(fluo, diameter=17.0, tile="auto")
    assert auto.n_tiles == 1 and auto.labels.shape == fluo.shape


def test_explicit_diameter_rescales_and_returns_the_original_size(segmenter, fluo):
    result = segmenter.segment(fluo, diameter=34.0, tile=True)  # rescale 0.5
    assert result.diameter == 34.0
    assert result.labels.shape == result.cellprob.shape == fluo.shape
    small = segmenter.segment(fluo, diameter=34.0, tile=True, resample=False)
    assert small.labels.shape == fluo.shape  # masks at 80 x 80, labels resized back
    assert small.flows.shape == (2, 80, 80)


def test_rgb_image_with_channel_choices(segmenter, data_dir):
    he = tifffile.imread(data_dir / "dsb2018_he.tif")
    assert he.ndim == 3 and he.shape[2] == 3
    for channels in ((0, 0), (2, 3), (1, 0)):
        result = segmenter.segment(he, channels=channels, diameter=17.0, tile=True)
        assert result.labels.shape == he.shape[:2]
    with pytest.raises(CellplugError, match="channel 4 requested"):
        segmenter.segment(he, channels=(4, 0))


def test_tiled_and_whole_image_masks_agree(data_dir):
    """A trained model (the bundled generalist) gives the same objects either way; a random
    field would be too fragile to tell a blending bug from noise."""
    from cellplug.metrics import average_precision

    img = tifffile.imread(data_dir / "usiigaci_phc.tif")  # 2 x 2 tiles
    generalist = Segmenter.from_model("generalist")
    opts = SegmentOptions(diameter=17.0, precision="fp32")
    tiled = generalist.segment(img, opts, tile=True)
    whole = generalist.segment(img, opts, tile=False)
    assert tiled.n_tiles == 4 and whole.n_tiles == 1
    assert tiled.n_objects >= 5
    assert not np.array_equal(tiled.flows, whole.flows)  # two different passes...
    ap = average_precision(tiled.labels.astype(np.int64), whole.labels.astype(np.int64),
                           [0.5, 0.75])
    assert ap.min() >= 0.9, ap  # ...with the same objects (measured 1.0 at both thresholds)


def test_bad_options(segmenter, fluo):
    with pytest.raises(TypeError, match="unknown segmentation option"):
        segmenter.segment(fluo, diamter=3)
    with pytest.raises(CellplugError, match="invalid diameter"):
        segmenter.segment(fluo, diameter=float("nan"))


def test_size_model_estimates_the_diameter(tmp_path, fluo):
    rng = np.random.default_rng(0)
    size = SizeModel(rng.normal(0, 0.05, 64), rng.normal(0, 0.05, 64), 0.1, 17.0)
    path = _tiny_model(
        tmp_path, fluo, {"diam_mean": 17.0, "diam_labels": 17.0, "size_model": size.to_dict()}
    )
    seg = Segmenter.from_model(str(path), threads=1)
    before = torch.get_num_threads()
    result = seg.segment(fluo, tile=True)
    assert torch.get_num_threads() == before  # the thread setting is scoped
    assert "size" in result.timings
    assert np.isfinite(result.diameter) and result.diameter >= 5.0
    # the same computation with the same options: exactly the same diameter, and a measured
    # one (the median mask diameter), not the size model's fallback diam_mean
    assert seg.estimate_diameter(fluo) == result.diameter != 17.0


def test_estimate_without_size_model_is_the_training_diameter(segmenter, fluo):
    assert segmenter.estimate_diameter(fluo) == 20.0


def test_median_diameter_of_disks():
    yy, xx = np.mgrid[:100, :100]
    labels = np.zeros((100, 100), np.int32)
    for k, (cy, cx) in enumerate([(20, 20), (20, 70), (70, 45)], start=1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= 10**2] = k
    assert median_diameter(labels) == pytest.approx(20.0, rel=0.03)
    assert median_diameter(np.zeros((5, 5), np.int32)) == 0.0


def test_remove_small_objects_renumbers():
    labels = np.zeros((10, 10), np.uint32)
    labels[0:4, 0:4] = 5  # 16 px
    labels[6:8, 6:8] = 9  # 4 px
    labels[0:1, 8:10] = 2  # 2 px
    out = remove_small_objects(labels, 4)
    assert sorted(np.unique(out)) == [0, 1, 2]
    assert (out[0:4, 0:4] == 1).all() and (out[6:8, 6:8] == 2).all() and out[0, 9] == 0
    assert remove_small_objects(labels, 0) is labels


def test_labels_made_at_a_smaller_scale_are_filtered_at_the_original_size(segmenter):
    """As Cellpose: min_size applies after the labels are resized back, not before."""
    seen = {}

    def stub(flows, cellprob, **params):
        seen.update(params)
        labels = np.zeros(cellprob.shape, np.uint32)
        labels[2:5, 2:5] = 7  # 9 px here, 36 px at twice the size
        labels[10, 10] = 3  # 1 px here, 4 px at twice the size
        return labels

    seg = Segmenter(segmenter.model, segmenter.net, segmenter.decoder, stub)
    flows, cellprob = np.zeros((2, 20, 20), np.float32), np.zeros((20, 20), np.float32)
    opts = SegmentOptions(min_size=15)
    out = seg.reconstruct(flows, cellprob, 200, opts, shape=(40, 40))
    assert seen["min_size"] == 0
    assert out.shape == (40, 40) and out.max() == 1 and (out == 1).sum() == 36
    same = seg.reconstruct(flows, cellprob, 200, opts)
    assert seen["min_size"] == 15 and same.shape == (20, 20)
