"""The U-Net against Cellpose 3.1.1.2's CPnet, through the committed golden fixtures.

One plain forward pass (``dsb2018_fluo`` normalised and padded, 176 x 176: a single tile,
so Cellpose's ``core.run_net`` ran exactly this pass) of the bundled generalist and of the
fixtures' random model, float32, against ``tests/data/golden/network.npz``. No Cellpose
needed; see ``tests/data/golden/README.md``.

Tolerances: raw outputs (5 x flows and the cell-probability logit, up to ~20 in size) are
stored in float16, so ``1e-3 + 2^-11 |golden|``: the float16 rounding plus float32 noise
(cellplug and Cellpose agree to ~2e-5 here). The style vector (unit length, 256 values of
~0.06) is stored in float32: ``1e-5``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cellplug_testutils import load_data_module
from cellplug_unet.network import StyleUNet, build_style_unet, options_from_state_dict

from cellplug.tiling import pad_image
from cellplug.transforms import prepare_image

gs = load_data_module("golden/golden_support.py")
WEIGHTS = Path(__file__).resolve().parents[3] / "plugins/cellplug_zoo/weights/generalist.pth"
RAW_ATOL = 1e-3
STYLE_ATOL = 1e-5


def random_state() -> dict[str, torch.Tensor]:
    """The fixtures' random model as a torch state dict (all keys of a fresh network)."""
    return gs.random_model_torch_state(StyleUNet().state_dict())


@pytest.fixture(scope="module")
def nets() -> dict[str, StyleUNet]:
    out = {}
    for model, state in (
        ("generalist", torch.load(WEIGHTS, map_location="cpu", weights_only=True)),
        ("random", random_state()),
    ):
        net = build_style_unet(**options_from_state_dict(state))
        net.load_state_dict(state)
        out[model] = net.eval()
    return out


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    return gs.load("network")


def test_random_model_is_the_fixtures_model():
    """numpy's seeded stream + the stored output layer rebuild the exact weights Cellpose ran."""
    state = {k: v.numpy() for k, v in random_state().items() if "num_batches" not in k}
    assert gs.state_digest(state) == gs.manifest()["models"]["random"]["state_sha256"]


@pytest.mark.parametrize("model", ["generalist", "random"])
def test_forward_pass_matches_cellpose(nets, golden, model):
    key = f"{model}/dsb2018_fluo/whole"
    padded, (sy, sx) = pad_image(prepare_image(gs.image("dsb2018_fluo")))
    assert padded.shape[1:] == (176, 176)
    with torch.inference_mode():
        raw, style = nets[model](torch.from_numpy(padded[None]))
    raw = raw[0].numpy()[:, sy, sx]
    gs.assert_close(raw, golden[f"{key}/raw"], RAW_ATOL, f"{key} raw")
    gs.assert_close(style[0].numpy(), golden[f"{key}/style"], STYLE_ATOL, f"{key} style")
    # the comparison means something: the outputs span the range of real predictions
    assert np.abs(golden[f"{key}/raw"]).max() > 5.0
