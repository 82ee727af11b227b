"""Every `segment` and `eval` setting, and every SegmentOptions field, reaches the code.

The bundled generalist segments the real crops of tests/data and examples/nuclei.tif in
float32 (this CPU has native bfloat16, whose rounding would blur exact comparisons). Each
test fails if its setting is ignored, swapped with another or applied the wrong way, using

- known answers: hand-made label pairs for ``eval``, AP against the ground truth, the
  diameter and dynamics steps a scale implies, images built so that the right channel or
  inversion reproduces another run exactly;
- exact or monotonic properties: a higher cell-probability threshold shrinks the foreground,
  a higher flow threshold keeps more objects, ``--min-size m`` removes exactly the objects
  below ``m`` pixels, a batch size never changes the result;
- spies on what the command handed to ``Segmenter.segment`` (the options), to the network
  (``run_network``'s arguments and input, the batches the network saw, the torch threads) and
  to the mask step (the number of dynamics steps), where the setting leaves no other trace.

Command runs and reference segmentations are cached for the module.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from skimage.segmentation import find_boundaries

from cellplug import inference
from cellplug import segmenter as segmenter_module
from cellplug.cli import main
from cellplug.metrics import average_precision, match_counts
from cellplug.segmenter import (
    Segmentation,
    Segmenter,
    SegmentOptions,
    default_niter,
    median_diameter,
    remove_small_objects,
)
from cellplug.transforms import rescaled_shape

DATA = Path(__file__).resolve().parents[1] / "data"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FLUO = DATA / "dsb2018_fluo.tif"  # 160 x 160: one tile at diameter 17 (the model's diam_mean)
PHC = DATA / "usiigaci_phc.tif"  # 256 x 256 (made_images cuts a 256 x 112 strip: 2 tiles)
NUCLEI = EXAMPLES / "nuclei.tif"  # 360 x 360, objects ~51 px


def _labels(path: Path) -> np.ndarray:
    return tifffile.imread(path).astype(np.int64)


def _ap50(truth: np.ndarray, pred: np.ndarray) -> float:
    return float(average_precision(truth.astype(np.int64), pred.astype(np.int64), [0.5])[0])


def _normalised(channel: np.ndarray) -> np.ndarray:
    """The 1st..99th percentile stretch of one channel, computed here independently."""
    x = channel.astype(np.float64)
    lo, hi = np.percentile(x, [1, 99])
    return (x - lo) / (hi - lo)


# -- fixtures: the generalist, reference results, cached command runs --------------------------
@pytest.fixture(scope="module")
def generalist() -> Segmenter:
    seg = Segmenter.from_model("generalist")
    assert seg.model.diam_mean == 17.0  # the scales below assume it
    return seg


@pytest.fixture(scope="module")
def reference(generalist):
    """``reference(path, **options)``: the generalist's Segmentation of an image file with
    SegmentOptions(diameter=17, precision="fp32", **options), called directly."""
    cache: dict[Any, Segmentation] = {}

    def get(path: Path, **changes: Any) -> Segmentation:
        key = (str(path), tuple(sorted(changes.items())))
        if key not in cache:
            cache[key] = generalist.segment(tifffile.imread(path), _options(**changes))
        return cache[key]

    return get


def _options(**changes: Any) -> SegmentOptions:
    """The SegmentOptions the command should build: its defaults, diameter 17, float32."""
    return SegmentOptions(**{"diameter": 17.0, "precision": "fp32", **changes})


@dataclasses.dataclass
class Run:
    """One `cellplug segment` run: its outputs and what the spies saw."""

    masks: np.ndarray
    flows: np.ndarray
    cellprob: np.ndarray
    overlay: np.ndarray
    summary: dict[str, Any]
    options: list[SegmentOptions]  # given to Segmenter.segment
    network: list[dict[str, Any]]  # run_network calls: keyword arguments, input, output
    niter: list[int]  # dynamics steps given to the mask step
    batches: list[int]  # batch sizes the network was called with

    @property
    def n_objects(self) -> int:
        return len(np.unique(self.masks)) - 1


@pytest.fixture(scope="module")
def segment_cli(tmp_path_factory):
    """``segment_cli(image, *args)`` runs `cellplug segment image --json --save flows --save
    cellprob --save overlay *args` (``--precision fp32`` unless given) with spies."""
    cache: dict[Any, Run] = {}

    def run(image: Path, *args: str) -> Run:
        if "--precision" not in args:
            args = (*args, "--precision", "fp32")
        key = (str(image), args)
        if key in cache:
            return cache[key]
        out = tmp_path_factory.mktemp("segment")
        options: list[SegmentOptions] = []
        network: list[dict[str, Any]] = []
        niters: list[int] = []
        batches: list[int] = []
        real_segment, real_reconstruct = Segmenter.segment, Segmenter.reconstruct
        real_run, real_forward = segmenter_module.run_network, inference.forward_batches

        def segment_spy(self, img, opts=None, **overrides):
            options.append(opts)
            return real_segment(self, img, opts, **overrides)

        def run_spy(net, x, **kwargs):
            import torch

            threads = torch.get_num_threads()
            result = real_run(net, x, **kwargs)
            network.append({**kwargs, "input": x, "threads": threads, "n_tiles": result.n_tiles,
                            "tiled": result.tiled, "used_precision": result.precision})
            return result

        def reconstruct_spy(self, flows, cellprob, niter, opts, shape=None, **extra):
            niters.append(niter)
            return real_reconstruct(self, flows, cellprob, niter, opts, shape, **extra)

        def forward_spy(net, batch, batch_size=8, precision="fp32"):
            def counted(x):
                batches.append(int(x.shape[0]))
                return net(x)

            return real_forward(counted, batch, batch_size=batch_size, precision=precision)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Segmenter, "segment", segment_spy)
            mp.setattr(Segmenter, "reconstruct", reconstruct_spy)
            mp.setattr(segmenter_module, "run_network", run_spy)
            mp.setattr(inference, "forward_batches", forward_spy)
            result = CliRunner(catch_exceptions=False).invoke(
                main,
                ["segment", str(image), "--out", str(out), "--json", "-q", "--save", "flows",
                 "--save", "cellprob", "--save", "overlay", *args],
            )
        assert result.exit_code == 0, result.output
        stem = image.stem
        (summary,) = json.loads(result.stdout)["images"]
        cache[key] = Run(
            masks=tifffile.imread(out / f"{stem}_masks.tif"),
            flows=tifffile.imread(out / f"{stem}_flows.tif"),
            cellprob=tifffile.imread(out / f"{stem}_cellprob.tif"),
            overlay=iio.imread(out / f"{stem}_overlay.png"),
            summary=summary,
            options=options,
            network=network,
            niter=niters,
            batches=batches,
        )
        return cache[key]

    return run


@pytest.fixture(scope="module")
def made_images(tmp_path_factory) -> dict[str, Path]:
    """Images built from the fluorescence crop so that a setting has a known answer.

    negative: 255 - crop (dark nuclei on bright), which --invert must turn back into the crop;
    composite: RGB with R = crop, G = negative, B = 0, for --channels;
    strip: the left 112 columns of the phase-contrast crop, 2 x 1 tiles at diameter 17.
    """
    folder = tmp_path_factory.mktemp("made")
    crop = tifffile.imread(FLUO)
    assert crop.dtype == np.uint8 and crop.ndim == 2
    paths = {name: folder / f"{name}.tif" for name in ("negative", "composite", "strip")}
    tifffile.imwrite(paths["strip"], tifffile.imread(PHC)[:, :112])
    tifffile.imwrite(paths["negative"], (255 - crop).astype(np.uint8))
    composite = np.stack([crop, 255 - crop, np.zeros_like(crop)], axis=-1)
    tifffile.imwrite(paths["composite"], composite, photometric="rgb")
    return paths


# -- thresholds --------------------------------------------------------------------------------
FLOW_THRESHOLDS = (0.05, 0.1, 0.2, 0.4)


def test_flow_threshold_keeps_more_objects_as_it_rises(segment_cli, reference):
    runs = {t: segment_cli(FLUO, "--diameter", "17", "--flow-threshold", str(t))
            for t in FLOW_THRESHOLDS}
    for t, run in runs.items():
        assert run.options == [_options(flow_threshold=t)]  # that field, nothing else
        np.testing.assert_array_equal(run.masks, reference(FLUO, flow_threshold=t).labels)
    counts = [runs[t].n_objects for t in FLOW_THRESHOLDS]
    assert counts == sorted(counts) and counts[0] < counts[-1], counts
    # a stricter check only drops whole objects: each object kept at a lower threshold is,
    # pixel for pixel, an object at 0.4
    loose = runs[0.4].masks
    for t in FLOW_THRESHOLDS[:-1]:
        strict = runs[t].masks
        for k in range(1, strict.max() + 1):
            obj = strict == k
            (partner,) = np.unique(loose[obj])
            assert partner > 0 and np.array_equal(obj, loose == partner), (t, k)


CELLPROB_THRESHOLDS = (-1.0, 0.0, 1.0, 2.0)


def test_cellprob_threshold_shrinks_the_foreground(segment_cli, reference):
    runs = {t: segment_cli(FLUO, "--diameter", "17", "--cellprob-threshold", str(t))
            for t in CELLPROB_THRESHOLDS}
    areas = []
    for t, run in runs.items():
        assert run.options == [_options(cellprob_threshold=t)]
        np.testing.assert_array_equal(run.masks, reference(FLUO, cellprob_threshold=t).labels)
        # the network output does not depend on the threshold; the masks sit where it is above
        np.testing.assert_array_equal(run.cellprob, runs[0.0].cellprob)
        fg = run.masks > 0
        assert (run.cellprob[fg] > t).mean() >= 0.999, t  # (hole filling may add a pixel)
        areas.append(int(fg.sum()))
    assert all(a > b for a, b in zip(areas, areas[1:], strict=False)), areas


def test_min_size_removes_exactly_the_objects_below_it(segment_cli, reference):
    every = segment_cli(FLUO, "--diameter", "17", "--min-size", "0")
    assert every.options == [_options(min_size=0)]
    sizes = np.bincount(every.masks.ravel())[1:]
    s = int(sizes[sizes > 15].min())  # the second smallest size the default keeps
    assert sizes.min() < s  # so min-size s drops something
    for m in (s, s + 1, int(np.median(sizes))):
        run = segment_cli(FLUO, "--diameter", "17", "--min-size", str(m))
        assert run.options == [_options(min_size=m)]
        np.testing.assert_array_equal(run.masks, remove_small_objects(every.masks, m))
        assert run.n_objects == int((sizes >= m).sum()) < len(sizes), m
    # an object of exactly m pixels stays; at m + 1 it goes
    dropped = segment_cli(FLUO, "--diameter", "17", "--min-size", str(s)).n_objects - \
        segment_cli(FLUO, "--diameter", "17", "--min-size", str(s + 1)).n_objects
    assert dropped == int((sizes == s).sum()) >= 1


# -- dynamics steps and diameter ---------------------------------------------------------------
def test_default_niter_scales_with_the_diameter():
    """Cellpose: 200 steps at the network's scale, i.e. 200 / rescale at the original size."""
    assert default_niter(1.0) == 200
    assert default_niter(0.5) == 400  # objects twice diam_mean: flows resampled 2x larger
    assert default_niter(2.0) == 100
    assert default_niter(17 / 51) == 600
    assert default_niter(0.5, resample=False) == 200  # masks made at the network's scale


