"""The whole pipeline on real test images with a tiny random-weight model."""

from __future__ import annotations

import threading
import time

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


def test_median_diameter_skips_absent_ids_and_counts_every_object():
    """Squares of 4, 9 and 16 px under ids 1, 5 and 9: the median area is 9, so the median
    diameter is that of a 9 px disk, 3 / (sqrt(pi) / 2) = 3.385 px."""
    labels = np.zeros((20, 20), np.int32)
    labels[0:2, 0:2] = 1
    labels[5:8, 5:8] = 5
    labels[12:16, 12:16] = 9
    assert median_diameter(labels) == pytest.approx(3 / (np.sqrt(np.pi) / 2), rel=1e-12)
    labels[0:2, 0:2] = 0  # two objects left: the median of 3 and 4
    assert median_diameter(labels) == pytest.approx(3.5 / (np.sqrt(np.pi) / 2), rel=1e-12)


def test_remove_small_objects_at_one_pixel_keeps_all_and_renumbers():
    labels = np.zeros((4, 4), np.uint32)
    labels[0, 0], labels[3, 3] = 2, 5
    out = remove_small_objects(labels, 1)
    assert out[0, 0] == 1 and out[3, 3] == 2 and out.sum() == 3


def test_rescale_memory_limit_and_its_message(monkeypatch):
    """40 bytes per rescaled pixel: an 8192 x 8192 image needs 2.5 GiB."""
    from cellplug.segmenter import check_rescale

    monkeypatch.setenv("CELLPLUG_MAX_IMAGE_GIB", "1")
    with pytest.raises(CellplugError, match=r"8192 x 8192 pixels, needing about 2\.5 GiB "
                                            r"\(limit 1 GiB"):
        check_rescale((8192, 8192), 30.0, 30.0)
    assert check_rescale((4096, 6000), 30.0, 30.0) == 1.0  # 0.92 GiB fits
    with pytest.raises(CellplugError, match="about 1.8 GiB"):  # enlarged twice
        check_rescale((3000, 4000), 30.0, 15.0)  # 6000 x 8000 x 40 B = 1.79 GiB


def test_default_niter_without_resampling_is_200():
    from cellplug.segmenter import default_niter

    assert default_niter(0.5, resample=False) == 200
    assert default_niter(2.0, resample=False) == 200
    assert default_niter(0.5) == 400 and default_niter(2.0) == 100


def test_a_decoder_without_vector_channels_gets_cellposes(segmenter):
    class Plain:
        n_outputs = 3

    seg = Segmenter(segmenter.model, segmenter.net, Plain(), segmenter.reconstructor)
    assert seg.vector_channels == (0, 1)
    assert Segmenter(segmenter.model, segmenter.net, segmenter.decoder,
                     segmenter.reconstructor).vector_channels == (0, 1)


# -- the composition, with stand-in decoders and reconstructors --------------------------------
def _with_size_model(segmenter, reconstructor):
    """The tiny segmenter with a size model that always guesses 17 px (A = 0, ymean = 0)."""
    import dataclasses

    size = {"A": [0.0] * 64, "smean": [0.0] * 64, "ymean": 0.0, "diam_mean": 17.0}
    model = dataclasses.replace(segmenter.model,
                                metadata={**segmenter.model.metadata, "size_model": size})
    return Segmenter(model, segmenter.net, segmenter.decoder, reconstructor)


def _one_square(flows, cellprob, **params):
    labels = np.zeros(cellprob.shape, np.uint32)
    labels[:10, :10] = 1  # 100 px: a disk of the same area is 11.28 px across
    return labels


def test_size_estimate_is_the_median_mask_diameter_else_the_size_models(segmenter, fluo):
    seg = _with_size_model(segmenter, _one_square)
    d100 = 10 / (np.sqrt(np.pi) / 2)
    assert seg.estimate_diameter(fluo) == pytest.approx(d100)
    result = seg.segment(fluo, diameter=0)
    assert result.diameter == pytest.approx(d100)
    t = result.timings
    assert set(t) == {"prepare", "size", "network", "masks", "total"}
    assert all(v >= 0 for v in t.values())
    assert t["prepare"] + t["size"] + t["network"] + t["masks"] <= t["total"] + 1e-6
    nothing = _with_size_model(segmenter, lambda flows, cellprob, **p: np.zeros(
        cellprob.shape, np.uint32))
    assert nothing.estimate_diameter(fluo) == 17.0  # no masks: the size model's diam_mean


