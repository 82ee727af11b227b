"""The standalone way: `cellplug fiji install` into an ImageJ folder, then the real ImageJ 1.53
run as ``-batch`` subprocesses (with a timeout) whose driver macros call the installed
commands, as a macro a Fiji user recorded would."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
from cellplug_fiji import convert, standalone
from cellplug_sources.imagej_roi import rois_to_labels
from conftest import (
    BIN,
    FLUO,
    FLUO_MASKS,
    MODELS,
    NUCLEI,
    cellplug_cli,
    roiset_of,
    run_imagej,
    segment_reference,
)

from cellplug.errors import CellplugError

SEGMENT_DRIVER = r"""
args = split(getArgument(), "|");
open(args[0]);
run("Properties...", "channels=1 slices=1 frames=1 pixel_width=0.1625 pixel_height=0.325 "
    + "voxel_depth=1.5 unit=micron");
source = getImageID();
run("Segment", "model=@MODEL@ diameter=0 cyto=0 nucleus=0 flow=0.4 cellprob=0");
if (getImageID() == source) exit();
print("title=" + getTitle() + " bitdepth=" + bitDepth());
getVoxelSize(w, h, d, unit);
print("calibration=" + d2s(w, 9) + "," + d2s(h, 9) + "," + d2s(d, 9) + "," + unit);
saveAs("Tiff", args[1] + "labels.tif");
selectImage(source);
print("overlay=" + Overlay.size);
// -batch gives each macro its own ROI Manager: take the ROIs back from the overlay
run("To ROI Manager");
roiManager("Deselect");
roiManager("Save", args[1] + "RoiSet.zip");
"""


@pytest.fixture
def app(tmp_path) -> Path:
    """An ImageJ folder (plugins/) with the Cellplug macros installed by the CLI."""
    folder = tmp_path / "Fiji.app"
    (folder / "plugins").mkdir(parents=True)
    out = cellplug_cli("fiji", "install", folder).stdout
    assert "Segment.ijm" in out and "Train_from_ROI_Manager.ijm" in out
    return folder


def test_install_writes_macros_with_the_cellplug_path_and_uninstall_removes_them(app):
    folder = app / "plugins" / "Cellplug"
    assert sorted(p.name for p in folder.iterdir()) == ["Segment.ijm",
                                                        "Train_from_ROI_Manager.ijm"]
    text = (folder / "Segment.ijm").read_text()
    assert f'var CELLPLUG = "{BIN / "cellplug"}";' in text
    assert 'Dialog.addString("Model", "generalist", 20);' in text
    assert cellplug_cli("fiji", "install", app).returncode == 0  # again: replaced, fine
    out = cellplug_cli("fiji", "uninstall", app).stdout
    assert out.count("removed ") == 2 and not folder.exists()
    assert "not installed" in cellplug_cli("fiji", "uninstall", app).stdout


def test_install_refuses_what_it_did_not_write_and_folders_without_plugins(app, tmp_path):
    other = app / "plugins" / "Cellplug" / "Segment.ijm"
    other.write_text("// someone else's\n")
    with pytest.raises(CellplugError, match="was not written by cellplug-fiji"):
        standalone.install(app)
    assert other.read_text() == "// someone else's\n"
    with pytest.raises(CellplugError, match="left alone"):
        standalone.uninstall(app)
    standalone.install(app, force=True)
    assert standalone.MARKER in other.read_text()
    bad = cellplug_cli("fiji", "install", tmp_path, check=False)
    assert bad.returncode == 1 and "no plugins/ folder" in bad.stderr


def test_batch_segment_equals_cli_with_rois_and_calibration(ij_jar, display, app, tmp_path,
                                                            reference_dir):
    """A -batch driver opens a real image, runs Segment as a recorded macro line would, saves
    what came back: the CLI's labels, one ROI per object, the calibration unchanged, and no
    temporary file left."""
    expected = segment_reference(NUCLEI, reference_dir)
    jtmp = tmp_path / "java-tmp"
    out = tmp_path / "out"
    jtmp.mkdir()
    out.mkdir()
    proc = run_imagej(ij_jar, app, SEGMENT_DRIVER.replace("@MODEL@", "generalist"),
                      f"{NUCLEI}|{out}/", jtmp)
    assert "title=nuclei-labels bitdepth=16" in proc.stdout, (proc.stdout, proc.stderr)
    assert "calibration=0.162500000,0.325000000,1.500000000,micron" in proc.stdout
    labels = tifffile.imread(out / "labels.tif")
    assert labels.dtype == np.uint16
    np.testing.assert_array_equal(labels, expected)
    n = int(expected.max())
    assert f"overlay={n}" in proc.stdout
    rois = convert.read_roiset(out / "RoiSet.zip")
    assert len(rois) == n
    np.testing.assert_array_equal(rois_to_labels(rois, expected.shape), expected)
    assert list(jtmp.iterdir()) == []


def test_batch_wrong_model_shows_the_cli_error_and_leaves_no_temp_files(ij_jar, display, app,
                                                                      tmp_path):
    jtmp = tmp_path / "java-tmp"
    jtmp.mkdir()
    proc = run_imagej(ij_jar, app, SEGMENT_DRIVER.replace("@MODEL@", "no-such-model"),
                      f"{FLUO}|{tmp_path}/", jtmp)
    # -batch has no windows: showMessage prints the message
    assert "cellplug failed:\nerror: unknown model 'no-such-model'; available: " in proc.stdout
    cli = cellplug_cli("segment", FLUO, "--model", "no-such-model", "--out", tmp_path / "x",
                       check=False)
    assert re.search(r"^error: unknown model .*$", cli.stderr, re.M).group(0) in proc.stdout
    assert "title=" not in proc.stdout
    assert list(jtmp.iterdir()) == []


def test_train_from_roi_manager_adds_a_model_that_segments(ij_jar, display, app, tmp_path):
    """Train from ROI Manager on a real image with ROIs from a RoiSet.zip (1 epoch), in
    ImageJ with its windows (-batch would give the macro a ROI Manager of its own): the new
    model is in the zoo and `cellplug segment` runs with it."""
    zipped = roiset_of(tifffile.imread(FLUO_MASKS), tmp_path / "RoiSet.zip")
    jtmp = tmp_path / "java-tmp"
    jtmp.mkdir()
    log = tmp_path / "log.txt"
    driver = r"""
args = split(getArgument(), "|");
open(args[0]);
roiManager("Open", args[1]);
print("rois=" + roiManager("count"));
run("Train from ROI Manager", "base=generalist name=fiji-standalone epochs=1 cyto=0 nucleus=0");
File.saveString(getInfo("log"), args[2]);
close("*");
run("Quit");
"""
    proc = run_imagej(ij_jar, app, driver, f"{FLUO}|{zipped}|{log}", jtmp, gui=True)
    text = log.read_text() if log.exists() else ""
    assert "rois=40" in text, (text, proc.stdout, proc.stderr)
    assert "cellplug: saved model 'fiji-standalone'" in text, (text, proc.stdout, proc.stderr)
    assert (MODELS / "fiji-standalone.pth").is_file()
    assert list(jtmp.iterdir()) == []
    info = cellplug_cli("models", "info", "fiji-standalone", "--json").stdout
    assert '"base_model"' in info and "fiji-standalone" in info
    out = cellplug_cli("segment", FLUO, "--model", "fiji-standalone", "--out", tmp_path / "s",
                       "-q", "--json").stdout
    assert '"objects"' in out