def test_niter_reaches_the_dynamics(segment_cli, reference):
    default = segment_cli(FLUO, "--diameter", "17")
    assert default.niter == [200]
    one = segment_cli(FLUO, "--diameter", "17", "--niter", "1")
    assert one.options == [_options(niter=1)] and one.niter == [1]
    np.testing.assert_array_equal(one.masks, reference(FLUO, niter=1).labels)
    # one step leaves pixels where they started: they do not gather into objects
    assert one.n_objects < default.n_objects // 2, (one.n_objects, default.n_objects)


@pytest.mark.parametrize(("diameter", "size", "niter"), [(34.0, 80, 400), (13.6, 200, 160)])
def test_diameter_sets_the_scale_and_the_steps(segment_cli, diameter, size, niter):
    """diam_mean 17: diameter 34 halves the 160 px crop for the network (and the flows, back at
    full size, need twice the steps), 13.6 enlarges it 1.25 times."""
    run = segment_cli(FLUO, "--diameter", str(diameter))
    assert run.options == [_options(diameter=diameter)]
    assert run.summary["diameter"] == diameter
    (call,) = run.network
    assert call["input"].shape == (2, size, size)
    assert run.niter == [niter]
    assert run.flows.shape == (2, 160, 160) and run.masks.shape == (160, 160)


