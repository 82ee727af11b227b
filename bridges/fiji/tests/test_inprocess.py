"""The in-process way against the real ImageJ 1.53 in this process: exact conversion, the
Plugins > Cellplug menu items' callbacks, macros and the recorder, training and cancelling."""

from __future__ import annotations

import threading
import time

import jpype
import numpy as np
import pytest
import tifffile
from cellplug_fiji import commands, convert, imagej1
from conftest import (
    FLUO,
    FLUO_MASKS,
    MODELS,
    NUCLEI,
    click,
    find_window,
    open_image,
    press_ok,
    roiset_of,
    segment_reference,
)

SEGMENT_OPTIONS = "model=generalist diameter=0 cyto=0 nucleus=0 flow=0.4 cellprob=0"


def _imageplus(data: np.ndarray, rgb: bool = False):
    """An ImagePlus built by ImageJ's own processors from (T, Z, Y, X, C) ``data``."""
    from ij import ImagePlus, ImageStack
    from ij.process import ByteProcessor, ColorProcessor, FloatProcessor, ShortProcessor

    n_t, n_z, h, w, n_c = data.shape
    stack = ImageStack(w, h)
    for t in range(n_t):
        for z in range(n_z):
            for c in range(1 if rgb else n_c):  # ImageJ's order: channel, slice, frame
                plane = np.ascontiguousarray(data[t, z, :, :, c]).ravel()
                if rgb:
                    px = data[t, z].astype(np.int32)
                    argb = (px[..., 0] << 16 | px[..., 1] << 8 | px[..., 2]).ravel()
                    ip = ColorProcessor(w, h, jpype.JArray(jpype.JInt)(argb))
                elif data.dtype == np.uint8:
                    ip = ByteProcessor(w, h, jpype.JArray(jpype.JByte)(plane.view(np.int8)))
                elif data.dtype == np.uint16:
                    ip = ShortProcessor(w, h, jpype.JArray(jpype.JShort)(plane.view(np.int16)),
                                        None)
                else:
                    ip = FloatProcessor(w, h, jpype.JArray(jpype.JFloat)(plane))
                stack.addSlice(None, ip)
    imp = ImagePlus("made", stack)
    imp.setDimensions(1 if rgb else n_c, n_z, n_t)
    return imp


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_imageplus_to_array_is_exact(ij, dtype):
    """Every pixel type, full value range (uint16 above 32767: Java's shorts are signed), and
    a hyperstack's geometry (2 channels, 3 slices, 2 frames) come across unchanged."""
    rng = np.random.default_rng(1)
    if dtype == np.float32:
        data = rng.normal(0, 1e6, (2, 3, 5, 7, 2)).astype(np.float32)
    else:
        data = rng.integers(0, np.iinfo(dtype).max, (2, 3, 5, 7, 2), endpoint=True).astype(dtype)
    out = imagej1.imageplus_to_array(_imageplus(data))
    assert out.dtype == dtype and out.shape == data.shape
    np.testing.assert_array_equal(out, data)


def test_rgb_image_is_exact(ij):
    data = np.random.default_rng(2).integers(0, 256, (1, 2, 4, 6, 3)).astype(np.uint8)
    imp = _imageplus(data, rgb=True)
    assert imp.getBitDepth() == 24
    np.testing.assert_array_equal(imagej1.imageplus_to_array(imp), data)


def test_labels_image_16_bit_float_above_and_calibration(ij):
    """Labels up to 65,535 come back 16-bit, more as 32-bit float, exactly; the source's
    spatial and time calibration pass through, its value calibration does not."""
    like = _imageplus(np.zeros((2, 1, 4, 5, 1), np.uint16))
    cal = like.getCalibration()
    cal.pixelWidth, cal.pixelHeight, cal.pixelDepth = 0.1625, 0.325, 1.5
    cal.setUnit("micron")
    cal.frameInterval = 2.5
    cal.setTimeUnit("min")
    cal.xOrigin = 3.0
    labels = np.arange(40, dtype=np.uint32).reshape(2, 1, 4, 5) * 1681  # up to 65,559
    small = labels % 65536
    imp16 = imagej1.labels_to_imageplus(small, "l16", like)
    assert imp16.getBitDepth() == 16
    np.testing.assert_array_equal(imagej1.imageplus_to_array(imp16)[..., 0], small)
    imp32 = imagej1.labels_to_imageplus(labels, "l32", like)
    assert imp32.getBitDepth() == 32 and int(labels.max()) > 65535
    np.testing.assert_array_equal(imagej1.imageplus_to_array(imp32)[..., 0], labels)
    got = imp32.getCalibration()
    assert (got.pixelWidth, got.pixelHeight, got.pixelDepth, str(got.getUnit())) == (
        0.1625, 0.325, 1.5, "micron")
    assert (got.frameInterval, str(got.getTimeUnit()), got.xOrigin) == (2.5, "min", 3.0)
    assert (imp32.getNFrames(), imp32.getNSlices(), imp32.getNChannels()) == (2, 1, 1)
    with pytest.raises(Exception, match="2\\*\\*24"):
        convert.label_dtype(2**24 + 1)


