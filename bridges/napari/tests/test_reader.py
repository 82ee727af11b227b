"""The reader (labels TIFF, ImageJ ROI set, Cellpose _seg.npy) and the sample data, through
npe2 as napari calls them."""

from __future__ import annotations

import shutil
import zipfile

import numpy as np
import pytest
import tifffile
from cellplug_napari._reader import get_reader
from conftest import NUCLEI, PLUGIN, REPO
from skimage.segmentation import relabel_sequential

from cellplug.io import read_image, write_labels

MASKS = relabel_sequential(tifffile.imread(REPO / "examples" / "nuclei_masks.tif"))[0]


@pytest.fixture
def outputs(tmp_path):
    """nuclei.tif with its labels written as each of cellplug's outputs, by cellplug's
    writers (those of `cellplug segment --save roi|seg-npy`)."""
    from cellplug.plugins import get_registry

    image = read_image(NUCLEI)
    shutil.copy(NUCLEI, tmp_path / "nuclei.tif")
    write_labels(tmp_path / "nuclei_masks.tif", MASKS)
    registry = get_registry()
    registry.get("source", "imagej-roi").write(tmp_path / "nuclei_RoiSet.zip", image, MASKS)
    registry.get("source", "cellpose-seg-npy").write(tmp_path / "other_seg.npy", image, MASKS)
    return tmp_path


@pytest.mark.parametrize("name, layer_name", [("nuclei_masks.tif", "nuclei labels"),
                                              ("nuclei_RoiSet.zip", "nuclei ROIs")])
def test_labels_and_roi_sets_open_as_labels(outputs, name, layer_name):
    reader = get_reader(str(outputs / name))
    assert reader is not None
    [(data, meta, kind)] = reader(str(outputs / name))
    assert kind == "labels" and meta["name"] == layer_name
    np.testing.assert_array_equal(data, MASKS)


def test_a_seg_npy_opens_as_its_image_and_labels(outputs):
    path = str(outputs / "other_seg.npy")
    (img, img_meta, img_kind), (masks, meta, kind) = get_reader(path)(path)
    assert (img_kind, img_meta["name"], kind, meta["name"]) == ("image", "other", "labels",
                                                                "other labels")
    np.testing.assert_array_equal(img, read_image(NUCLEI))
    np.testing.assert_array_equal(masks, MASKS)


def test_a_roi_set_without_its_image_takes_the_rois_extent(outputs, tmp_path):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(outputs / "nuclei_RoiSet.zip", alone / "x.zip")
    [(data, _, _)] = get_reader(str(alone / "x.zip"))(str(alone / "x.zip"))
    h, w = (min(n, 360) for n in data.shape)  # a ROI's bounds may end a pixel further
    assert not data[h:].any() and not data[:, w:].any()
    assert not MASKS[h:].any() and not MASKS[:, w:].any()
    np.testing.assert_array_equal(data[:h, :w], MASKS[:h, :w])


def test_other_files_are_left_to_other_readers(tmp_path):
    with zipfile.ZipFile(tmp_path / "docs.zip", "w") as zf:
        zf.writestr("readme.txt", "not ROIs")
    tifffile.imwrite(tmp_path / "plain.tif", np.zeros((8, 8), np.uint8))
    for name in ("docs.zip", "plain.tif", "missing.zip"):
        assert get_reader(str(tmp_path / name)) is None


def test_napari_opens_them_with_the_plugin_and_has_the_sample(make_napari_viewer, outputs):
    viewer = make_napari_viewer()
    layers = viewer.open(str(outputs / "nuclei_RoiSet.zip"), plugin=PLUGIN)
    assert [la.name for la in layers] == ["nuclei ROIs"]
    assert layers[0].as_layer_data_tuple()[2] == "labels"
    [sample] = viewer.open_sample(PLUGIN, "nuclei")
    assert sample.name == "nuclei"
    np.testing.assert_array_equal(sample.data, read_image(NUCLEI))