def test_diameter_zero_uses_the_size_model(segment_cli):
    truth = _labels(EXAMPLES / "nuclei_masks.tif")
    true_d = median_diameter(truth)  # 50.8 px
    run = segment_cli(NUCLEI, "--diameter", "0")
    assert run.options == [_options(diameter=0.0)]
    d = run.summary["diameter"]
    assert d == pytest.approx(true_d, rel=0.1)  # measured 48.6 (float32)
    # the final pass ran at the scale of the estimated diameter, with steps to match
    assert run.network[-1]["input"].shape[1:] == rescaled_shape((360, 360), 17.0 / d)
    assert run.niter[-1] == pytest.approx(200 * d / 17.0, abs=1)
    assert _ap50(truth, run.masks) >= 0.85  # measured 0.889


# -- network settings --------------------------------------------------------------------------
def test_augment_keeps_the_generalist_accurate_on_the_sample(segment_cli):
    """The issue's bug: wrong flow channels un-mirrored under --augment; AP fell to 0.118 and
    nothing failed. Mirrored tiles put back correctly give the flows of the plain pass."""
    truth = _labels(EXAMPLES / "nuclei_masks.tif")
    plain = segment_cli(NUCLEI, "--diameter", "50")
    aug = segment_cli(NUCLEI, "--diameter", "50", "--augment")
    assert aug.options == [_options(diameter=50.0, augment=True)]
    assert [c["augment"] for c in aug.network] == [True]
    assert aug.network[0]["tiled"] and aug.network[0]["n_tiles"] >= 4
    assert [c["augment"] for c in plain.network] == [False]
    assert _ap50(truth, plain.masks) >= 0.85  # measured 0.889
    assert _ap50(truth, aug.masks) >= 0.8  # measured 0.889 (0.0 with the flow channels wrong)
    fg = plain.masks > 0
    for c in range(2):  # Y and X: each must agree in sign and size, not only the cell probability
        r = np.corrcoef(plain.flows[c][fg], aug.flows[c][fg])[0, 1]
        assert r > 0.99, (c, r)  # measured 0.9995 (~0 with the flow channels wrong)
    assert np.corrcoef(plain.cellprob.ravel(), aug.cellprob.ravel())[0, 1] > 0.99


