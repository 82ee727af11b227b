"""Reading pickled ``.npy`` files (Cellpose's ``_size.npy`` and ``_seg.npy``) without running code.

These files are ``np.save`` of a dict, i.e. a pickle, so ``np.load(allow_pickle=True)`` on
a file from elsewhere can run anything. :func:`load_pickled_npy` parses the ``.npy`` header
itself and unpickles with :class:`ArrayOnlyUnpickler`, which builds numpy arrays, numpy
scalars and dtypes, and plain containers, and refuses every other global.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CellplugError


class ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, scalars and plain containers; refuses everything else.

    Lists, tuples, dicts, strings, numbers, booleans and None need no global and are always
    allowed; the globals below are the only ones numpy's own pickles of arrays use.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("builtins", "dict"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def load_pickled_npy(path: str | os.PathLike[str], what: str = "pickled .npy file") -> Any:
    """The object saved in an object-dtype ``.npy`` file (``np.save`` of a dict or list).

    A 0-d object array is unwrapped (``np.save(f, {...})`` stores one). Raises
    :class:`CellplugError` naming ``path`` and ``what`` when the file cannot be read, is not
    an object ``.npy``, or pickles anything but arrays and plain containers.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CellplugError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    try:
        buf = io.BytesIO(raw)
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            _shape, _fortran, dtype = np.lib.format.read_array_header_1_0(buf)
        elif version == (2, 0):
            _shape, _fortran, dtype = np.lib.format.read_array_header_2_0(buf)
        else:
            raise CellplugError(f"{path}: unsupported .npy format version {version}")
        if dtype != np.dtype(object):
            raise CellplugError(f"{path}: expected a {what} (a pickled dict)")
        obj = ArrayOnlyUnpickler(buf).load()
    except CellplugError:
        raise
    except Exception as exc:
        raise CellplugError(f"{path}: not a readable {what} ({exc})") from None
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj.item()
    return obj
