"""Running the backbone on an image: tiled, whole, auto, bf16, batches, augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from cellplug import inference
from cellplug.errors import CellplugError
from cellplug.models import build_network, resolve_model, save_model
from cellplug.plugins import get_registry
from cellplug.transforms import prepare_image


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    """A small random Cellpose-layout network (widths 8-64 instead of 32-256: same structure,
    ~16x fewer operations), loaded through the model files like any other."""
    torch.manual_seed(0)
    small = get_registry().get("backbone", "cellpose-unet")(nbase=(8, 16, 32, 64), diam_mean=17.0)
    path = save_model(tmp_path_factory.mktemp("small") / "small.pth", small.eval(), {"name": "s"})
    return build_network(resolve_model(path))


@pytest.fixture(scope="module")
def phc(data_dir) -> np.ndarray:
    """Usiigaci phase-contrast crop, 256 x 256 -> 272 x 272 padded: 2 x 2 tiles."""
    return prepare_image(tifffile.imread(data_dir / "usiigaci_phc.tif"))


@pytest.fixture(scope="module")
def tiled_and_whole(net, phc):
    return (
        inference.run_network(net, phc, tile=True, precision="fp32"),
        inference.run_network(net, phc, tile=False, precision="fp32"),
    )


def test_output_shapes(tiled_and_whole, phc):
    for out in tiled_and_whole:
        assert out.raw.shape == (3, *phc.shape[1:]) and out.raw.dtype == np.float32
        assert out.style.shape == (64,) and out.style.dtype == np.float32
        assert abs(np.linalg.norm(out.style) - 1) < 1e-5
    tiled, whole = tiled_and_whole
    assert (tiled.n_tiles, tiled.tiled) == (4, True)
    assert (whole.n_tiles, whole.tiled) == (1, False)


def test_tiled_and_whole_image_agree(tiled_and_whole):
    """The same network on the same pixels; only the context differs.

    A tile sees zeros past its edges where the whole image sees neighbouring pixels, and
    the U-Net's receptive field spans more than 100 px, so outputs are not identical. The
    taper blending gives tile edges (the 20 px where context is missing) almost no weight,
    so the typical difference is ~1 % of the output's spread and even the worst pixels stay
    within about one standard deviation. The tolerances below are 3-5x what this random
    network shows (median 1-2 %, 99th percentile 20-30 %, max ~1.5 std).
    """
    tiled, whole = tiled_and_whole
    diff = np.abs(tiled.raw - whole.raw).reshape(3, -1)
    spread = whole.raw.reshape(3, -1).std(axis=1)
    assert np.all(np.median(diff, axis=1) < 0.05 * spread)
    assert np.all(np.percentile(diff, 99, axis=1) < 1.0 * spread)
    assert np.all(diff.max(axis=1) < 4.0 * spread)
    assert float(tiled.style @ whole.style) > 0.999


def test_a_single_tile_is_the_whole_image(net, data_dir):
    img = prepare_image(tifffile.imread(data_dir / "dsb2018_fluo.tif"))  # 160 -> 176 padded
    a = inference.run_network(net, img, tile=True, precision="fp32")
    b = inference.run_network(net, img, tile=False, precision="fp32")
    assert a.n_tiles == 1
    np.testing.assert_allclose(a.raw, b.raw, atol=1e-6)


def test_batch_size_does_not_change_the_result(net, phc, tiled_and_whole):
    one = inference.run_network(net, phc, tile=True, batch_size=1, precision="fp32")
    np.testing.assert_allclose(one.raw, tiled_and_whole[0].raw, atol=1e-6)


def test_auto_tiles_only_when_the_whole_pass_does_not_fit(net, phc):
    assert inference.choose_tiling("auto", (256, 256), budget=10**12) is False
    assert inference.choose_tiling("auto", (256, 256), budget=10**6) is True
    assert inference.choose_tiling(True, (10, 10)) is True
    assert inference.choose_tiling(False, (10**5, 10**5)) is False
    with pytest.raises(CellplugError, match="tile must be"):
        inference.choose_tiling("sometimes", (10, 10))
    small = inference.run_network(net, phc, tile="auto", precision="fp32", memory_budget=10**6)
    assert small.tiled and small.n_tiles == 4
    big = inference.run_network(net, phc, tile="auto", precision="fp32", memory_budget=10**12)
    assert not big.tiled


def test_memory_estimate_scales_with_pixels_and_precision():
    a = inference.whole_image_bytes(1024, 1024, "fp32")
    assert inference.whole_image_bytes(2048, 2048, "fp32") == pytest.approx(4 * a, rel=0.05)
    assert inference.whole_image_bytes(1024, 1024, "bf16") < a


def test_precision_resolution():
    assert inference.resolve_precision("fp32") == "fp32"
    assert inference.resolve_precision("bf16") == "bf16"
    expected = "bf16" if inference.bf16_supported() else "fp32"
    assert inference.resolve_precision("auto") == expected
    with pytest.raises(CellplugError, match="precision must be"):
        inference.resolve_precision("fp8")


def test_bf16_stays_close_to_fp32(net, phc, tiled_and_whole):
    whole = tiled_and_whole[1]
    low = inference.run_network(net, phc, tile=False, precision="bf16")
    assert low.precision == "bf16" and low.raw.dtype == np.float32
    spread = whole.raw.reshape(3, -1).std(axis=1)
    diff = np.abs(low.raw - whole.raw).reshape(3, -1)
    # bfloat16 keeps 8 significant bits: errors of a few % of the spread, not more
    assert np.all(np.median(diff, axis=1) < 0.1 * spread)
    assert abs(np.linalg.norm(low.style) - 1) < 1e-5
    assert float(low.style @ whole.style) > 0.99


def test_augmented_inference(net, phc, tiled_and_whole):
    out = inference.run_network(net, phc, augment=True, precision="fp32")
    assert out.tiled and out.n_tiles == 9 and out.raw.shape == (3, 256, 256)  # 3 x 3, half overlap
    # a random network is not mirror-equivariant: its flow channels carry a constant offset
    # that un-mirroring negates, so only the scalar cell-probability channel is comparable
    ref = tiled_and_whole[0].raw[2]
    assert np.median(np.abs(out.raw[2] - ref)) < 0.2 * ref.std()


class _Gradient(torch.nn.Module):
    """An exactly mirror-equivariant stand-in for a trained network: raw = (d/dY, d/dX, value)
    of the first input channel (central differences, zero padding), style = channel means.

    Mirroring its input along Y mirrors its output and negates d/dY (along X: d/dX), which is
    what un-mirroring augmented tiles assumes of the flow channels."""

    def forward(self, x):
        from torch.nn import functional as F

        v = x[:, :1].contiguous()
        ky = torch.tensor([[0.0, -0.5, 0.0], [0.0, 0.0, 0.0], [0.0, 0.5, 0.0]])[None, None]
        raw = torch.cat([F.conv2d(v, ky, padding=1), F.conv2d(v, ky.transpose(2, 3), padding=1),
                         v], dim=1)
        style = x.mean(dim=(2, 3)) + 1.0
        return raw, style / style.norm(dim=1, keepdim=True)


def test_augmented_inference_restores_every_channel(phc):
    """With an equivariant network, augmented tiles put back (mirrored, flow components
    negated) give exactly the whole-image output in all three channels, away from the tile
    edges where a tile's zero padding stands in for its neighbours' pixels."""
    from cellplug import tiling

    net = _Gradient()
    aug = inference.run_network(net, phc, augment=True, precision="fp32")
    whole = inference.run_network(net, phc, tile=False, precision="fp32")
    padded, (sy, sx) = tiling.pad_image(phc)
    grid = tiling.tile_grid(padded.shape[1], padded.shape[2], augment=True)
    assert grid.flipped and grid.n_tiles == 9 and aug.n_tiles == 9
    edges_y = {y0 + d - sy.start for y0 in grid.ystarts for d in (0, grid.tile_y - 1)}
    edges_x = {x0 + d - sx.start for x0 in grid.xstarts for d in (0, grid.tile_x - 1)}
    rows = np.array([y for y in range(phc.shape[1]) if y not in edges_y])
    cols = np.array([x for x in range(phc.shape[2]) if x not in edges_x])
    assert len(rows) >= 250 and len(cols) >= 250
    got, expected = aug.raw[:, rows][:, :, cols], whole.raw[:, rows][:, :, cols]
    assert np.abs(expected[:2]).max() > 0.1  # the flow channels are not trivially zero
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_bad_input_shape(net):
    with pytest.raises(CellplugError, match=r"network input must be \(C, Y, X\)"):
        inference.run_network(net, np.zeros((32, 32), np.float32))


# -- the helpers around the network, with stand-in networks and hand-computed numbers --------
def _echo_net(calls=None):
    """A stand-in backbone: raw = the input's first channel and its negative, twice the third
    output; style = the per-image means of the two channels (and the batch size it saw)."""

    def net(x):
        if calls is not None:
            calls.append((tuple(x.shape), torch.is_autocast_enabled("cpu")))
        raw = torch.cat([x[:, :1], -x[:, :1], 2 * x[:, 1:2]], 1)
        style = torch.stack([x[:, 0].mean(dim=(1, 2)) + 1, x[:, 1].mean(dim=(1, 2)) + 2,
                             torch.full((x.shape[0],), 3.0)], 1)
        return raw, style

    return net


def test_forward_batches_runs_every_image_once_in_chunks():
    calls = []
    batch = np.arange(5 * 2 * 8 * 8, dtype=np.float32).reshape(5, 2, 8, 8)
    raw, styles = inference.forward_batches(_echo_net(calls), batch, batch_size=2)
    assert [c[0][0] for c in calls] == [2, 2, 1] and not any(c[1] for c in calls)
    assert raw.shape == (5, 3, 8, 8) and styles.shape == (5, 3)
    np.testing.assert_array_equal(raw[:, 0], batch[:, 0])
    np.testing.assert_array_equal(raw[:, 2], 2 * batch[:, 1])
    np.testing.assert_allclose(styles[:, 0], batch[:, 0].mean(axis=(1, 2)) + 1)


def test_an_array_backbone_may_ask_for_bigger_chunks():
    """An array module's own ``batch_size`` raises the chunk size (an engine with several
    streams waits for all of them at the end of each call); it never lowers it."""

    class ArrayEcho:
        takes_arrays = True

        def __init__(self, batch_size):
            self.batch_size, self.calls = batch_size, []

        def __call__(self, x, precision):
            self.calls.append(x.shape[0])
            return x[:, :1] * 2, np.ones((x.shape[0], 3), np.float32) / np.sqrt(3)

    batch = np.arange(11 * 2 * 4 * 4, dtype=np.float32).reshape(11, 2, 4, 4)
    for own, chunks in ((4, [4, 4, 3]), (1, [2, 2, 2, 2, 2, 1]), (None, [2] * 5 + [1])):
        net = ArrayEcho(own)
        raw, styles = inference.forward_batches(net, batch, batch_size=2)
        assert net.calls == chunks
        np.testing.assert_array_equal(raw[:, 0], 2 * batch[:, 0])
        assert styles.shape == (11, 3)


def test_forward_batches_bf16_autocasts_and_renormalises_each_style():
    calls = []

    def net(x):
        calls.append(torch.is_autocast_enabled("cpu"))
        # styles of lengths 5 and 2 (a backbone normalises them itself, in bfloat16)
        return x[:, :1], torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]])

    _, styles = inference.forward_batches(net, np.zeros((2, 1, 8, 8), np.float32),
                                          precision="bf16")
    assert calls == [True] and styles.dtype == np.float32
    np.testing.assert_allclose(styles, [[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]], rtol=1e-6)


def test_whole_image_estimate_by_hand():
    # 100 x 2000 pads to (14 + 100 + 14) x (8 + 2000 + 8) = 128 x 2016 pixels
    assert inference.whole_image_bytes(100, 2000) == 128 * 2016 * 1500
    assert inference.whole_image_bytes(2000, 100) == 2016 * 128 * 1500
    assert inference.whole_image_bytes(100, 2000, "bf16", width=64) == 128 * 2016 * 1000 * 2
    # a wide image is tiled by its own size, not a square of its longer side
    assert inference.choose_tiling("auto", (100, 2000), budget=10**9) is False
    assert inference.choose_tiling("auto", (2000, 100), budget=10**9) is False
    assert inference.choose_tiling("auto", (100, 2000), budget=128 * 2016 * 1500 - 1) is True
    assert inference.choose_tiling(True, (8, 8)) is True
    assert inference.choose_tiling(False, (10**5, 10**5)) is False


def test_available_memory_reads_meminfo_else_sysconf(monkeypatch, tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  9999 kB\nMemFree:  1 kB\nMemAvailable:  2048 kB\n")
    real_open = open

    def fake_open(path, *args, **kwargs):
        if path == "/proc/meminfo":
            return real_open(meminfo, *args, **kwargs)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(inference, "open", fake_open, raising=False)
    assert inference.available_memory() == 2048 * 1024

    def no_meminfo(path, *args, **kwargs):
        raise OSError("no /proc here")

    pages = {"SC_AVPHYS_PAGES": 1000, "SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(inference, "open", no_meminfo, raising=False)
    monkeypatch.setattr(inference.os, "sysconf", lambda name: pages[name])
    assert inference.available_memory() == 1000 * 4096
    monkeypatch.setattr(inference.os, "sysconf", lambda name: 1 / 0 if name else 0)
    with pytest.raises(ZeroDivisionError):  # only OSError, ValueError, AttributeError mean None
        inference.available_memory()


def test_first_width_is_the_first_feature_width_else_32():
    class Net:
        nbase = [16, 32]

    assert inference._first_width(Net()) == 16
    assert inference._first_width(object()) == 32
    Net.nbase = []
    assert inference._first_width(Net()) == 32


def test_run_network_reports_how_it_ran():
    img = np.random.default_rng(0).random((2, 40, 56)).astype(np.float32)
    calls = []
    whole = inference.run_network(_echo_net(calls), img, tile=False, precision="bf16")
    assert (whole.n_tiles, whole.tiled, whole.precision) == (1, False, "bf16")
    assert calls == [((1, 2, 64, 80), True)]  # padded to a multiple of 16 plus 8 each side
    np.testing.assert_allclose(whole.raw[0], img[0], atol=0.01)  # bfloat16 rounding
    calls.clear()
    tiled = inference.run_network(_echo_net(calls), img, tile=True, precision="bf16")
    assert (tiled.n_tiles, tiled.tiled, tiled.precision) == (1, True, "bf16")
    assert calls == [((1, 2, 64, 80), True)]


def test_tiled_style_is_the_normalised_sum_over_tiles():
    """400 x 100 pads to 416 x 128: three 224 x 128 tiles down the image. One bright pixel
    at (0, 0) lies in the first tile only; the stand-in's style is (sum of channel 0, 1, 0)
    per tile, so the tiles give (1, 1, 0), (0, 1, 0), (0, 1, 0): sum (1, 3, 0)."""

    def net(x):
        style = torch.stack([x[:, 0].sum(dim=(1, 2)), torch.ones(x.shape[0]),
                             torch.zeros(x.shape[0])], 1)
        return x, style

    img = np.zeros((2, 400, 100), np.float32)
    img[0, 0, 0] = 1
    out = inference.run_network(net, img, tile=True, precision="fp32")
    assert out.n_tiles == 3 and out.style.dtype == np.float32
    np.testing.assert_allclose(out.style, np.array([1.0, 3.0, 0.0]) / np.sqrt(10), rtol=1e-6)


def test_auto_tiling_estimates_with_the_precision_used():
    img = np.zeros((2, 64, 64), np.float32)  # padded 80 x 80: 9.6 MB in float32, 6.4 MB bf16
    fp32 = inference.run_network(_echo_net(), img, tile="auto", precision="fp32",
                                 memory_budget=8_000_000)
    bf16 = inference.run_network(_echo_net(), img, tile="auto", precision="bf16",
                                 memory_budget=8_000_000)
    assert fp32.tiled is True and bf16.tiled is False
