"""The shared conversion without Java: label types, ImageJ TIFFs with calibration, ROI
positions in stacks, ROIs back to annotations."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from cellplug_fiji import convert
from conftest import FLUO, FLUO_MASKS

from cellplug.errors import CellplugError


def test_label_dtype_limits():
    assert convert.label_dtype(0) == np.uint16
    assert convert.label_dtype(65535) == np.uint16
    assert convert.label_dtype(65536) == np.float32
    assert convert.label_dtype(2**24) == np.float32
    with pytest.raises(CellplugError, match="2\\*\\*24"):
        convert.label_dtype(2**24 + 1)
    big = np.array([[0, 70000], [2**24, 5]], np.uint32)
    out = convert.to_label_image(big)
    assert out.dtype == np.float32 and (out.astype(np.uint32) == big).all()


def test_lut_background_black_and_colours_distinct():
    lut = convert.glasbey_lut()
    assert lut.shape == (3, 256) and lut.dtype == np.uint8
    assert (lut[:, 0] == 0).all()
    assert len({tuple(c) for c in lut[:, 1:].T}) == 255


def test_imagej_tiff_round_trip_keeps_geometry_and_calibration(tmp_path):
    """A hyperstack TIFF as ImageJ writes it (T=2, Z=3, C=2) reads as (T, Z, Y, X, C); its
    labels are written with the same resolution, unit, spacing, frame interval and origin."""
    data = np.random.default_rng(0).integers(0, 4000, (2, 3, 2, 8, 9)).astype(np.uint16)
    src = tmp_path / "src.tif"
    tifffile.imwrite(src, data, imagej=True, resolution=((3076923, 1000000), (3076923, 1000000)),
                     metadata={"axes": "TZCYX", "unit": "micron", "spacing": "1.5",
                               "finterval": "2.5", "tunit": "min", "xorigin": "3.25"})
    read, meta = convert.read_imagej_tiff(src)
    assert read.shape == (2, 3, 8, 9, 2) and read.dtype == np.uint16
    np.testing.assert_array_equal(read, np.moveaxis(data, 2, -1))
    assert meta.n_channels == 2
    labels = np.arange(2 * 3 * 8 * 9, dtype=np.uint32).reshape(2, 3, 8, 9)
    out = tmp_path / "labels.tif"
    convert.write_label_tiff(out, labels, meta)
    with tifffile.TiffFile(out) as tif:
        back = tif.series[0].asarray()
        ij = tif.imagej_metadata
        assert tif.pages.first.tags["XResolution"].value == (3076923, 1000000)
        assert tif.series[0].axes == "TZYX"
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, labels)
    assert (ij["unit"], ij["spacing"], ij["finterval"], ij["tunit"], ij["xorigin"]) == (
        "micron", 1.5, 2.5, "min", 3.25)
    assert (ij["min"], ij["max"]) == (0.0, 431.0)


def test_rgb_tiff_reads_as_three_samples(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (6, 7, 3)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, imagej=True)
    data, meta = convert.read_imagej_tiff(tmp_path / "rgb.tif")
    assert data.shape == (1, 1, 6, 7, 3) and meta.n_channels == 1
    ((_, plane),) = list(convert.planes(data))
    np.testing.assert_array_equal(plane, rgb)


def test_plane_positions_follow_imagej():
    assert convert.plane_positions((1, 1), 3) == {(0, 0): {}}
    assert convert.plane_positions((2, 1), 1)[1, 0] == {"position": 2}
    assert convert.plane_positions((1, 3), 1)[0, 2] == {"position": 3}
    assert convert.plane_positions((2, 1), 2)[1, 0] == {"c_position": 0, "z_position": 1,
                                                         "t_position": 2}


def test_stack_rois_round_trip_to_annotations():
    """Labels of a 2-frame stack -> ROIs with positions -> one annotation per frame, equal."""
    image = tifffile.imread(FLUO)
    truth = tifffile.imread(FLUO_MASKS)
    labels = np.stack([truth, np.zeros_like(truth)])[:, None]  # no objects in frame 2
    labels[1, 0, :40, :40] = 1
    rois = convert.labels_to_rois(labels)
    assert {r.position for r in rois} == {1, 2}
    assert rois[0].name == "0001-1"
    data = np.stack([image, image])[:, None, :, :, None]
    anns = convert.rois_to_annotations(data, rois, "fluo")
    assert [a.stem for a in anns] == ["fluo-t1-z1", "fluo-t2-z1"]
    np.testing.assert_array_equal(anns[0].labels, truth)
    np.testing.assert_array_equal(anns[1].labels, labels[1, 0])


def test_rois_without_position_go_to_the_current_plane():
    truth = tifffile.imread(FLUO_MASKS)
    rois = convert.labels_to_rois(truth[None, None])
    assert all(r.position == 0 for r in rois) and rois[0].name == "1"
    image = tifffile.imread(FLUO)
    data = np.stack([image, image, image])[None, :, :, :, None]
    (ann,) = convert.rois_to_annotations(data, rois, "fluo", current=(0, 2))
    assert ann.stem == "fluo-t1-z3"
    with pytest.raises(CellplugError, match="no ROIs"):
        convert.rois_to_annotations(data, [], "fluo")
