"""The pyimagej way, for a real Fiji: only where one is given (CELLPLUG_FIJI_DIR=PATH/Fiji.app
with `pip install './bridges/fiji[fiji]'`); Fiji's jars come from Maven, out of reach of the
machines CI runs on. It runs in a subprocess: this process's JVM holds plain ImageJ 1.x."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from conftest import NUCLEI, segment_reference

FIJI_DIR = os.environ.get("CELLPLUG_FIJI_DIR")

SCRIPT = r"""
import json, sys
import numpy as np
from cellplug_fiji import imagej1
bridge = imagej1.start(sys.argv[1])
from ij import IJ
imp = IJ.openImage(sys.argv[2])
imp.show()
IJ.run("Segment", "model=generalist diameter=0 cyto=0 nucleus=0 flow=0.4 cellprob=0")
labels = bridge.host.to_array(bridge.last_result["labels"])[0, 0, :, :, 0]
np.save(sys.argv[3], labels)
print(json.dumps({"error": bridge.last_error, "objects": bridge.last_result.get("objects"),
                  "host": bridge.host.name, "image": str(bridge.host.to_array(imp).dtype)}))
IJ.getInstance().quit()
"""


def test_xarray_dims_map_to_tzyxc():
    """pyimagej's dimension names (an xarray's .dims and .values; a stand-in here, xarray
    itself comes with the [fiji] extra) reorder to (T, Z, Y, X, C), pixel type unchanged."""
    from types import SimpleNamespace

    from cellplug_fiji.fiji import xarray_to_tzyxc

    data = np.arange(2 * 3 * 4 * 5, dtype=np.uint16).reshape(2, 3, 4, 5)
    out = xarray_to_tzyxc(SimpleNamespace(dims=("pln", "row", "col", "ch"), values=data))
    assert out.shape == (1, 2, 3, 4, 5) and out.dtype == np.uint16
    np.testing.assert_array_equal(out[0], data)
    out = xarray_to_tzyxc(SimpleNamespace(dims=("ch", "row", "col"), values=data[0]))
    np.testing.assert_array_equal(out[0, 0], np.moveaxis(data[0], 0, -1))


@pytest.mark.skipif(not FIJI_DIR, reason="no Fiji given (CELLPLUG_FIJI_DIR)")
def test_fiji_segment_equals_cli(display, tmp_path, reference_dir):
    expected = segment_reference(NUCLEI, reference_dir)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, FIJI_DIR, str(NUCLEI),
                           str(tmp_path / "labels.npy")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert doc["host"] == "Fiji (pyimagej)" and doc["error"] is None
    assert doc["image"] == str(tifffile.imread(NUCLEI).dtype)
    np.testing.assert_array_equal(np.load(tmp_path / "labels.npy"), expected)
    assert doc["objects"] == int(expected.max())
