"""The command line runs any registered plugin: train --backbone/--backbone-option/--decoder,
segment and eval --backbone/--reconstructor, recorded in the model's metadata and summary.json
(issue 24). Uses the example test plugin's backbone and reconstructor."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from cellplug.cli import main
from cellplug.plugins import set_registry


@pytest.fixture(autouse=True)
def fresh_registry():
    set_registry(None)
    yield
    set_registry(None)


def run(*args, code: int = 0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, (result.exit_code, result.output)
    return result


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, data_dir):
    """example-tiny trained for one epoch through `cellplug train --backbone example-tiny`."""
    set_registry(None)
    tmp = tmp_path_factory.mktemp("tiny")
    src = tmp / "src"
    src.mkdir()
    for stem in ("dsb2018_fluo", "dsb2018_bf"):
        for suffix in ("", "_masks"):
            shutil.copy(data_dir / f"{stem}{suffix}.tif", src / f"{stem}{suffix}.tif")
    out = tmp / "tiny.pth"
    result = run("train", src, "--out", out, "--backbone", "example-tiny", "--backbone-option",
                 "n_style=4", "--decoder", "cellpose-flows", "--epochs", "1", "--patch", "48",
                 "--size-epochs", "1", "--threads", "1", "--diam-mean", "17", "-q")
    assert "saved" in result.output
    set_registry(None)
    return out


def test_train_records_the_backbone_and_its_options(tiny_model):
    meta = json.loads(tiny_model.with_suffix(".json").read_text())
    assert meta["backbone"] == "example-tiny" and meta["decoder"] == "cellpose-flows"
    assert meta["backbone_options"]["n_style"] == 4
    assert len(meta["style_centroid"]) == 4  # the trained net really has 4 style channels


def test_segment_uses_the_trained_plugin_backbone(tiny_model, data_dir, tmp_path):
    out = tmp_path / "out"
    run("segment", data_dir / "dsb2018_fluo.tif", "--model", tiny_model, "--out", out,
        "--diameter", "17", "--json", "-q")
    doc = json.loads((out / "summary.json").read_text())
    assert doc["backbone"] == "example-tiny" and doc["reconstructor"] == "cellpose-dynamics"
    assert doc["backbone_options"]["n_style"] == 4
    labels = tifffile.imread(out / "dsb2018_fluo_masks.tif")
    assert labels.shape == tifffile.imread(data_dir / "dsb2018_fluo.tif").shape[:2]


def test_segment_reconstructor_option(data_dir, tmp_path):
    out = tmp_path / "out"
    run("segment", data_dir / "dsb2018_fluo.tif", "--out", out, "--diameter", "17",
        "--reconstructor", "example-threshold", "--precision", "fp32", "--json", "-q")
    doc = json.loads((out / "summary.json").read_text())
    assert doc["reconstructor"] == "example-threshold" and doc["backbone"] == "cellpose-unet"
    labels = tifffile.imread(out / "dsb2018_fluo_masks.tif")
    cellprob_components = labels.max()
    assert cellprob_components > 0
    # connected components of cellprob > 0: each label is one 4-connected region
    from scipy import ndimage

    for i in range(1, int(labels.max()) + 1):
        assert ndimage.label(labels == i)[1] == 1


def test_eval_records_the_plugins(data_dir, tmp_path):
    report = tmp_path / "r.json"
    run("eval", data_dir / "dsb2018_fluo.tif", "--masks", data_dir, "--diameter", "17",
        "--reconstructor", "example-threshold", "--out", report, "-q")
    assert json.loads(report.read_text())["plugins"]["reconstructor"] == "example-threshold"


def test_backbone_that_cannot_load_the_weights_is_refused(data_dir, tmp_path):
    r = run("segment", data_dir / "dsb2018_fluo.tif", "--out", tmp_path, "--backbone",
            "example-tiny", code=1)
    assert "weights do not fit backbone 'example-tiny' (they are for backbone 'cellpose-unet')" \
        in r.output
    assert not list(tmp_path.iterdir())
    r = run("segment", data_dir / "dsb2018_fluo.tif", "--out", tmp_path, "--backbone", "nope",
            code=1)
    assert "unknown backbone 'nope'" in r.output
    r = run("segment", data_dir / "dsb2018_fluo.tif", "--reconstructor", "nope", code=1)
    assert "unknown reconstructor 'nope'" in r.output


def test_bad_choices_are_usage_errors(data_dir, tmp_path):
    r = run("segment", data_dir / "dsb2018_fluo.tif", "--backbone-option", "novalue", code=2)
    assert "is not KEY=VALUE" in r.output
    r = run("segment", data_dir / "dsb2018_fluo.tif", "--model", "auto", "--reconstructor",
            "example-threshold", code=2)
    assert "not to --model auto" in r.output
    r = run("train", data_dir, "--out", tmp_path / "m.pth", "--base", "generalist",
            "--backbone", "example-tiny", code=2)
    assert "fine-tuning keeps the base model's architecture" in r.output


def test_plugins_list_shows_the_models_each_backbone_runs(tiny_model, monkeypatch):
    monkeypatch.setenv("CELLPLUG_MODELS", str(tiny_model.parent))
    rows = json.loads(run("plugins", "list", "--kind", "backbone", "--json").stdout)
    by_name = {r["name"]: r for r in rows if r["kind"] == "backbone"}
    assert "generalist" in by_name["cellpose-unet"]["models"]
    assert by_name["example-tiny"]["models"] == ["tiny"]
    table = run("plugins", "list", "--kind", "backbone").stdout
    assert "models each backbone runs:" in table
    assert any(line.split()[:2] == ["example-tiny", "tiny"] for line in table.splitlines())


def test_with_backbone_keeps_the_weights_layout():
    from cellplug.models import resolve_model, with_backbone

    info = resolve_model("generalist")
    assert with_backbone(info) is info
    same = with_backbone(info, None, {"nbase": [32, 64, 128, 256]})
    assert same.backbone == "cellpose-unet" and same.metadata["backbone_options"]["nbase"]
    assert info.metadata.get("backbone_options", {}).get("nbase") is None  # not mutated
    assert np.isclose(same.diam_mean, info.diam_mean)


def test_from_a_runtime_backbone_back_to_its_torch_base(tmp_path):
    """A model saved with a runtime backbone (its base in backbone_options) runs again with
    the torch backbone its weights are for."""
    from cellplug import hookimpl
    from cellplug.models import ModelInfo, with_backbone
    from cellplug.plugins import PluginRegistry

    def build(n_channels=2, n_outputs=3, *, base="cellpose-unet", **options):
        raise AssertionError("not built here")

    build.runs = "*"
    build.inference_only = True

    class Plugin:
        @hookimpl
        def register_backbones(self, register):
            register("fast", build)

    registry = PluginRegistry()
    registry.load_entry_points()
    assert registry.add_module(Plugin(), "fast-plugin").ok
    info = ModelInfo("m", tmp_path / "m.pth", {"backbone": "fast", "backbone_options": {
        "base": "example-tiny", "n_style": 4}})
    back = with_backbone(info, "example-tiny", None, registry)
    assert back.backbone == "example-tiny"
    assert back.metadata["backbone_options"] == {"n_style": 4}
    assert back.metadata["weights_backbone"] == "example-tiny"
    again = with_backbone(back, "fast", None, registry)
    assert again.metadata["backbone_options"]["base"] == "example-tiny"
