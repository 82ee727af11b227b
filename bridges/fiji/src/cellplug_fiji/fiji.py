"""The pyimagej way, for a Fiji installation (``--fiji-dir`` / ``CELLPLUG_FIJI_DIR``).

Kept thin on purpose: pyimagej starts that Fiji (``imagej.init(DIR, mode="interactive")``)
and converts images (``ij.py.from_java`` / ``ij.py.to_java``); the menu, the dialogs, the
ROIs and everything else are the ImageJ 1.x classes that Fiji contains as well, driven by
:mod:`cellplug_fiji.imagej1`. Without a Fiji directory none of this is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cellplug.errors import CellplugError

from . import convert

# pyimagej's dimension names (and ImgLib2's) -> the (T, Z, Y, X, C) order of convert
_DIMS = {"t": "T", "time": "T", "pln": "Z", "z": "Z", "row": "Y", "y": "Y", "col": "X",
         "x": "X", "ch": "C", "c": "C", "channel": "C"}


def start_fiji(fiji_dir: Path) -> FijiHost:
    """Start the Fiji at ``fiji_dir`` in this process, with its GUI."""
    if not fiji_dir.is_dir():
        raise CellplugError(f"{fiji_dir}: not a folder (expected a Fiji.app)")
    try:
        import imagej
        import jpype.config
        import scyjava.config
    except ImportError:
        raise CellplugError("--fiji-dir needs pyimagej: pip install 'cellplug-fiji[fiji]'"
                            ) from None
    jpype.config.destroy_jvm = False  # else exit waits for Fiji's AWT threads: a hang
    # the system's Java, never a downloaded one ("never" trips a pyimagej bug)
    scyjava.config.set_java_constraints(fetch="auto")
    ij = imagej.init(str(fiji_dir), mode="interactive")
    from .jvm import stop_reference_queue_at_exit

    stop_reference_queue_at_exit()
    ij.ui().showUI()
    return FijiHost(ij)


def xarray_to_tzyxc(xarr: Any) -> np.ndarray:
    """An xarray from ``ij.py.from_java`` as (T, Z, Y, X, C), pixel type unchanged."""
    dims = [_DIMS.get(str(d).lower()) for d in xarr.dims]
    if None in dims or len(set(dims)) != len(dims):
        raise CellplugError(f"cannot map pyimagej's dimensions {xarr.dims} to an image")
    data = np.asarray(xarr.values)
    for missing in "TZYXC":
        if missing not in dims:
            data = data[..., np.newaxis]
            dims.append(missing)
    return np.ascontiguousarray(np.transpose(data, [dims.index(a) for a in "TZYXC"]))


class FijiHost:
    """How images cross in Fiji: pyimagej's converters."""

    name = "Fiji (pyimagej)"

    def __init__(self, ij: Any) -> None:
        self.ij = ij

    def to_array(self, imp: Any) -> np.ndarray:
        return xarray_to_tzyxc(self.ij.py.from_java(imp))

    def labels_to_imageplus(self, labels: np.ndarray, title: str, like: Any) -> Any:
        import xarray as xr

        from .imagej1 import finish_labels

        labels = convert.to_label_image(labels)
        dataset = self.ij.py.to_java(xr.DataArray(labels, dims=("t", "pln", "row", "col")))
        imp = self.ij.py.to_imageplus(dataset)
        imp.setTitle(title)
        return finish_labels(imp, labels, like)
