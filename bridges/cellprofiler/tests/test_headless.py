"""Headless CellProfiler (`cellprofiler -c -r`) with the example pipeline (tests 3 and 4 of
issue 19): NamesAndTypes -> RunCellplug -> MeasureObjectSizeShape -> ExportToSpreadsheet."""

from __future__ import annotations

import csv
import shutil
import subprocess

import numpy as np
import pytest
from conftest import EXAMPLE_PIPELINE, GRAY, cellprofiler_cmd, env_without_display

IMAGES = ["nuclei", "dsb2018_fluo", "dsb2018_bf"]


def _headless(pipeline, plugins_dir, tmp_path, *extra):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    out.mkdir()
    for name in IMAGES:
        shutil.copy(GRAY[name], inp)
    proc = subprocess.run(
        [cellprofiler_cmd(), "-c", "-r", "-p", str(pipeline), "--plugins-directory",
         str(plugins_dir), "-i", str(inp), "-o", str(out), "--enable-readers",
         "imageio_reader", *extra],
        capture_output=True, text=True, timeout=900, env=env_without_display())
    return proc, out


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_example_pipeline_counts_equal_cellplug_segment(plugins_dir, tmp_path, reference):
    proc, out = _headless(EXAMPLE_PIPELINE, plugins_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    images = {r["FileName_DNA"]: r for r in _rows(out / "MyExpt_Image.csv")}
    assert sorted(images) == sorted(GRAY[n].name for n in IMAGES)
    objects = _rows(out / "MyExpt_Nuclei.csv")
    for name in IMAGES:
        row = images[GRAY[name].name]
        ref = reference[name]
        assert int(float(row["Count_Nuclei"])) == ref["objects"] > 0, name
        assert float(row["RunCellplug_Diameter_Nuclei"]) == pytest.approx(ref["diameter"],
                                                                         abs=0.01)
        # every object's area, as MeasureObjectSizeShape saw it, equals cellplug's
        areas = [float(o["AreaShape_Area"]) for o in objects
                 if o["ImageNumber"] == row["ImageNumber"]]
        assert areas == np.bincount(ref["labels"].ravel())[1:].astype(float).tolist(), name


def _bad_model_pipeline(tmp_path):
    text = EXAMPLE_PIPELINE.read_text()
    for old, new in [("    Model:generalist", "    Model:Custom model file"),
                     ("    Location of the model file:Elsewhere...|",
                      f"    Location of the model file:Elsewhere...|{tmp_path / 'models'}"),
                     ("    Model file name:model.pth", "    Model file name:missing.pth")]:
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "bad_model.cppipe"
    path.write_text(text)
    return path


def test_bad_model_is_an_image_set_error_not_a_crash(plugins_dir, tmp_path):
    proc, out = _headless(_bad_model_pipeline(tmp_path), plugins_dir, tmp_path)
    # CellProfiler stops the run at the failing image set and exits 1 by itself
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Error detected during run of module RunCellplug" in proc.stderr
    missing = tmp_path / "models" / "missing.pth"
    assert (f"RunCellplugError: RunCellplug (Nuclei), image set 1 (dsb2018_bf.tif): cannot "
            f"load model: {missing}: model file not found") in proc.stderr


def test_bad_model_with_always_continue(plugins_dir, tmp_path):
    proc, out = _headless(_bad_model_pipeline(tmp_path), plugins_dir, tmp_path,
                          "--always-continue")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for number, name in enumerate(sorted(GRAY[n].name for n in IMAGES), start=1):
        assert f"image set {number} ({name}): cannot load model" in proc.stderr
    rows = _rows(out / "MyExpt_Image.csv")
    assert len(rows) == 3 and not any(r.get("Count_Nuclei") for r in rows)