def test_decoder_contract_is_checked(segmenter):
    raw = np.zeros((3, 8, 8), np.float32)

    class WrongFlows:
        vector_channels = (1, 2)

        def decode(self, raw):
            return np.zeros((2, 4, 4), np.float32), np.zeros((8, 8), np.float32)

    class Raises(WrongFlows):
        def decode(self, raw):
            raise ValueError("no")

    for decoder in (WrongFlows(), Raises()):
        seg = Segmenter(segmenter.model, segmenter.net, decoder, segmenter.reconstructor)
        with pytest.raises(CellplugError, match="broke its contract"):
            seg.decode(raw)


def test_reconstructor_gets_the_options_and_its_contract_is_checked(segmenter):
    seen = {}

    def spy(flows, cellprob, **params):
        seen.update(params)
        return np.zeros(cellprob.shape, np.uint32)

    opts = SegmentOptions(cellprob_threshold=-1.5, flow_threshold=0.7, min_size=9,
                          max_size_fraction=0.25)
    flows, cellprob = np.zeros((2, 6, 6), np.float32), np.zeros((6, 6), np.float32)
    Segmenter(segmenter.model, segmenter.net, segmenter.decoder, spy).reconstruct(
        flows, cellprob, 123, opts)
    assert seen == {"niter": 123, "cellprob_threshold": -1.5, "flow_threshold": 0.7,
                    "min_size": 9, "max_size_fraction": 0.25}

    def wrong_shape(flows, cellprob, **params):
        return np.zeros((3, 3), np.uint32)

    seg = Segmenter(segmenter.model, segmenter.net, segmenter.decoder, wrong_shape)
    with pytest.raises(CellplugError, match="reconstructor 'wrong_shape' broke its contract"):
        seg.reconstruct(flows, cellprob, 1, opts)


def test_network_gets_the_threads_and_the_decoders_vector_channels(segmenter, fluo,
                                                                   monkeypatch):
    """torch's thread count is recorded, not changed (a real 3-thread OpenMP team would make
    the forked processes of `nox -s mutate` hang)."""
    import cellplug.segmenter as segmenter_module

    seen, threads = {}, [1]
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads[-1])
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    real = segmenter_module.run_network

    def spy(net, x, **kw):
        seen.update(kw, threads=torch.get_num_threads())
        return real(net, x, **kw)

    class Rotated:
        n_outputs = 3
        vector_channels = (2, 3)  # targets: foreground, cellprob-like, then the flow pair

        def decode(self, raw):
            return raw[1:], raw[0]

    monkeypatch.setattr(segmenter_module, "run_network", spy)
    seg = Segmenter(segmenter.model, segmenter.net, Rotated(), segmenter.reconstructor,
                    threads=3)
    prepared = seg.prepare(fluo[:64, :64], SegmentOptions())
    seg.network(prepared, 1.0, SegmentOptions(precision="fp32"))
    assert seen["vector_channels"] == (1, 2) and seen["threads"] == 3
    assert threads == [1, 3, 1]  # set for the network, then restored


def test_from_model_looks_in_the_given_registry(tmp_path, fluo):
    import types

    from cellplug import hookimpl
    from cellplug.plugins import PluginRegistry

    path = _tiny_model(tmp_path, fluo, {"diam_mean": 17.0})
    reg = PluginRegistry()
    reg.load_entry_points()
    reg.add_module(types.SimpleNamespace(
        __name__="only_here",
        register_models=hookimpl(lambda register: register("only-here", str(path)))),
        "only_here")
    seg = Segmenter.from_model("only-here", registry=reg)
    assert seg.model.name == "only-here" and seg.model.weights == path
    with pytest.raises(CellplugError, match="unknown model 'only-here'"):
        Segmenter.from_model("only-here")


