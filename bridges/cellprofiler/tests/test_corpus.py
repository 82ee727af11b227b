"""The bad-input corpus (tests/data/bad/make_corpus.py) through RunCellplug.

Each image case is loaded the way CellProfiler loads it (its ImageIO reader, the reader the
headless runs enable, and its own scaling to 0..1), then given to the module in a Workspace:

- files CellProfiler's reader cannot open never reach the module (CellProfiler reports them);
- what the reader does return is segmented, or refused with an error that names the image set
  (number and file) and the problem; the odd-but-valid images give 0 objects.

Arrays that CellProfiler's loader would not produce but another module could (NaN, infinite,
overflowing, empty) are given to the module directly.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
from cellplug_cellprofiler.module import RunCellplugError
from conftest import REPO, make_module, run_module

_spec = importlib.util.spec_from_file_location("make_corpus",
                                               REPO / "tests/data/bad/make_corpus.py")
corpus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corpus)

# what becomes of each image case: "reader" = CellProfiler's reader refuses the file (the
# module is not reached); "objects" = segmented to 0 objects; otherwise the pattern of the
# module's error after "image set 1 (<file>): "
REFUSED_BY_READER = {"tiff_corrupt", "tiff_truncated", "tiff_zero_bytes", "png_corrupt",
                     "png_truncated", "png_zero_bytes", "tiff_declares_100000",
                     "text_file_as_tif", "directory_named_tif", "missing_file", "empty_folder"}
ZERO_OBJECTS = {"constant",
                # CellProfiler's loader turns NaN / infinite / huge floats into integers of the
                # same size before any module runs; what is left is segmented like any image
                "nan_values", "inf_values", "overflow_float64", "overflow_float32"}
MODULE_ERRORS = {
    "zero_by_n": r"cannot segment image 'DNA': expected a non-empty image \(Y, X\) or \(Y, X, C\), "
                 r"got shape \(0, 32\)",
    # 0 objects for cellplug segment, but CellProfiler cannot hold objects of a 1 x 1 image
    "one_pixel": r"image 'DNA' has shape \(1, 1\); CellProfiler cannot hold objects of an image "
                 r"1 pixel high or wide",
    "five_d": r"image 'DNA' has shape \(2, 3, 2, 32, 32\); RunCellplug segments 2-D images",
    "zstack": r"image 'DNA' has shape \(12, 32, 32\), 32 channels \(at most 8\); if the file "
              r"is a stack of planes, load one plane per image in NamesAndTypes",
    "stack_without_axes": r"image 'DNA' has shape \(5, 64, 64\), 64 channels \(at most 8\)",
}
assert REFUSED_BY_READER | ZERO_OBJECTS | set(MODULE_ERRORS) == set(corpus.IMAGE_CASES)


def load_like_cellprofiler(path: Path):
    """CellProfiler's ImageIO reader + its scaling, as NamesAndTypes does for one file."""
    from cellprofiler_core.image import Image
    from cellprofiler_core.image.abstract_image.file._file_image import FileImage
    from cellprofiler_core.pipeline import ImageFile
    from cellprofiler_core.readers.imageio_reader import ImageIOReader
    from cellprofiler_core.utilities.pathname import pathname2url

    reader = ImageIOReader(ImageFile(pathname2url(str(path))))
    try:
        data = reader.read()
    finally:
        try:
            reader.close()
        except Exception:  # noqa: BLE001 - closing a reader that never opened
            pass
    data, scale = FileImage.normalize_to_float32(np.asarray(data), wants_inscale=True)
    return Image(data, convert=False, scale=scale)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case", sorted(corpus.IMAGE_CASES))
def test_image_case(case, tmp_path):
    path = corpus.IMAGE_CASES[case](tmp_path)
    if case in REFUSED_BY_READER:
        with pytest.raises(Exception):  # noqa: B017 - CellProfiler's own error, any type
            load_like_cellprofiler(path)
        return
    image = load_like_cellprofiler(path)
    module = make_module()
    if case in ZERO_OBJECTS:
        ws = run_module(module, {"DNA": image}, {"DNA": path.name})
        assert ws.object_set.get_objects("Cells").count == 0
        assert ws.measurements.get_current_image_measurement("Count_Cells") == 0
        return
    with pytest.raises(RunCellplugError) as info:
        run_module(module, {"DNA": image}, {"DNA": path.name})
    msg = str(info.value)
    assert msg.startswith(f"RunCellplug (Cells), image set 1 ({path.name}): "), msg
    assert re.search(MODULE_ERRORS[case], msg), msg


def _with(value, shape=(48, 48)):
    data = np.ones(shape, np.float32)
    data[5:20, 5:20] = value
    return data


ARRAYS = {
    "nan": (_with(np.nan), r"NaN"),
    "inf": (_with(-np.inf), r"infinite"),
    "overflow": (np.linspace(-3e38, 3e38, 48 * 48, dtype=np.float32).reshape(48, 48),
                 r"exceed what float32 can represent"),
    "empty": (np.zeros((0, 32), np.float32), r"expected a non-empty image"),
}


@pytest.mark.parametrize("name", sorted(ARRAYS))
def test_bad_array_from_another_module(name):
    from cellprofiler_core.image import Image

    data, pattern = ARRAYS[name]
    with pytest.raises(RunCellplugError) as info:
        run_module(make_module(), {"DNA": Image(data, convert=False)}, {"DNA": f"{name}.tif"})
    msg = str(info.value)
    assert msg.startswith(f"RunCellplug (Cells), image set 1 ({name}.tif): cannot segment "
                          f"image 'DNA': "), msg
    assert re.search(pattern, msg), msg


@pytest.mark.parametrize("case", sorted(corpus.MODEL_CASES))
def test_model_case(case, tmp_path):
    """Every bad model file: the module's error names the image set and gives cellplug's
    reason, the same text as Segmenter.from_model; a pickled payload never runs."""
    from cellplug_cellprofiler.module import CUSTOM_MODEL
    from cellprofiler_core.preferences import ABSOLUTE_FOLDER_NAME

    from cellplug.errors import CellplugError
    from cellplug.segmenter import Segmenter

    path = corpus.MODEL_CASES[case](tmp_path)
    with pytest.raises(CellplugError) as api:
        Segmenter.from_model(str(path))
    module = make_module(model=CUSTOM_MODEL)
    module.model_directory.value = f"{ABSOLUTE_FOLDER_NAME}|{path.parent}"
    module.model_file_name.value = path.name
    with pytest.raises(RunCellplugError) as info:
        run_module(module, {"DNA": np.zeros((32, 32), np.uint8)}, {"DNA": "a.tif"})
    assert str(info.value) == (f"RunCellplug (Cells), image set 1 (a.tif): cannot load model: "
                               f"{' '.join(str(api.value).split())}")
    assert not (tmp_path / corpus.PAYLOAD_SENTINEL).exists()