def test_tile_on_off_auto(segment_cli, made_images):
    runs = {mode: segment_cli(made_images["strip"], "--diameter", "17", "--tile", mode)
            for mode in ("on", "off", "auto")}
    expected = {"on": (True, True, 2), "off": (False, False, 1), "auto": ("auto", False, 1)}
    for mode, run in runs.items():
        tile, tiled, n_tiles = expected[mode]
        assert run.options == [_options(tile=tile)]
        (call,) = run.network
        assert (call["tile"], call["tiled"], call["n_tiles"]) == (tile, tiled, n_tiles), mode
    # auto: a 256 x 112 image fits in memory, so it is exactly the whole-image pass
    np.testing.assert_array_equal(runs["auto"].flows, runs["off"].flows)
    np.testing.assert_array_equal(runs["auto"].masks, runs["off"].masks)
    assert not np.array_equal(runs["on"].flows, runs["off"].flows)
    # ...and for a trained model the two ways give the same objects
    ap = average_precision(runs["on"].masks.astype(np.int64), runs["off"].masks.astype(np.int64),
                           [0.5, 0.75])
    assert ap.min() >= 0.9, ap


def test_batch_size_reaches_the_network_and_changes_nothing(segment_cli, made_images):
    strip = made_images["strip"]
    default = segment_cli(strip, "--diameter", "17")
    assert default.batches == [2]  # 2 tiles in one batch of up to 8
    run = segment_cli(strip, "--diameter", "17", "--batch-size", "1")
    assert run.options == [_options(batch_size=1)]
    assert [c["batch_size"] for c in run.network] == [1]
    assert run.batches == [1, 1]
    np.testing.assert_allclose(run.flows, default.flows, atol=1e-5)
    np.testing.assert_array_equal(run.masks, default.masks)


def test_precision_reaches_the_network(segment_cli, reference):
    fp32 = segment_cli(FLUO, "--diameter", "17")
    bf16 = segment_cli(FLUO, "--diameter", "17", "--precision", "bf16")
    auto = segment_cli(FLUO, "--diameter", "17", "--precision", "auto")
    for run, asked, used in ((fp32, "fp32", "fp32"), (bf16, "bf16", "bf16"),
                             (auto, "auto", inference.resolve_precision("auto"))):
        assert run.options == [_options(precision=asked)]
        assert [(c["precision"], c["used_precision"]) for c in run.network] == [(asked, used)]
    # float32 is the reference computation exactly; bfloat16 rounds, a little
    np.testing.assert_array_equal(fp32.cellprob, reference(FLUO).cellprob)
    assert not np.array_equal(bf16.cellprob, fp32.cellprob)
    spread = fp32.cellprob.std()
    assert np.median(np.abs(bf16.cellprob - fp32.cellprob)) < 0.05 * spread
    assert _ap50(fp32.masks, bf16.masks) >= 0.9
    same = bf16 if inference.resolve_precision("auto") == "bf16" else fp32
    np.testing.assert_array_equal(auto.cellprob, same.cellprob)


def test_threads_reach_torch(segment_cli):
    run = segment_cli(FLUO, "--diameter", "17", "--threads", "1")
    assert [c["threads"] for c in run.network] == [1]


