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


def test_bad_input_shape(net):
    with pytest.raises(CellplugError, match=r"network input must be \(C, Y, X\)"):
        inference.run_network(net, np.zeros((32, 32), np.float32))
