"""The bad-input corpus (tests/data/bad/make_corpus.py) through ``cellplug fiji segment``, the
command the standalone Segment macro runs on the image ImageJ saved.

Every image case ends in one of two ways: a clean exit (odd-but-valid images) with both
outputs, or a non-zero exit with one ``error:`` line naming the file, the same line in
``error.txt`` for the macro to show, no traceback, and no partial output.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
_spec = importlib.util.spec_from_file_location("make_corpus",
                                               REPO / "tests/data/bad/make_corpus.py")
corpus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corpus)


@pytest.mark.parametrize("case", sorted(corpus.IMAGE_CASES))
def test_bad_image_through_fiji_segment(case, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    path = corpus.IMAGE_CASES[case](src)
    out = tmp_path / "out"
    out.mkdir()
    r = subprocess.run([sys.executable, "-m", "cellplug.cli", "fiji", "segment", str(path),
                        "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    made = sorted(p.name for p in out.iterdir())
    if r.returncode == 0:
        assert made in (["labels.tif"], ["RoiSet.zip", "labels.tif"]), made
        return
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    assert path.name in errors[0] or str(path) in errors[0], errors[0]
    assert made == ["error.txt"], made  # the message for the macro, nothing half-written
    assert (out / "error.txt").read_text().strip() in errors[0]
