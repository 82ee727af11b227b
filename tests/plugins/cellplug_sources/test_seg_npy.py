"""The ``cellpose-seg-npy`` annotation source and writer (Cellpose GUI ``_seg.npy`` files)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from cellplug_sources.seg_npy import CellposeSegNpy, read_seg_npy, write_seg_npy

from cellplug.errors import CellplugError, InputError

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


class _Payload:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


@pytest.fixture
def pair():
    return tifffile.imread(EXAMPLES / "nuclei.tif"), tifffile.imread(EXAMPLES / "nuclei_masks.tif")


def test_written_seg_npy_is_read_back(tmp_path, pair):
    image, labels = pair
    flows = np.zeros((2, *labels.shape), np.float32)
    write_seg_npy(tmp_path / "a_seg.npy", image, labels, flows=flows,
                  cellprob=np.zeros(labels.shape, np.float32), diameter=48.6, filename="a.tif")
    data = read_seg_npy(tmp_path / "a_seg.npy")
    assert np.array_equal(data["masks"], labels) and data["masks"].dtype == np.uint16
    assert data["diameter"] == pytest.approx(48.6) and data["chan_choose"] == [0, 0]
    assert data["ismanual"].shape == (labels.max(),) and not data["ismanual"].any()
    assert set(np.unique(data["outlines"])) <= set(np.unique(labels))
    assert len(data["flows"]) == 5 and data["flows"][3].shape == (3, *labels.shape)
    # what numpy itself reads (what Cellpose's GUI does: np.load(allow_pickle=True).item())
    plain = np.load(tmp_path / "a_seg.npy", allow_pickle=True).item()
    assert np.array_equal(plain["img"], image)
    # the source pairs it with the image beside it, else takes the stored one
    (ann,) = list(CellposeSegNpy().read(tmp_path))
    assert ann.stem == "a" and np.array_equal(ann.image, image)
    assert np.array_equal(ann.labels, labels)
    shutil.copy(EXAMPLES / "nuclei.tif", tmp_path / "a.tif")
    (ann,) = list(CellposeSegNpy().read(tmp_path))
    assert np.array_equal(ann.image, image)


def test_seg_npy_with_a_pickle_payload_is_refused_and_never_runs(tmp_path):
    sentinel = tmp_path / "PAYLOAD_RAN"
    data = {"masks": np.zeros((4, 4), np.uint16), "evil": _Payload(sentinel)}
    np.save(tmp_path / "x_seg.npy", data, allow_pickle=True)
    with pytest.raises(CellplugError, match=r"x_seg.npy: not a readable Cellpose _seg.npy file "
                                            r"\(global posix.system is not allowed\)"):
        list(CellposeSegNpy().read(tmp_path))
    assert not sentinel.exists()


@pytest.mark.parametrize("masks, message", [
    (np.zeros((2, 4, 4), np.uint16), "must be a 2-D integer label image"),
    (np.zeros((4, 4), np.float32), "must be a 2-D integer label image"),
    (-np.ones((4, 4), np.int32), "negative labels"),
])
def test_bad_masks_are_named(tmp_path, masks, message):
    np.save(tmp_path / "x_seg.npy", {"masks": masks, "img": np.zeros((4, 4))}, allow_pickle=True)
    with pytest.raises(InputError, match=f"x_seg.npy: .*{message}"):
        list(CellposeSegNpy().read(tmp_path))


def test_no_image_anywhere_and_not_a_dict(tmp_path):
    np.save(tmp_path / "a_seg.npy", {"masks": np.zeros((4, 4), np.uint16)}, allow_pickle=True)
    with pytest.raises(InputError, match="a_seg.npy: no image a.tif"):
        list(CellposeSegNpy().read(tmp_path))
    np.save(tmp_path / "a_seg.npy", np.zeros(3))
    with pytest.raises(CellplugError, match="expected a Cellpose _seg.npy file"):
        list(CellposeSegNpy().read(tmp_path))


def test_segment_save_writes_files_the_sources_read_back(tmp_path):
    """``segment --save roi --save seg-npy``: the way back to Fiji and Cellpose, and again in."""
    from click.testing import CliRunner

    from cellplug.annotations import read_annotations
    from cellplug.cli import main

    shutil.copy(EXAMPLES / "nuclei.tif", tmp_path / "cells.tif")
    r = CliRunner().invoke(main, ["segment", str(tmp_path / "cells.tif"), "--save", "roi",
                                  "--save", "seg-npy", "-q"])
    assert r.exit_code == 0, r.output
    masks = tifffile.imread(tmp_path / "cells_masks.tif")
    assert masks.max() > 10
    for source in ("imagej-roi", "cellpose-seg-npy", "mask-folder"):
        (ann,) = list(read_annotations(tmp_path, source))
        assert ann.stem == "cells" and np.array_equal(ann.labels, masks), source