def test_rois_cross_both_ways_unchanged(ij, tmp_path):
    """roifile ROIs -> ImageJ Roi (RoiDecoder) -> roifile (RoiEncoder): same labels back."""
    from cellplug_sources.imagej_roi import labels_to_rois, rois_to_labels

    truth = tifffile.imread(FLUO_MASKS)
    back = imagej1.python_rois(imagej1.java_rois(labels_to_rois(truth)))
    np.testing.assert_array_equal(rois_to_labels(back, truth.shape), truth)


def test_menu_is_in_plugins(ij):
    from ij import Menus  # type: ignore

    plugins = Menus.getImageJMenu("Plugins")
    labels = [str(plugins.getItem(i).getLabel()) for i in range(plugins.getItemCount())]
    assert labels.count("Cellplug") == 1
    assert [str(ij.menu.getItem(i).getLabel()) for i in range(ij.menu.getItemCount())] == [
        "Segment", "Train from ROI Manager", "Cancel Training"]


def test_segment_menu_item_equals_cli_and_fills_roi_manager(ij, reference_dir):
    """Plugins > Cellplug > Segment, clicked (its ActionListener), OK in its dialog with the
    defaults: the label image equals `cellplug segment`'s, one ROI per object."""
    from ij import WindowManager  # type: ignore
    from ij.plugin.frame import RoiManager  # type: ignore

    expected = segment_reference(NUCLEI, reference_dir)
    imp = open_image(NUCLEI)
    click(ij, "Segment")
    press_ok("Cellplug Segment")
    assert ij.wait_idle(600) and ij.last_error is None, ij.last_error
    labels_imp = WindowManager.getImage("nuclei-labels")
    assert labels_imp is not None and labels_imp.getBitDepth() == 16
    got = imagej1.imageplus_to_array(labels_imp)[0, 0, :, :, 0]
    np.testing.assert_array_equal(got, expected)
    n = int(expected.max())
    assert n > 5
    assert RoiManager.getInstance().getCount() == n
    assert imp.getOverlay().size() == n
    assert ij.last_result["objects"] == n


def test_saved_label_image_equals_cli(ij, reference_dir, tmp_path):
    """ImageJ's own TIFF writer on the label image: the same file content as the CLI's."""
    from ij import IJ  # type: ignore

    expected = segment_reference(FLUO, reference_dir)
    open_image(FLUO)
    IJ.run("Segment", SEGMENT_OPTIONS)
    assert ij.last_error is None, ij.last_error
    IJ.saveAsTiff(ij.last_result["labels"], str(tmp_path / "labels.tif"))
    saved = tifffile.imread(tmp_path / "labels.tif")
    assert saved.dtype == np.uint16
    np.testing.assert_array_equal(saved, expected)


def test_segment_is_recorded_and_replays(ij, reference_dir):
    """With the recorder open, the menu command records run("Segment", "model=..."), and that
    line run as a macro gives the same labels."""
    from ij import IJ  # type: ignore
    from ij.plugin.frame import Recorder  # type: ignore

    expected = segment_reference(FLUO, reference_dir)
    recorder = Recorder()
    try:
        open_image(FLUO)
        click(ij, "Segment")
        press_ok("Cellplug Segment")
        assert ij.wait_idle(600) and ij.last_error is None, ij.last_error
        text = str(recorder.getText())
    finally:
        recorder.close()
    line = next(x for x in text.splitlines() if x.startswith('run("Segment"'))
    assert "model=generalist" in line and "diameter=0" in line and "flow=0.40" in line
    open_image(FLUO)
    IJ.runMacro(line)
    got = imagej1.imageplus_to_array(ij.last_result["labels"])[0, 0, :, :, 0]
    np.testing.assert_array_equal(got, expected)


