"""cellplug.testing, the plugin contract kit: the bundled plugins and the example test plugin
pass it, and a backbone or reconstructor that breaks its contract fails with a clear message
(issue 24; the OpenVINO backbone's run is in tests/plugins/cellplug_openvino)."""

from __future__ import annotations

import pytest
import torch

from cellplug import hookimpl
from cellplug.plugins import PluginRegistry
from cellplug.testing import (
    BackboneContract,
    DecoderContract,
    ReconstructorContract,
    run_checks,
    subjects_from_env,
)


class TestExampleTinyBackbone(BackboneContract):
    backbone = "example-tiny"
    options = {"n_style": 4}


class TestDefaultBackbone(BackboneContract):
    backbone = "cellpose-unet"
    options = {"nbase": [8, 16, 32, 64]}  # the default layout, narrower: fast


class TestDefaultDecoder(DecoderContract):
    decoder = "cellpose-flows"


class TestDefaultReconstructor(ReconstructorContract):
    reconstructor = "cellpose-dynamics"


class TestExampleReconstructor(ReconstructorContract):
    reconstructor = "example-threshold"


class UnnormalisedStyle(torch.nn.Module):
    def __init__(self, n_channels=2, n_outputs=3):
        super().__init__()
        self.conv = torch.nn.Conv2d(n_channels, n_outputs, 3, padding=1)

    def forward(self, x):
        return self.conv(x), x.mean(dim=(2, 3)) * 3  # style not L2-normalised


def half_labels(flows, cellprob, **params):
    return (cellprob > 0).astype("float32")  # floats, not integer labels


def no_cold_start(flows, cellprob, **params):
    return (cellprob > 0).astype("uint32")


def _needs_an_argument(path):
    raise AssertionError("never called")


no_cold_start.warm_up = _needs_an_argument  # the contract's warm_up() takes no arguments


class Broken:
    @hookimpl
    def register_backbones(self, register):
        register("unnormalised", UnnormalisedStyle)

    @hookimpl
    def register_mask_reconstructors(self, register):
        register("floats", half_labels)
        register("bad-warm-up", no_cold_start)


@pytest.fixture(scope="module")
def registry():
    reg = PluginRegistry()
    reg.load_entry_points()
    assert reg.add_module(Broken(), "broken-on-purpose").ok
    return reg


def test_a_broken_backbone_fails_with_the_reason(registry):
    results = dict(run_checks("backbone", "unnormalised", registry=registry))
    assert "not L2-normalised" in results["check_backbone_forward"]
    assert results["check_backbone_odd_sizes"] is not None


def test_a_broken_reconstructor_fails_with_the_reason(registry):
    results = dict(run_checks("reconstructor", "floats", registry=registry))
    assert "expected integers" in results["check_reconstructor"]
    assert results["check_reconstructor_warm_up"] is None  # it has none: nothing to check
    results = dict(run_checks("reconstructor", "bad-warm-up", registry=registry))
    assert results["check_reconstructor"] is None
    assert "warm_up() failed: TypeError" in results["check_reconstructor_warm_up"]


def test_unknown_plugin_and_bad_environment():
    from cellplug.errors import CellplugError

    with pytest.raises(CellplugError, match="unknown backbone 'nope'"):
        list(run_checks("backbone", "nope"))
    assert subjects_from_env('backbone:openvino:{"base": "example-tiny"};decoder:x') == [
        ("backbone", "openvino", {"base": "example-tiny"}), ("decoder", "x", {})]
    with pytest.raises(ValueError, match="KIND:NAME"):
        subjects_from_env("nonsense")


def test_command_line_report(capsys):
    from cellplug.testing.__main__ import main

    assert main(["reconstructor", "example-threshold"]) == 0
    assert "all checks passed" in capsys.readouterr().out