# -- image preparation -------------------------------------------------------------------------
def test_channels_pick_the_cyto_and_nucleus_channels(segment_cli, made_images):
    """composite = RGB (crop, 255 - crop, 0): channel 1 is the crop, channel 2 its negative."""
    crop = tifffile.imread(FLUO)
    gray = segment_cli(FLUO, "--diameter", "17")
    negative = segment_cli(made_images["negative"], "--diameter", "17")
    comp = made_images["composite"]
    runs = {ch: segment_cli(comp, "--diameter", "17", "--channels", *map(str, ch))
            for ch in ((1, 0), (2, 0), (1, 2), (2, 1), (1, 3))}
    for ch, run in runs.items():
        assert run.options == [_options(channels=ch)]
    x = {ch: run.network[0]["input"] for ch, run in runs.items()}
    crop_n, neg_n = _normalised(crop), 1 - _normalised(crop)
    np.testing.assert_allclose(x[1, 0][0], crop_n, atol=1e-5)  # 1-based: 1 is the first
    assert not x[1, 0][1].any()  # no nucleus channel: zeros
    np.testing.assert_allclose(x[2, 0][0], neg_n, atol=1e-5)
    np.testing.assert_allclose(x[1, 2][0], crop_n, atol=1e-5)  # (cyto, nucleus), in that order
    np.testing.assert_allclose(x[1, 2][1], neg_n, atol=1e-5)
    np.testing.assert_allclose(x[2, 1][0], neg_n, atol=1e-5)
    np.testing.assert_allclose(x[2, 1][1], crop_n, atol=1e-5)
    # the crop as channel 1 of an RGB image is the crop itself; channel 2 is the negative
    np.testing.assert_array_equal(runs[1, 0].masks, gray.masks)
    np.testing.assert_array_equal(runs[2, 0].masks, negative.masks)
    np.testing.assert_array_equal(runs[1, 3].masks, gray.masks)  # an empty nucleus channel
    assert not np.array_equal(runs[1, 2].cellprob, runs[1, 0].cellprob)  # a nucleus channel counts
    assert not np.array_equal(runs[1, 2].cellprob, runs[2, 1].cellprob)


def test_invert_turns_a_negative_back_into_the_image(segment_cli, made_images, reference):
    crop = tifffile.imread(FLUO)
    plain = segment_cli(FLUO, "--diameter", "17")
    inverted = segment_cli(FLUO, "--diameter", "17", "--invert")
    assert inverted.options == [_options(invert=True)]
    np.testing.assert_allclose(inverted.network[0]["input"][0], 1 - _normalised(crop), atol=1e-5)
    np.testing.assert_array_equal(inverted.masks, reference(FLUO, invert=True).labels)
    assert not np.array_equal(inverted.masks, plain.masks)
    negative = made_images["negative"]
    back = segment_cli(negative, "--diameter", "17", "--invert")
    np.testing.assert_allclose(back.network[0]["input"], plain.network[0]["input"], atol=1e-5)
    np.testing.assert_array_equal(back.masks, plain.masks)
    assert not np.array_equal(segment_cli(negative, "--diameter", "17").masks, plain.masks)


# -- extra outputs -----------------------------------------------------------------------------
def test_saved_cellprob_is_the_cell_probability(segment_cli, reference):
    run = segment_cli(FLUO, "--diameter", "17")
    ref = reference(FLUO)
    assert run.cellprob.shape == (160, 160) and run.cellprob.dtype == np.float32
    np.testing.assert_array_equal(run.cellprob, ref.cellprob)
    for c in range(2):
        assert not np.allclose(run.cellprob, ref.flows[c])
    # on its own: the masks (threshold 0) sit where it is positive, and it is mostly negative
    # off them (a flow component is positive on about half of every object)
    fg = run.masks > 0
    assert (run.cellprob[fg] > 0).mean() >= 0.999
    assert (run.cellprob[~fg] < 0).mean() >= 0.9


def test_saved_flows_are_y_then_x(segment_cli, reference):
    run = segment_cli(FLUO, "--diameter", "17")
    ref = reference(FLUO)
    assert run.flows.shape == (2, 160, 160) and run.flows.dtype == np.float32
    np.testing.assert_array_equal(run.flows, ref.flows)
    # on its own: flows point to each object's centre; component 0 moves along Y, 1 along X
    yy, xx = np.mgrid[:160, :160]
    agree = {(c, axis): [] for c in range(2) for axis in ("y", "x")}
    for k in range(1, run.masks.max() + 1):
        obj = run.masks == k
        to_centre = {"y": yy[obj].mean() - yy[obj], "x": xx[obj].mean() - xx[obj]}
        for (c, axis), hits in agree.items():
            far = np.abs(to_centre[axis]) >= 2
            hits.append(np.sign(run.flows[c][obj][far]) == np.sign(to_centre[axis][far]))
    frac = {key: np.concatenate(v).mean() for key, v in agree.items()}
    assert frac[0, "y"] > 0.95 and frac[1, "x"] > 0.95, frac  # measured 0.997, 0.999
    assert frac[0, "x"] < 0.7 and frac[1, "y"] < 0.7, frac  # unrelated: ~0.5


