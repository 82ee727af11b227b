"""The ``imagej-roi`` annotation source and writer (ImageJ / Fiji ROI sets, via roifile)."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import roifile
import tifffile
from cellplug_sources.imagej_roi import (
    ImagejRois,
    RoiWarning,
    labels_to_rois,
    read_rois,
    rois_to_labels,
    write_roi_zip,
)
from skimage.draw import ellipse

from cellplug.errors import CellplugError, InputError
from cellplug.metrics import match_counts

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def _sequential(labels: np.ndarray) -> np.ndarray:
    from skimage.segmentation import relabel_sequential

    return relabel_sequential(labels)[0]


def _ring_and_nuclei() -> np.ndarray:
    lab = tifffile.imread(EXAMPLES / "nuclei_masks.tif").astype(np.int32)
    r = np.hypot(*(np.mgrid[:360, :360] - np.array([300, 300])[:, None, None]))
    lab[(r < 25) & (r > 10)] = lab.max() + 1  # an object with a hole
    return lab


def test_labels_to_roi_zip_and_back_is_exact(tmp_path):
    labels = _ring_and_nuclei()
    write_roi_zip(tmp_path / "x_RoiSet.zip", labels)
    rois = read_rois(tmp_path / "x_RoiSet.zip")
    assert len(rois) == labels.max() == 18
    assert [r.name for r in rois] == [str(i) for i in range(1, 19)]
    assert rois[-1].composite and not rois[0].composite  # the ring keeps its hole
    back = rois_to_labels(rois, labels.shape)
    assert np.array_equal(back, _sequential(labels))
    assert match_counts(labels, back).ap[0] == 1.0


def test_ellipses_rectangles_and_polygons_rasterise_as_imagej_does():
    shape = (64, 80)
    oval = roifile.ImagejRoi(roitype=roifile.ROI_TYPE.OVAL, left=10, top=5, right=40, bottom=25)
    rect = roifile.ImagejRoi(roitype=roifile.ROI_TYPE.RECT, left=50, top=30, right=60, bottom=50)
    tri = roifile.ImagejRoi.frompoints(np.array([[5, 40], [35, 40], [5, 60]], np.float32))
    tri.roitype = roifile.ROI_TYPE.POLYGON
    labels = rois_to_labels([oval, rect, tri], shape)
    want_oval = np.zeros(shape, bool)
    # ImageJ: pixel centres inside the ellipse inscribed in the bounding box
    want_oval[ellipse(15 - 0.5, 25 - 0.5, 10, 15, shape)] = True
    assert match_counts(want_oval.astype(int), (labels == 1).astype(int)).ap[0] == 1.0
    assert abs(int((labels == 1).sum()) - int(np.pi * 10 * 15)) < 15
    assert (labels == 2).sum() == 10 * 20 and labels[30:50, 50:60].min() == 2
    # the triangle's pixel centres: x + 0.5 + (y + 0.5 - 40) * 1.5 < 35 for y in 40..59
    ys, xs = np.nonzero(labels == 3)
    assert ys.min() == 40 and xs.min() == 5 and len(ys) == pytest.approx(30 * 20 / 2, rel=0.1)


def test_overlaps_go_to_the_roi_listed_last_with_a_warning():
    a = roifile.ImagejRoi(roitype=roifile.ROI_TYPE.RECT, left=0, top=0, right=10, bottom=10)
    b = roifile.ImagejRoi(roitype=roifile.ROI_TYPE.RECT, left=5, top=5, right=15, bottom=15)
    with pytest.warns(RoiWarning, match="25 pixel"):
        labels = rois_to_labels([a, b], (20, 20))
    assert (labels == 1).sum() == 75 and (labels == 2).sum() == 100 and labels[7, 7] == 2


def test_rois_outside_or_without_area_are_skipped_with_a_warning():
    inside = roifile.ImagejRoi(roitype=roifile.ROI_TYPE.RECT, left=2, top=2, right=6, bottom=6)
    outside = roifile.ImagejRoi(roitype=roifile.ROI_TYPE.RECT, left=50, top=50, right=60,
                                bottom=60, name="far")
    line = roifile.ImagejRoi(roitype=roifile.ROI_TYPE.LINE, x1=0, y1=0, x2=5, y2=5, name="ln")
    half = roifile.ImagejRoi(roitype=roifile.ROI_TYPE.RECT, left=15, top=15, right=30, bottom=30)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        labels = rois_to_labels([inside, outside, line, half], (20, 20), "set.zip")
    messages = [str(w.message) for w in caught]
    assert any("set.zip: skipped 1 ROI(s) without area: ln (line)" in m for m in messages)
    assert any("set.zip: skipped 1 ROI(s) outside the 20 x 20 image: far" in m for m in messages)
    assert labels.max() == 2 and (labels == 2).sum() == 25  # the half-outside one is clipped


def test_unreadable_roi_file_names_it(tmp_path):
    bad = tmp_path / "x_RoiSet.zip"
    bad.write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(InputError, match=f"{bad}: not a readable ImageJ ROI file"):
        read_rois(bad)


def test_source_reads_a_folder_and_names_what_is_missing(tmp_path):
    shutil.copy(EXAMPLES / "nuclei.tif", tmp_path / "a.tif")
    labels = tifffile.imread(EXAMPLES / "nuclei_masks.tif")
    write_roi_zip(tmp_path / "a_RoiSet.zip", labels)
    shutil.copy(EXAMPLES / "nuclei.tif", tmp_path / "b.tif")  # no ROIs: not used
    source = ImagejRois()
    assert source.detect(tmp_path)
    (ann,) = list(source.read(tmp_path))
    assert ann.stem == "a" and np.array_equal(ann.labels, _sequential(labels))
    # a single image with ImageJ's default file name
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(EXAMPLES / "nuclei.tif", single / "cells.tif")
    shutil.copy(tmp_path / "a_RoiSet.zip", single / "RoiSet.zip")
    assert [a.stem for a in source.read(single)] == ["cells"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not source.detect(empty)
    with pytest.raises(InputError, match="no image with a ROI set beside it"):
        list(source.read(empty))


def test_a_roi_zip_from_a_bad_image_pair_is_reported_or_skipped(tmp_path):
    shutil.copy(EXAMPLES / "nuclei.tif", tmp_path / "a.tif")
    (tmp_path / "a_RoiSet.zip").write_bytes(b"not a zip")
    with pytest.raises(CellplugError, match="a_RoiSet.zip: not a readable ImageJ ROI file"):
        list(ImagejRois().read(tmp_path))
    errors = []
    assert list(ImagejRois().read(tmp_path, on_error=errors.append)) == []
    assert len(errors) == 1


def test_labels_to_rois_of_an_empty_image_and_single_pixels(tmp_path):
    assert labels_to_rois(np.zeros((5, 5), np.uint16)) == []
    write_roi_zip(tmp_path / "e.zip", np.zeros((5, 5), np.uint16))
    assert read_rois(tmp_path / "e.zip") == []
    dots = np.zeros((6, 6), np.uint16)
    dots[1, 1], dots[4, 4] = 1, 2
    assert np.array_equal(rois_to_labels(labels_to_rois(dots), dots.shape), dots)
