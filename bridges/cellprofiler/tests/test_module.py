"""RunCellplug run directly in a CellProfiler Workspace: same objects as `cellplug segment`,
standard measurements, large label counts, empty images, errors naming the image set."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from cellplug_cellprofiler import module as cpmodule
from cellplug_cellprofiler.module import CUSTOM_MODEL, RunCellplugError, remove_edge_objects
from conftest import (
    GRAY,
    TWO_CHANNEL_OPTIONS,
    cp_image,
    make_module,
    run_module,
    segment_reference,
)


def _objects(workspace, name="Cells"):
    return workspace.object_set.get_objects(name)


def _check_measurements(workspace, labels, name="Cells"):
    """Count_, Location_Center_X/Y and Number_Object_Number agree with ``labels``."""
    m = workspace.measurements
    n = int(labels.max()) if labels.size else 0
    assert m.get_current_image_measurement(f"Count_{name}") == n
    numbers = m.get_current_measurement(name, "Number_Object_Number")
    assert np.array_equal(numbers, np.arange(1, n + 1))
    cx = m.get_current_measurement(name, "Location_Center_X")
    cy = m.get_current_measurement(name, "Location_Center_Y")
    assert len(cx) == len(cy) == n
    if n:
        ys, xs = np.nonzero(labels)
        ids = labels[ys, xs].astype(np.int64)
        count = np.bincount(ids, minlength=n + 1)[1:]
        assert np.allclose(cx, np.bincount(ids, xs, minlength=n + 1)[1:] / count)
        assert np.allclose(cy, np.bincount(ids, ys, minlength=n + 1)[1:] / count)


# -- 1. equal to `cellplug segment` ---------------------------------------------------------
@pytest.mark.parametrize("name", list(GRAY))
def test_grayscale_equals_cellplug_segment(name, reference):
    image = tifffile.imread(GRAY[name])
    ws = run_module(make_module(), {"DNA": image}, {"DNA": GRAY[name].name})
    labels = _objects(ws).segmented
    ref = reference[name]
    assert ref["objects"] > 0
    assert np.array_equal(labels, ref["labels"]), f"{name}: labels differ from cellplug segment"
    _check_measurements(ws, labels)
    diameter = ws.measurements.get_current_image_measurement("RunCellplug_Diameter_Cells")
    assert round(diameter, 2) == ref["diameter"]


def test_colour_image_equals_cellplug_segment(reference, extra_images):
    """An RGB image is averaged to grayscale, as `cellplug segment --channels 0 0`."""
    image = tifffile.imread(extra_images["he_rgb"])
    assert image.ndim == 3
    ws = run_module(make_module(), {"DNA": image})
    assert np.array_equal(_objects(ws).segmented, reference["he_rgb"]["labels"])


def test_stored_values_undo_cellprofiler_scaling():
    """Without undoing CellProfiler's 0..1 scaling, float32 rounding moves pixels: the mosaic
    gives the same count but ~0.5 % different pixels under bfloat16 inference."""
    from cellplug_cellprofiler.module import stored_values

    for dtype in (np.uint8, np.uint16):
        raw = np.arange(0, 5000, 7).astype(dtype).reshape(-1, 1)
        image = cp_image(raw)
        assert np.array_equal(stored_values(image, image.pixel_data), raw.astype(np.float32))
    # pixel data that is not stored values / scale (computed by another module): unchanged
    image = cp_image(np.arange(256, dtype=np.uint8).reshape(16, 16))
    smooth = image.pixel_data * 0.731
    assert stored_values(image, smooth) is smooth
    # no scale known (an Image made in code): unchanged
    from cellprofiler_core.image import Image

    plain = Image(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8), convert=False)
    assert stored_values(plain, plain.pixel_data) is plain.pixel_data


def test_two_channel_with_nuclei_image_equals_cellplug_segment(reference_two_channel,
                                                               extra_images):
    """Cytoplasm image + nuclei image = `cellplug segment --channels 1 2` on the two-channel
    TIFF of the same planes."""
    he = tifffile.imread(extra_images["he_two_channel"])
    module = make_module(supply_nuclei=True, **TWO_CHANNEL_OPTIONS)
    module.nuclei_image.value = "Nuclei"
    ws = run_module(module, {"DNA": he[0], "Nuclei": he[1]})
    labels = _objects(ws).segmented
    assert reference_two_channel["objects"] > 0
    assert np.array_equal(labels, reference_two_channel["labels"])
    # and the nuclei channel matters: without it the objects differ
    alone = _objects(run_module(make_module(**TWO_CHANNEL_OPTIONS), {"DNA": he[0]})).segmented
    assert not np.array_equal(alone, labels)


def test_settings_reach_the_segmenter(work):
    """Diameter, thresholds, minimum size and invert give what the same CLI options give."""
    ref = segment_reference({"n": GRAY["nuclei"]}, work / "ref_options", "--diameter", 40,
                            "--flow-threshold", 0.8, "--cellprob-threshold", -1.0,
                            "--min-size", 200, "--invert")["n"]
    module = make_module(diameter=40.0, flow_threshold=0.8, cellprob_threshold=-1.0,
                         min_size=200, invert=True)
    labels = _objects(run_module(module, {"DNA": tifffile.imread(GRAY["nuclei"])})).segmented
    assert np.array_equal(labels, ref["labels"])


def test_probability_image(reference):
    module = make_module(save_probabilities=True)
    module.probabilities_name.value = "Prob"
    ws = run_module(module, {"DNA": tifffile.imread(GRAY["dsb2018_fluo"])})
    prob = ws.image_set.get_image("Prob").pixel_data
    logit = reference["dsb2018_fluo"]["cellprob"]
    assert prob.shape == logit.shape and prob.dtype == np.float32
    assert 0.0 <= prob.min() and prob.max() <= 1.0
    assert np.allclose(prob, 1 / (1 + np.exp(-logit.astype(np.float64))), atol=1e-6)


def test_remove_edge_objects(reference):
    ref = reference["dsb2018_fluo"]["labels"]
    ws = run_module(make_module(remove_edge_masks=True),
                    {"DNA": tifffile.imread(GRAY["dsb2018_fluo"])})
    labels = _objects(ws).segmented
    border = set(np.unique(np.concatenate([ref[0], ref[-1], ref[:, 0], ref[:, -1]]))) - {0}
    assert border, "the test image should have objects on its border"
    assert labels.max() == ref.max() - len(border)
    kept = [i for i in range(1, ref.max() + 1) if i not in border]
    for new, old in enumerate(kept, start=1):  # same objects, renumbered in order
        assert np.array_equal(labels == new, ref == old)
    _check_measurements(ws, labels)


def test_remove_edge_objects_helper():
    labels = np.zeros((6, 6), np.uint32)
    labels[0, 0] = 1
    labels[2:4, 2:4] = 2
    labels[5, 3] = 3
    labels[1, 2] = 4
    out = remove_edge_objects(labels)
    assert out.max() == 2 and out[2, 2] == 1 and out[1, 2] == 2 and out[0, 0] == 0
    assert remove_edge_objects(np.zeros((3, 3), np.uint32)).max() == 0


# -- large label counts: CellProfiler stores labels as int8/16/32 by their maximum ----------
def test_more_than_255_objects_real_image(reference, extra_images):
    ws = run_module(make_module(), {"DNA": tifffile.imread(extra_images["fluo_mosaic"])})
    labels = _objects(ws).segmented
    assert reference["fluo_mosaic"]["objects"] > 255
    assert np.array_equal(labels, reference["fluo_mosaic"]["labels"])
    _check_measurements(ws, labels)


class _FakeSegmenter:
    """Returns given labels (the real one cannot cheaply make 70000 objects)."""

    def __init__(self, labels):
        from cellplug.models import ModelInfo

        self.labels = labels
        self.model = ModelInfo("fake", None)

    def segment(self, image, options=None):
        from cellplug.segmenter import Segmentation

        shape = self.labels.shape
        return Segmentation(self.labels, np.zeros((2, *shape), np.float32),
                            np.zeros(shape, np.float32), np.zeros(256, np.float32), 17.0)


@pytest.mark.parametrize("n_side", [10, 18, 200, 280])  # 100, 324, 40000, 78400 objects
def test_many_objects_survive(n_side, monkeypatch):
    """Objects 1..N come back unchanged past 127, 255, 32767 and 65535 objects."""
    block = np.arange(1, n_side * n_side + 1, dtype=np.uint32).reshape(n_side, n_side)
    labels = np.kron(block, np.ones((2, 2), np.uint32))
    labels = np.pad(labels, 1)
    fake = _FakeSegmenter(labels)
    module = make_module()
    monkeypatch.setattr(module, "segmenter", lambda: fake)
    ws = run_module(module, {"DNA": np.zeros(labels.shape, np.uint8)})
    objects = _objects(ws)
    out = objects.segmented
    assert objects.count == n_side * n_side
    assert out.max() == n_side * n_side
    assert np.array_equal(out.astype(np.int64), labels.astype(np.int64))
    _check_measurements(ws, labels)


# -- empty images, errors ------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, 100])
def test_empty_image_gives_zero_objects(value):
    ws = run_module(make_module(), {"DNA": np.full((96, 96), value, np.uint16)})
    assert _objects(ws).count == 0
    assert _objects(ws).segmented.max() == 0
    _check_measurements(ws, np.zeros((96, 96), np.uint32))


def _custom(path, **settings):
    from cellprofiler_core.preferences import ABSOLUTE_FOLDER_NAME

    module = make_module(model=CUSTOM_MODEL, **settings)
    module.model_directory.value = f"{ABSOLUTE_FOLDER_NAME}|{path.parent}"
    module.model_file_name.value = path.name
    return module


def test_bad_model_path_names_image_set(tmp_path):
    module = _custom(tmp_path / "no_such_model.pth")
    with pytest.raises(RunCellplugError) as info:
        run_module(module, {"DNA": np.zeros((32, 32), np.uint8)}, {"DNA": "plate1_A01.tif"})
    msg = str(info.value)
    assert "image set 1 (plate1_A01.tif)" in msg
    assert f"{tmp_path / 'no_such_model.pth'}: model file not found" in msg


def test_unknown_model_name_lists_installed():
    module = make_module(model="no-such-model")
    with pytest.raises(RunCellplugError, match=r"image set 1: cannot load model: unknown model "
                                               r"'no-such-model'; available: .*generalist"):
        run_module(module, {"DNA": np.zeros((32, 32), np.uint8)})


def test_volumetric_and_odd_images_are_refused():
    with pytest.raises(RunCellplugError, match=r"image set 1: image 'DNA' has shape "
                                               r"\(4, 32, 32\) \(3-D\)"):
        run_module(make_module(), {"DNA": cp_image(np.zeros((4, 32, 32), np.uint8),
                                                   dimensions=3)})
    module = make_module(supply_nuclei=True)
    module.nuclei_image.value = "Nuclei"
    with pytest.raises(RunCellplugError, match=r"nuclei image 'Nuclei' is \(16, 16\), the input "
                                               r"image is \(32, 32\)"):
        run_module(module, {"DNA": np.zeros((32, 32), np.uint8),
                            "Nuclei": np.zeros((16, 16), np.uint8)})




# -- the model cache -----------------------------------------------------------------------
def test_segmenter_is_cached_by_settings(tmp_path):
    import shutil

    from cellplug.models import resolve_model

    cpmodule._CACHE.clear()
    image = {"DNA": np.zeros((32, 32), np.uint8)}
    first = make_module()
    run_module(first, image)
    seg = first.segmenter()
    second = make_module()  # another module instance, same settings: same Segmenter
    run_module(second, image)
    assert second.segmenter() is seg and len(cpmodule._CACHE) == 1
    # a thresholds change does not reload; a different model file does
    run_module(make_module(flow_threshold=0.9), image)
    assert len(cpmodule._CACHE) == 1
    weights = resolve_model("generalist").weights
    shutil.copy(weights, tmp_path / "copy.pth")
    shutil.copy(weights.with_suffix(".json"), tmp_path / "copy.json")
    custom = _custom(tmp_path / "copy.pth")
    run_module(custom, image)
    assert custom.segmenter() is not seg and len(cpmodule._CACHE) == 2
    assert first.segmenter() is seg
    # a model file changed on disk is loaded again
    before = custom.segmenter()
    (tmp_path / "copy.pth").write_bytes((tmp_path / "copy.pth").read_bytes())
    import os

    os.utime(tmp_path / "copy.pth", ns=(1, 1))
    assert custom.segmenter() is not before
    assert len(cpmodule._CACHE) == 2  # bounded