def test_segment_on_a_small_crop_uses_the_size_estimate_and_times_each_step(segmenter, fluo):
    seg = _with_size_model(segmenter, _one_square)
    result = seg.segment(fluo[:48, :64], diameter=0, precision="fp32")
    assert result.diameter == pytest.approx(10 / (np.sqrt(np.pi) / 2))  # one 100 px mask
    t = result.timings
    assert set(t) == {"prepare", "size", "network", "masks", "total"}
    assert all(0 <= v < 60 for v in t.values())
    assert t["prepare"] + t["size"] + t["network"] + t["masks"] <= t["total"] + 1e-6


@pytest.mark.parametrize("diameter", [float("inf"), float("nan"), -3.0])
def test_check_rescale_refuses_diameters_that_are_not_positive_numbers(diameter):
    from cellplug.segmenter import check_rescale

    with pytest.raises(CellplugError, match="invalid diameter .*: must be a positive number"):
        check_rescale((64, 64), 17.0, diameter)
    assert check_rescale((64, 64), 17.0, 34.0) == 0.5


@pytest.mark.parametrize("resample", [True, False])
def test_remask_reruns_only_the_reconstruction_and_matches_segment(segmenter, fluo, monkeypatch,
                                                                   resample):
    """Other thresholds on the stored network output give segment()'s labels, without the
    network (as the GUIs re-run the masks when a threshold changes)."""
    first = segmenter.segment(fluo, diameter=20.0, precision="fp32", resample=resample)
    assert first.resampled is resample
    other = {"cellprob_threshold": -1.0, "flow_threshold": 0.8, "min_size": 5}
    expected = segmenter.segment(fluo, diameter=20.0, precision="fp32", resample=resample,
                                 **other)
    assert expected.n_objects and first.n_objects  # not all empty, and
    assert (expected.labels > 0).sum() > (first.labels > 0).sum()  # the thresholds matter

    def no_network(*args, **kwargs):
        raise AssertionError("remask ran the network")

    monkeypatch.setattr(segmenter, "network", no_network)
    again = segmenter.remask(first, **other)
    np.testing.assert_array_equal(again.labels, expected.labels)
    assert again.flows is first.flows and again.cellprob is first.cellprob
    assert again.diameter == first.diameter and again.resampled is resample
    assert set(again.timings) == {"masks", "total"}
    same = segmenter.remask(again, SegmentOptions(precision="fp32"))  # the defaults back
    np.testing.assert_array_equal(same.labels, first.labels)
    with pytest.raises(TypeError, match="unknown segmentation option"):
        segmenter.remask(first, threshold=2)


def test_a_reconstructors_warm_up_runs_once_in_the_background_before_its_first_call(
        segmenter, fluo):
    events: list[tuple[str, str]] = []

    def recon(flows, cellprob, **params):
        events.append(("call", threading.current_thread().name))
        return np.zeros(cellprob.shape, np.uint32)

    def warm_up():
        time.sleep(0.3)  # longer than the tiny network pass: the call must wait for it
        events.append(("warm_up", threading.current_thread().name))

    recon.warm_up = warm_up
    seg = Segmenter(segmenter.model, segmenter.net, segmenter.decoder, recon)
    seg.segment(fluo, diameter=17.0)
    seg.segment(fluo, diameter=17.0)
    main = threading.current_thread().name
    assert events == [("warm_up", "cellplug-warm-up"), ("call", main), ("call", main)]


def test_a_failing_warm_up_is_ignored(segmenter, fluo, monkeypatch):
    escaped = []
    monkeypatch.setattr(threading, "excepthook", escaped.append)

    def warm_up():
        raise RuntimeError("no JIT here")

    def recon(flows, cellprob, **params):
        return segmenter.reconstructor(flows, cellprob, **params)

    recon.warm_up = warm_up
    seg = Segmenter(segmenter.model, segmenter.net, segmenter.decoder, recon)
    np.testing.assert_array_equal(seg.segment(fluo, diameter=17.0).labels,
                                  segmenter.segment(fluo, diameter=17.0).labels)
    assert not escaped  # nothing printed from the thread either
