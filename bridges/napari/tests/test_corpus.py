"""The bad-input corpus (tests/data/bad/make_corpus.py) through the napari reader: each bad
annotation file (a ``_seg.npy`` with a pickle payload, 3-D masks or the wrong shape, a
corrupt ROI zip, negative or fractional labels) is refused with an error that names the file,
or read; a pickled payload never runs. A file that is not a zip at all is not claimed, so
napari itself reports that no reader can open it."""

from __future__ import annotations

import importlib.util

import pytest
from cellplug_napari._reader import get_reader
from conftest import REPO

from cellplug.errors import CellplugError

_spec = importlib.util.spec_from_file_location("make_corpus",
                                               REPO / "tests/data/bad/make_corpus.py")
corpus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corpus)


@pytest.mark.parametrize("case", sorted(corpus.ANNOTATION_CASES))
def test_bad_annotation_through_the_reader(case, tmp_path):
    folder = corpus.ANNOTATION_CASES[case](tmp_path)
    if case == "roi_zip_corrupt":  # not a zip: the reader declines, napari says none can read it
        assert get_reader(str(folder / "cells_RoiSet.zip")) is None
        return
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and get_reader(str(p))]
    labels_like = [p for p in files if not p.name.endswith((".tif", ".png"))
                   or "_masks" in p.name]
    assert labels_like, f"no file of {case} is offered to the reader: {files}"
    for path in labels_like:
        reader = get_reader(str(path))
        try:
            layers = reader(str(path))
        except CellplugError as exc:
            assert path.name in str(exc) or str(path) in str(exc), str(exc)
        else:
            assert layers and all(layer[2] in ("labels", "image") for layer in layers)
    assert not list(tmp_path.rglob(corpus.PAYLOAD_SENTINEL)), "a pickled payload ran"