def test_stack_planes_segmented_one_by_one(ij, reference_dir):
    """A 2-frame stack: each frame's labels equal the CLI's on that frame; ROIs carry their
    frame (stack position) and the label image keeps the stack's geometry."""
    from ij import IJ  # type: ignore
    from ij.plugin.frame import RoiManager  # type: ignore

    expected = segment_reference(FLUO, reference_dir)
    frame = tifffile.imread(FLUO)
    imp = _imageplus(np.stack([frame, frame])[:, None, :, :, None])
    imp.setDimensions(1, 1, 2)
    imp.show()
    IJ.run("Segment", SEGMENT_OPTIONS)
    assert ij.last_error is None, ij.last_error
    labels_imp = ij.last_result["labels"]
    assert (labels_imp.getNFrames(), labels_imp.getNSlices()) == (2, 1)
    got = imagej1.imageplus_to_array(labels_imp)[..., 0]
    for t in range(2):
        np.testing.assert_array_equal(got[t, 0], expected)
    positions = [int(r.getPosition()) for r in RoiManager.getInstance().getRoisAsArray()]
    n = int(expected.max())
    assert positions == [1] * n + [2] * n


def test_train_from_roi_manager_makes_a_model_that_segments(ij, tmp_path):
    """A real image, its ROIs loaded from a RoiSet.zip into the ROI Manager, Train from ROI
    Manager (2 epochs): a new model in the zoo, listed, and Segment runs with it."""
    from ij import IJ  # type: ignore
    from ij.plugin.frame import RoiManager  # type: ignore

    from cellplug.models import available_models

    zipped = roiset_of(tifffile.imread(FLUO_MASKS), tmp_path / "RoiSet.zip")
    open_image(FLUO)
    manager = RoiManager.getInstance() or RoiManager()
    manager.runCommand("Open", str(zipped))
    assert manager.getCount() == int(tifffile.imread(FLUO_MASKS).max())
    t0 = time.monotonic()
    IJ.run(commands.TRAIN, "base=generalist name=fiji-inprocess epochs=2 cyto=0 nucleus=0")
    assert ij.last_error is None, ij.last_error
    assert ij.last_result["model"] == "fiji-inprocess"
    assert (MODELS / "fiji-inprocess.pth").is_file()
    assert "fiji-inprocess" in available_models()
    print(f"train: {time.monotonic() - t0:.1f} s")
    IJ.run("Segment", SEGMENT_OPTIONS.replace("generalist", "fiji-inprocess"))
    assert ij.last_error is None, ij.last_error
    labels = imagej1.imageplus_to_array(ij.last_result["labels"])
    assert labels.shape == (1, 1, *tifffile.imread(FLUO).shape, 1)


def test_train_cancel_menu_item_stops_and_saves_nothing(ij, tmp_path):
    """Cancel Training (menu) during training: stopped at the next step, no model saved."""
    from ij import IJ  # type: ignore
    from ij.plugin.frame import RoiManager  # type: ignore

    zipped = roiset_of(tifffile.imread(FLUO_MASKS), tmp_path / "RoiSet.zip")
    open_image(FLUO)
    (RoiManager.getInstance() or RoiManager()).runCommand("Open", str(zipped))
    worker = threading.Thread(target=IJ.run, args=(
        commands.TRAIN, "base=generalist name=fiji-cancelled epochs=500 cyto=0 nucleus=0"))
    worker.start()
    deadline = time.monotonic() + 300
    # this run's training loop has started (progress may still be the previous test's)
    while time.monotonic() < deadline and ij.progress[1] != 500:
        time.sleep(0.2)
    assert ij.progress[1] == 500 and ij.running == commands.TRAIN, ij.progress
    click(ij, "Cancel Training")
    worker.join(300)
    assert not worker.is_alive()
    assert ij.last_error == "training cancelled; no model was saved"
    assert not list(MODELS.glob("fiji-cancelled*"))


def test_wrong_model_shows_the_error(ij):
    """A model that does not exist: an ImageJ error dialog with cellplug's error line."""
    open_image(FLUO)
    click(ij, "Segment")
    press_ok("Cellplug Segment", {0: "no-such-model"})
    dialog = find_window("Cellplug", kind="MessageDialog")
    assert ij.last_error.startswith("error: unknown model 'no-such-model'; available: ")
    dialog.dispose()
    assert ij.wait_idle(60)
