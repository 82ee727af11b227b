"""The ``mask-folder`` annotation source (Cellpose's ``<stem>_masks`` convention)."""

from __future__ import annotations

import types

import numpy as np
import pytest
import tifffile
from cellplug_sources import plugin
from cellplug_sources.mask_folder import MaskFolder

from cellplug import hookimpl
from cellplug.annotations import Annotation, find_source, read_annotations
from cellplug.errors import CellplugError, InputError
from cellplug.plugins import PluginRegistry


@pytest.fixture
def registry() -> PluginRegistry:
    reg = PluginRegistry()
    reg.add_module(plugin, "sources", distribution="cellplug")
    return reg


def _pair(folder, stem, image_ext=".tif", mask_ext=".tif", shape=(12, 10)):
    image = np.arange(np.prod(shape), dtype=np.uint16).reshape(shape)
    labels = np.zeros(shape[:2], np.uint16)
    labels[2:6, 3:7] = 1
    tifffile.imwrite(folder / f"{stem}{image_ext}", image)
    tifffile.imwrite(folder / f"{stem}_masks{mask_ext}", labels)
    return image, labels


def test_reads_pairs_in_order(tmp_path, registry):
    image, labels = _pair(tmp_path, "b")
    _pair(tmp_path, "a")
    (tmp_path / "unlabelled.tif").write_bytes(b"")  # no mask: ignored
    (tmp_path / ".b.123.tif").write_bytes(b"")  # a temporary file: ignored
    anns = list(read_annotations(tmp_path, registry=registry))
    assert [a.stem for a in anns] == ["a", "b"]
    assert isinstance(anns[1], Annotation) and anns[1].source == str(tmp_path / "b.tif")
    np.testing.assert_array_equal(anns[1].image, image)
    np.testing.assert_array_equal(anns[1].labels, labels)


def test_mask_with_other_extension_or_case(tmp_path):
    _pair(tmp_path, "png_mask", mask_ext=".png")
    _pair(tmp_path, "upper", image_ext=".TIF", mask_ext=".TIF")
    pairs = MaskFolder().pairs(tmp_path)
    assert [(i.name, m.name) for i, m in pairs] == [
        ("png_mask.tif", "png_mask_masks.png"), ("upper.TIF", "upper_masks.TIF"),
    ]


def test_detect(tmp_path, registry):
    source = registry.get("source", "mask-folder")
    assert not source.detect(tmp_path)
    assert not source.detect(tmp_path / "missing")
    _pair(tmp_path, "x")
    assert source.detect(tmp_path)
    assert not source.detect(tmp_path / "x.tif")
    assert find_source(tmp_path, registry=registry) is source


def test_nothing_to_read(tmp_path, registry):
    with pytest.raises(CellplugError, match="no annotation source can read this"):
        list(read_annotations(tmp_path, registry=registry))
    with pytest.raises(InputError, match="no <stem>.tif"):
        list(read_annotations(tmp_path, "mask-folder", registry=registry))


def test_shape_mismatch_names_the_file(tmp_path, registry):
    tifffile.imwrite(tmp_path / "x.tif", np.zeros((8, 8), np.uint8))
    tifffile.imwrite(tmp_path / "x_masks.tif", np.zeros((8, 9), np.uint16))
    with pytest.raises(CellplugError, match=r"x\.tif: labels \(8, 9\) do not match image"):
        list(read_annotations(tmp_path, registry=registry))


def test_a_source_that_raises_in_detect_is_named(tmp_path, registry):
    class Faulty:
        def detect(self, location):
            raise OSError("permission denied")

    @hookimpl
    def register_annotation_sources(register):
        register("aaa-faulty", Faulty())  # sorts first: asked before mask-folder

    faulty = types.SimpleNamespace(register_annotation_sources=register_annotation_sources)
    registry.add_module(faulty, "faulty")
    with pytest.raises(CellplugError, match=r"annotation source 'aaa-faulty' \(plugin 'faulty'\) "
                       "failed to inspect it: OSError: permission denied"):
        list(read_annotations(tmp_path, registry=registry))


def test_cellprofiler_label_images_through_a_suffix_option(tmp_path, registry):
    """CellProfiler's ConvertObjectsToImage + SaveImages: uint16 labels, <stem>_Nuclei.tiff."""
    image = np.arange(120, dtype=np.uint16).reshape(12, 10)
    labels = np.zeros((12, 10), np.uint16)
    labels[2:6, 3:7] = 300
    tifffile.imwrite(tmp_path / "plate_A01.tif", image)
    tifffile.imwrite(tmp_path / "plate_A01_Nuclei.tiff", labels)
    with pytest.raises(CellplugError, match="no annotation source can read this"):
        list(read_annotations(tmp_path, registry=registry))
    with pytest.raises(CellplugError, match="source options need an explicit source"):
        list(read_annotations(tmp_path, registry=registry, options={"mask_suffix": "_Nuclei"}))
    (ann,) = list(read_annotations(tmp_path, "mask-folder", registry,
                                   options={"mask_suffix": "_Nuclei"}))
    assert ann.stem == "plate_A01" and np.array_equal(ann.labels, labels)
    with pytest.raises(CellplugError, match="'mask-folder': .*unexpected keyword argument 'x'"):
        list(read_annotations(tmp_path, "mask-folder", registry, options={"x": "1"}))