def test_saved_overlay_outlines_the_saved_masks(segment_cli):
    run = segment_cli(FLUO, "--diameter", "17")
    crop = tifffile.imread(FLUO)
    assert run.overlay.shape == (160, 160, 3) and run.overlay.dtype == np.uint8
    edges = find_boundaries(run.masks, mode="inner")
    assert set(np.unique(run.masks[edges])) == set(range(1, run.masks.max() + 1))
    assert (run.overlay[edges] == (255, 64, 64)).all()
    gray = np.round(np.clip(_normalised(crop), 0, 1) * 255)
    for c in range(3):  # elsewhere: the image, stretched, in gray
        np.testing.assert_allclose(run.overlay[..., c][~edges], gray[~edges], atol=1)


# -- SegmentOptions fields the command does not expose -----------------------------------------
def _network_calls(monkeypatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    real = segmenter_module.run_network

    def spy(net, x, **kwargs):
        out = real(net, x, **kwargs)
        calls.append({**kwargs, "input": x, "n_tiles": out.n_tiles})
        return out

    monkeypatch.setattr(segmenter_module, "run_network", spy)
    return calls


@pytest.mark.parametrize(("bsize", "overlap"), [(64, 0.1), (64, 0.5)])
def test_tile_size_and_overlap(generalist, monkeypatch, bsize, overlap):
    calls = _network_calls(monkeypatch)
    crop = tifffile.imread(FLUO)
    result = generalist.segment(crop, _options(bsize=bsize, tile_overlap=overlap))
    (call,) = calls
    assert (call["bsize"], call["tile_overlap"]) == (bsize, overlap)
    per_axis = math.ceil((1 + 2 * overlap) * 176 / bsize)  # 160 px padded to 176, as Cellpose
    assert call["n_tiles"] == result.n_tiles == per_axis**2  # 16, 36


def test_percentiles(generalist, monkeypatch):
    calls = _network_calls(monkeypatch)
    crop = tifffile.imread(FLUO)
    generalist.segment(crop, _options(percentiles=(0.0, 100.0)))
    generalist.segment(crop, _options(percentiles=(10.0, 90.0)))
    full, narrow = calls[0]["input"][0], calls[1]["input"][0]
    assert (full.min(), full.max()) == (0.0, 1.0)  # min -> 0, max -> 1 exactly
    lo, hi = np.percentile(crop.astype(np.float64), [10, 90])
    np.testing.assert_allclose(narrow, (crop - lo) / (hi - lo), atol=1e-5)


def test_resample_false_makes_masks_at_the_network_scale(generalist, monkeypatch):
    steps = []
    real = Segmenter.reconstruct

    def spy(self, flows, cellprob, niter, opts, shape=None, **extra):
        steps.append((niter, flows.shape))
        return real(self, flows, cellprob, niter, opts, shape, **extra)

    monkeypatch.setattr(Segmenter, "reconstruct", spy)
    crop = tifffile.imread(FLUO)
    small = generalist.segment(crop, _options(diameter=34.0, resample=False))
    full = generalist.segment(crop, _options(diameter=34.0))
    assert steps == [(200, (2, 80, 80)), (400, (2, 160, 160))]
    assert small.flows.shape == (2, 80, 80) and small.labels.shape == (160, 160)
    assert full.flows.shape == (2, 160, 160)


def test_max_size_fraction_drops_the_large_objects(reference):
    every = reference(FLUO, min_size=0).labels
    sizes = np.bincount(every.ravel())[1:]
    fraction = 0.004  # 102.4 of 25600 pixels: about half the objects are larger
    limit = fraction * every.size
    assert 0 < (sizes > limit).sum() < len(sizes)
    capped = reference(FLUO, min_size=0, max_size_fraction=fraction).labels
    keep = np.concatenate([[False], sizes <= limit])
    expected = np.where(keep[every], every, 0)
    # the same objects, renumbered 1..N
    assert capped.max() == int(keep.sum())
    assert average_precision(expected, capped.astype(np.int64), [0.99])[0] == 1.0


# -- eval: per image, pooled over images, per group ---------------------------------------------
def _square(img: np.ndarray, label: int, y: slice, x: slice) -> None:
    img[y, x] = label


def _eval_pairs() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Hand-made (truth, prediction) pairs whose counts are known at every IoU threshold.

    a: 3 true squares; 2 predicted exactly, 1 missed, 1 spurious -> TP 2, FP 1, FN 1
    b: 2 true 10 x 10 squares; one predicted as a 9 x 8 part of it (IoU 0.72: a match up to
       threshold 0.70), one shifted by half (IoU 1/3: never) -> TP 1/0, FP 1/2, FN 1/2
    c: 1 true square, nothing predicted -> TP 0, FP 0, FN 1
    """
    pairs = {}
    t, p = np.zeros((32, 32), np.uint16), np.zeros((32, 32), np.uint16)
    _square(t, 1, slice(2, 8), slice(2, 8))
    _square(t, 2, slice(2, 8), slice(12, 18))
    _square(t, 3, slice(12, 18), slice(2, 8))
    _square(p, 5, slice(2, 8), slice(2, 8))
    _square(p, 9, slice(2, 8), slice(12, 18))
    _square(p, 7, slice(12, 18), slice(12, 18))
    pairs["a"] = (t, p)
    t, p = np.zeros((32, 32), np.uint16), np.zeros((32, 32), np.uint16)
    _square(t, 1, slice(0, 10), slice(0, 10))
    _square(t, 2, slice(0, 10), slice(15, 25))
    _square(p, 1, slice(0, 9), slice(0, 8))
    _square(p, 2, slice(0, 10), slice(20, 30))
    pairs["b"] = (t, p)
    t, p = np.zeros((32, 32), np.uint16), np.zeros((32, 32), np.uint16)
    _square(t, 1, slice(20, 26), slice(20, 26))
    pairs["c"] = (t, p)
    return pairs


# (tp, fp, fn) at IoU 0.50-0.70 and at 0.75-0.95
COUNTS = {"a": ((2, 1, 1), (2, 1, 1)), "b": ((1, 1, 1), (0, 2, 2)), "c": ((0, 0, 1), (0, 0, 1))}
GROUPS = {"a": "g1", "b": "g1", "c": "g2"}


def _expected(stems: list[str]) -> dict[str, Any]:
    """Pooled and mean scores over ``stems``, from the hand counts."""
    th = [round(0.5 + 0.05 * i, 2) for i in range(10)]
    per = {s: [COUNTS[s][0] if t <= 0.70 else COUNTS[s][1] for t in th] for s in stems}
    pooled_ap, mean_ap = {}, {}
    for i, t in enumerate(th):
        tp, fp, fn = (sum(per[s][i][j] for s in stems) for j in range(3))
        pooled_ap[f"{t:.2f}"] = round(tp / (tp + fp + fn), 4)
        mean_ap[f"{t:.2f}"] = np.mean([round(per[s][i][0] / sum(per[s][i]), 4) for s in stems])
    tp, fp, fn = (sum(per[s][0][j] for s in stems) for j in range(3))
    return {"n_images": len(stems), "n_true": tp + fn, "n_pred": tp + fp,
            "pooled_ap": pooled_ap, "mean_ap": mean_ap,
            "precision@0.50": round(tp / (tp + fp), 4) if tp + fp else 1.0,
            "recall@0.50": round(tp / (tp + fn), 4),
            "f1@0.50": round(2 * tp / (2 * tp + fp + fn), 4)}


@pytest.fixture(scope="module")
def eval_report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    truth, pred = folder / "truth", folder / "pred"
    truth.mkdir()
    pred.mkdir()
    for stem, (t, p) in _eval_pairs().items():
        tifffile.imwrite(truth / f"{stem}_masks.tif", t)
        tifffile.imwrite(pred / f"{stem}_masks.tif", p)
    meta = folder / "meta.csv"
    meta.write_text("stem,kind\n" + "".join(f"{s},{g}\n" for s, g in GROUPS.items()))
    docs = {}
    for ext in ("json", "csv"):
        out = folder / f"report.{ext}"
        r = CliRunner().invoke(main, ["eval", str(pred), "--masks", str(truth), "--group-by",
                                      f"{meta}:kind", "--out", str(out), "-q"])
        assert r.exit_code == 0, r.output
        docs[ext] = out
    return json.loads(docs["json"].read_text()), list(csv.DictReader(open(docs["csv"])))


def test_the_hand_made_pairs_have_the_stated_counts():
    for stem, (t, p) in _eval_pairs().items():
        mc = match_counts(t.astype(np.int64), p.astype(np.int64))
        for i, th in enumerate(mc.thresholds):
            assert (mc.tp[i], mc.fp[i], mc.fn[i]) == COUNTS[stem][0 if th <= 0.70 else 1], stem


def test_eval_per_image_rows(eval_report):
    doc, _ = eval_report
    rows = {r["image"]: r for r in doc["images"]}
    assert sorted(rows) == ["a", "b", "c"]
    for stem, row in rows.items():
        (tp, fp, fn), (tp2, fp2, fn2) = COUNTS[stem]
        assert row["group"] == GROUPS[stem]
        assert (row["n_true"], row["n_pred"]) == (tp + fn, tp + fp)
        assert row["ap@0.50"] == row["ap@0.70"] == round(tp / (tp + fp + fn), 4)
        assert row["ap@0.75"] == row["ap@0.95"] == round(tp2 / (tp2 + fp2 + fn2), 4)
        assert row["recall@0.50"] == round(tp / (tp + fn), 4)
    assert rows["a"]["precision@0.50"] == rows["a"]["f1@0.50"] == round(2 / 3, 4)
    assert rows["c"]["precision@0.50"] == 1.0  # nothing predicted, nothing wrong


def test_eval_pools_counts_over_all_images(eval_report):
    """Pooled AP sums TP, FP and FN over the images first: 3 / (3 + 2 + 3) at 0.5."""
    doc, _ = eval_report
    overall, exp = doc["overall"], _expected(["a", "b", "c"])
    assert overall["pooled_ap"]["0.50"] == 0.375 and overall["pooled_ap"]["0.75"] == 0.2222
    assert overall["pooled_ap"] == exp["pooled_ap"]
    assert (overall["n_images"], overall["n_true"], overall["n_pred"]) == (3, 6, 5)
    assert overall["n_true"] == sum(r["n_true"] for r in doc["images"])
    assert overall["n_pred"] == sum(r["n_pred"] for r in doc["images"])
    for key in ("precision@0.50", "recall@0.50", "f1@0.50"):
        assert overall[key] == exp[key], key  # 0.6, 0.5, 0.5455
    assert overall["mean_ap"] == pytest.approx(exp["mean_ap"], abs=1e-4)
    assert overall["mean_ap"]["0.50"] == pytest.approx((0.5 + 1 / 3 + 0) / 3, abs=1e-4)


def test_eval_scores_each_group_on_its_own_images(eval_report):
    doc, _ = eval_report
    assert set(doc["groups"]) == {"g1", "g2"}
    for group, stems in (("g1", ["a", "b"]), ("g2", ["c"])):
        got, exp = doc["groups"][group], _expected(stems)
        assert (got["n_images"], got["n_true"], got["n_pred"]) == \
            (exp["n_images"], exp["n_true"], exp["n_pred"]), group
        assert got["pooled_ap"] == exp["pooled_ap"], group
        assert got["mean_ap"] == pytest.approx(exp["mean_ap"], abs=1e-4), group
        for key in ("precision@0.50", "recall@0.50", "f1@0.50"):
            assert got[key] == exp[key], (group, key)
    assert doc["groups"]["g1"]["pooled_ap"]["0.50"] == round(3 / 7, 4)


def test_eval_csv_has_the_same_numbers(eval_report):
    doc, rows = eval_report
    by_image = {r["image"]: r for r in rows}
    assert set(by_image) == {"a", "b", "c", "group:g1", "group:g2", "overall"}
    for r in doc["images"]:
        assert float(by_image[r["image"]]["ap@0.50"]) == r["ap@0.50"]
        assert int(by_image[r["image"]]["n_true"]) == r["n_true"]
    assert int(by_image["overall"]["n_true"]) == 6 and int(by_image["group:g1"]["n_true"]) == 5
    assert float(by_image["overall"]["ap@0.50"]) == pytest.approx(0.2778, abs=1e-4)  # mean
    assert float(by_image["group:g2"]["ap@0.50"]) == 0.0


def test_eval_segments_with_its_options(tmp_path, reference, monkeypatch):
    """eval with a model: --diameter, --channels and --precision reach the segmenter, and the
    score is that of the generalist's masks against the truth."""
    seen = []
    real = Segmenter.segment

    def spy(self, image, options=None, **overrides):
        seen.append(options)
        return real(self, image, options, **overrides)

    monkeypatch.setattr(Segmenter, "segment", spy)
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(FLUO, images / FLUO.name)
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["eval", str(images), "--masks", str(DATA), "--diameter", "17",
                                  "--channels", "1", "0", "--precision", "fp32", "--out",
                                  str(out), "-q"])
    assert r.exit_code == 0, r.output
    (opts,) = seen
    assert (opts.diameter, tuple(opts.channels), opts.precision) == (17.0, (1, 0), "fp32")
    (row,) = json.loads(out.read_text())["images"]
    truth = _labels(DATA / "dsb2018_fluo_masks.tif")
    assert row["ap@0.50"] == round(_ap50(truth, reference(FLUO).labels), 4)
    assert row["ap@0.50"] >= 0.65  # measured 0.702 at this (too large) diameter
