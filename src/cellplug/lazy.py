"""Images read lazily, a window at a time: TIFF (tiled, pyramidal or plain, through
tifffile's zarr store) and OME-Zarr / plain zarr (through ``zarr``).

A :class:`LazyImage` looks like a (Y, X) or (Y, X, C) array: ``shape``, ``dtype``, ``ndim``
and ``image[y0:y1, x0:x1]`` (also with a step) returning numpy in that order. It holds only
the path and the axis order, so it pickles cheaply to dask workers, each of which opens the
file itself.

Axes: a TIFF's own axes (tifffile's series axes, OME-TIFF included) or ``axes=``; an
OME-Zarr's ``multiscales`` axes (level 0 is read). C (or S, RGB samples) is the channel
axis; other axes of length 1 are dropped; a Z or T axis longer than one is a stack,
refused here (see :mod:`cellplug.stacks`).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError

ZARR_SUFFIXES = (".zarr",)


def is_zarr_path(path: str | os.PathLike[str]) -> bool:
    """A folder ending in .zarr (OME-Zarr or plain zarr)."""
    p = Path(path)
    return p.suffix.lower() in ZARR_SUFFIXES or p.name.lower().endswith(".ome.zarr")


def ngff_attrs(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The NGFF attributes of a zarr group (v2 ``.zattrs``, or v3 ``zarr.json``'s
    ``attributes``, with NGFF 0.5's ``ome`` key unwrapped); {} if none."""
    p = Path(path)
    if (p / ".zattrs").is_file():
        attrs = json.loads((p / ".zattrs").read_text())
    elif (p / "zarr.json").is_file():
        attrs = json.loads((p / "zarr.json").read_text()).get("attributes", {})
    else:
        return {}
    return attrs.get("ome", attrs)


_OPEN: dict[tuple[str, int], Any] = {}
_OPEN_LOCK = threading.Lock()


class LazyImage:
    """A 2-D image (Y, X) or (Y, X, C) on disk, read one window at a time.

    ``path``: TIFF or zarr folder; ``axes``: the stored dimension order (tifffile letters,
    e.g. ``"CYX"``), overriding the file's.
    """

    def __init__(self, path: str | os.PathLike[str], axes: str | None = None) -> None:
        self.path = str(path)
        self.stored_axes, shape, self.dtype = _describe(Path(path), axes)
        self._order, self.shape = _yxc_order(self.stored_axes, shape, Path(path))
        self.ndim = len(self.shape)

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def _array(self) -> Any:
        key = (self.path, os.getpid())
        with _OPEN_LOCK:
            arr = _OPEN.get(key)
            if arr is None:
                arr = _OPEN[key] = _open_array(Path(self.path))
        return arr

    def __getitem__(self, item: Any) -> np.ndarray:
        if not isinstance(item, tuple):
            item = (item,)
        ys = item[0] if len(item) > 0 else slice(None)
        xs = item[1] if len(item) > 1 else slice(None)
        index = []
        for a in self.stored_axes:
            if a == "Y":
                index.append(ys)
            elif a == "X":
                index.append(xs)
            elif a in "CS" and a in self._order:
                index.append(slice(None))
            else:
                index.append(0)
        try:
            data = np.asarray(self._array()[tuple(index)])
        except InputError:
            raise
        except MemoryError:
            raise InputError(self.path, "window too large to load into memory") from None
        except Exception as exc:  # corrupt tiles or chunks: several types
            raise InputError(self.path, f"cannot read pixels ({type(exc).__name__}: "
                                        f"{exc})") from None
        kept = [a for a in self.stored_axes if a in "YX" or (a in "CS" and a in self._order)]
        return np.transpose(data, [kept.index(a) for a in self._order])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:, :]
        return out if dtype is None else out.astype(dtype)

    def __repr__(self) -> str:
        return f"LazyImage({self.path!r}, axes={''.join(self.stored_axes)!r}, shape={self.shape})"


def _describe(path: Path, axes: str | None) -> tuple[str, tuple[int, ...], np.dtype]:
    if not path.exists():
        raise InputError(path, "no such file")
    if is_zarr_path(path) or path.is_dir():
        arr = _open_array(path)
        stored = _zarr_axes(path, arr.ndim)
    else:
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                stored = series.axes
                arr = series  # shape, dtype
        except Exception as exc:
            raise InputError(path, f"not a readable TIFF ({type(exc).__name__}: {exc})") from None
    shape, dtype = tuple(int(s) for s in arr.shape), np.dtype(arr.dtype)
    if axes is not None:
        if len(axes) != len(shape):
            raise InputError(path, f"axes {axes!r} do not fit the stored shape {shape}")
        stored = axes
    return stored.upper(), shape, dtype


def _zarr_axes(path: Path, ndim: int) -> str:
    attrs = ngff_attrs(path)
    ms = attrs.get("multiscales")
    if ms:
        names = [a["name"] if isinstance(a, dict) else a for a in ms[0].get("axes", [])]
        if len(names) == ndim:
            return "".join(n[0].upper() for n in names)
    return {2: "YX", 3: "CYX"}.get(ndim, "TCZYX"[-ndim:] if ndim <= 5 else "")


def _open_array(path: Path) -> Any:
    """The level-0 array of a TIFF (zarr view) or zarr folder."""
    from .blockwise import require_scale

    require_scale("zarr")
    import zarr

    try:
        if is_zarr_path(path) or path.is_dir():
            attrs = ngff_attrs(path)
            ms = attrs.get("multiscales")
            if ms:
                return zarr.open_array(str(path / ms[0]["datasets"][0]["path"]), mode="r")
            node = zarr.open(str(path), mode="r")
            return node if hasattr(node, "shape") else node["0"]
        import tifffile

        node = zarr.open(tifffile.imread(path, aszarr=True), mode="r")
        return node if hasattr(node, "shape") else node["0"]
    except InputError:
        raise
    except Exception as exc:
        raise InputError(path, f"cannot open lazily ({type(exc).__name__}: {exc})") from None


def _yxc_order(axes: str, shape: tuple[int, ...], path: Path) -> tuple[str, tuple[int, ...]]:
    """The (Y, X[, C]) order of stored ``axes`` and the resulting shape; stacks refused."""
    if "Y" not in axes or "X" not in axes:
        raise InputError(path, f"cannot find Y and X axes (axes {axes}, shape {shape})")
    dims = dict(zip(axes, shape, strict=True))
    extra = [a for a in axes if a not in "YX" and dims[a] > 1]
    chan = [a for a in extra if a in "CS"]
    other = [a for a in extra if a not in "CS"]
    if other or len(chan) > 1:
        raise InputError(path, f"expected a 2-D image (Y, X) or (Y, X, C); got axes {axes} "
                               f"with shape {shape} (stacks: segment them with --stack)")
    order = "YX" + "".join(chan)
    return order, tuple(dims[a] for a in order)


def open_image(path: str | os.PathLike[str], axes: str | None = None) -> LazyImage:
    """A :class:`LazyImage` of ``path`` (TIFF or zarr folder)."""
    return LazyImage(path, axes)
