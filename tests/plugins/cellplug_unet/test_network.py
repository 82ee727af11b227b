"""The Cellpose-layout style U-Net: shapes, state-dict layout, options inference."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from cellplug_unet.network import StyleUNet, build_style_unet, options_from_state_dict

from cellplug.plugins import get_registry


@pytest.fixture(scope="module")
def small_net() -> StyleUNet:
    torch.manual_seed(0)
    return StyleUNet(n_channels=2, n_outputs=3, nbase=(8, 16, 32, 64)).eval()


def test_registered_as_cellpose_unet_without_importing_torch():
    """The registered factory builds the network (importing it then), and listing the
    plugins imports no torch (a runtime backbone's warm cache relies on that)."""
    import subprocess
    import sys

    factory = get_registry().get("backbone", "cellpose-unet")
    net = factory(nbase=[8, 16], n_channels=2, n_outputs=3)
    assert isinstance(net, StyleUNet)
    assert factory.accepts_state_dict(net.state_dict())["nbase"] == [8, 16]
    assert factory.accepts_state_dict({}) is None
    code = ("import sys; from cellplug.plugins import get_registry; "
            "get_registry().get('backbone', 'cellpose-unet'); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr[-1000:]


def test_output_shapes_and_unit_style(small_net):
    x = torch.rand(3, 2, 64, 48)
    with torch.inference_mode():
        raw, style = small_net(x)
    assert raw.shape == (3, 3, 64, 48) and raw.dtype == torch.float32
    assert style.shape == (3, 64)
    np.testing.assert_allclose(style.norm(dim=1).numpy(), 1.0, rtol=1e-5)


def test_the_decoder_adds_the_projected_style(small_net):
    """Every style convolution adds ``full(style)`` to its input before convolving, so the
    style vector changes the output; a decoder that dropped it would not notice a new style."""
    from torch.nn import functional as F

    torch.manual_seed(2)
    with torch.inference_mode():
        for name, block in small_net.upsample.named_modules():
            if not hasattr(block, "full"):
                continue
            x = torch.rand(2, block.full.out_features, 8, 8)
            style = F.normalize(torch.randn(2, block.full.in_features), dim=1)
            added = F.linear(style, block.full.weight, block.full.bias)[:, :, None, None]
            np.testing.assert_allclose(block(style, x).numpy(), block.conv(x + added).numpy(),
                                       atol=1e-5, err_msg=name)
        feats = small_net.downsample(torch.rand(1, 2, 32, 32))
        style = small_net.make_style(feats[-1])
        own = small_net.upsample(style, feats)
        other = small_net.upsample(style.roll(1, dims=1), feats)  # same norm, other direction
    assert (own - other).abs().max() > 0.01 * own.abs().max()


def test_batch_items_are_independent_in_eval_mode(small_net):
    x = torch.rand(2, 2, 32, 32)
    with torch.inference_mode():
        both, _ = small_net(x)
        one, _ = small_net(x[1:])
    np.testing.assert_allclose(both[1:].numpy(), one.numpy(), atol=1e-5)


def test_channels_last_gives_the_same_output(small_net):
    x = torch.rand(1, 2, 48, 48)
    net_cl = StyleUNet(n_channels=2, n_outputs=3, nbase=(8, 16, 32, 64)).eval()
    net_cl.load_state_dict(small_net.state_dict())
    net_cl = net_cl.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        a, sa = small_net(x)
        b, sb = net_cl(x.contiguous(memory_format=torch.channels_last))
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
    np.testing.assert_allclose(sa.numpy(), sb.numpy(), atol=1e-6)


def test_state_dict_has_cellpose_cpnet_names():
    """The parameter names Cellpose 3's CPnet uses (default nbase 32..256, sz 3)."""
    state = StyleUNet().state_dict()
    expected = {
        "downsample.down.res_down_0.proj.0.weight",  # batch norm before the 1x1 projection
        "downsample.down.res_down_0.proj.1.weight",
        "downsample.down.res_down_0.conv.conv_0.0.running_var",
        "downsample.down.res_down_0.conv.conv_3.2.weight",
        "downsample.down.res_down_3.conv.conv_3.2.bias",
        "upsample.up.res_up_0.conv.conv_0.2.weight",
        "upsample.up.res_up_0.conv.conv_1.full.weight",  # style projection
        "upsample.up.res_up_0.conv.conv_3.conv.2.weight",
        "upsample.up.res_up_3.proj.1.weight",
        "output.2.weight",
        "diam_mean",
        "diam_labels",
    }
    assert expected <= set(state)
    assert state["downsample.down.res_down_0.conv.conv_0.2.weight"].shape == (32, 2, 3, 3)
    assert state["upsample.up.res_up_0.conv.conv_1.full.weight"].shape == (32, 256)
    assert state["output.2.weight"].shape == (3, 32, 1, 1)
    # the exact name set of Cellpose 3.1.1.2's CPnet([2, 32, 64, 128, 256], 3, sz=3), hashed
    names = "\n".join(sorted(state)).encode()
    assert len(state) == 313
    assert hashlib.sha1(names).hexdigest() == "2ae8b7848bc0e41020401ccda6906c2029e50ee0"


def test_options_from_state_dict_rebuilds_the_architecture():
    net = StyleUNet(n_channels=1, n_outputs=4, nbase=(8, 16, 32), kernel_size=5, diam_mean=17.0)
    opts = options_from_state_dict(net.state_dict())
    assert opts == {"n_channels": 1, "n_outputs": 4, "nbase": [8, 16, 32], "kernel_size": 5,
                    "diam_mean": 17.0}
    rebuilt = build_style_unet(**opts)
    rebuilt.load_state_dict(net.state_dict())  # strict: every name and shape matches


def test_options_from_state_dict_rejects_other_layouts():
    assert options_from_state_dict(torch.nn.Linear(3, 4).state_dict()) is None
    assert options_from_state_dict({}) is None


def test_diameters_are_in_the_state_dict_and_not_trained():
    net = StyleUNet(diam_mean=17.0)
    assert float(net.diam_mean) == 17.0 and float(net.diam_labels) == 17.0
    assert not net.diam_mean.requires_grad and not net.diam_labels.requires_grad


def test_bf16_autocast_stays_close_to_float32(small_net):
    torch.manual_seed(1)
    x = torch.rand(1, 2, 64, 64)
    with torch.inference_mode():
        ref, _ = small_net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, _ = small_net(x)
    err = (low.float() - ref).abs().max().item()
    assert err < 0.05 * ref.abs().max().item() + 1e-3


def test_matches_cellpose_cpnet_when_installed(tmp_path):
    """Only where Cellpose is installed (the parity environment): same weights, same output."""
    resnet = pytest.importorskip("cellpose.resnet_torch")
    torch.manual_seed(3)
    ours = StyleUNet(n_channels=2, n_outputs=3).eval()
    for m in ours.modules():  # non-trivial batch-norm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "w.pth"
    torch.save(ours.state_dict(), path)
    theirs = resnet.CPnet([2, 32, 64, 128, 256], 3, sz=3)
    theirs.load_model(str(path), device=torch.device("cpu"))
    theirs.eval()
    assert set(theirs.state_dict()) == set(ours.state_dict())
    x = torch.rand(2, 2, 96, 96)
    with torch.inference_mode():
        a, sa = ours(x)
        b, sb = theirs(x)[:2]
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
    np.testing.assert_allclose(sa.numpy(), sb.numpy(), atol=1e-6)
