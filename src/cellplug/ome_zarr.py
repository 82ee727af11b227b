"""Labels in OME-Zarr (the NGFF ``labels/`` layout), and tiled TIFF labels.

Layout written (what ``ome-zarr``'s reader and napari-ome-zarr read)::

    IMAGE.ome.zarr/             image group: "multiscales" (axes [c,] y, x), level "0"
        0/                      the image (copied from a TIFF, or the input OME-Zarr's own)
        labels/                 group: {"labels": ["masks", ...]}
            masks/              label image: "multiscales" (y, x) + "image-label"
                0/              uint32 (Y, X), chunked like the segmentation blocks

New containers are NGFF 0.4 (zarr format 2, read by every NGFF reader); labels added to an
existing OME-Zarr follow its format (NGFF 0.5 / zarr format 3 when it has ``zarr.json``).
Only level 0 is written (no pyramid). Writes are all or none: a new container is built
under a hidden temporary name and renamed into place; labels added to an existing
OME-Zarr are built under ``labels/.NAME.partial-PID`` and renamed, and the ``labels``
list is rewritten last (a file rename), so a killed run leaves the previous state.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .lazy import ngff_attrs

NGFF_VERSION = "0.4"


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, path)


def zarr_format_of(path: str | os.PathLike[str]) -> int:
    """2 (``.zgroup``/``.zattrs``, NGFF 0.4) or 3 (``zarr.json``, NGFF 0.5)."""
    return 3 if (Path(path) / "zarr.json").is_file() else 2


def _group(path: Path, attrs: dict[str, Any], fmt: int = 2) -> None:
    """A zarr group with NGFF ``attrs`` (format 3: under "ome", with version 0.5)."""
    path.mkdir(parents=True, exist_ok=True)
    if fmt == 3:
        _write_json(path / "zarr.json", {"zarr_format": 3, "node_type": "group",
                                         "attributes": {"ome": {"version": "0.5", **attrs}}})
    else:
        _write_json(path / ".zgroup", {"zarr_format": 2})
        _write_json(path / ".zattrs", attrs)


def _multiscales(axes: list[dict[str, str]], name: str, fmt: int = 2) -> dict[str, Any]:
    version = {"version": NGFF_VERSION} if fmt == 2 else {}
    return {"multiscales": [{
        **version, "name": name, "axes": axes,
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [1.0] * len(axes)}]}],
    }]}


YX_AXES = [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}]


def label_metadata(name: str, fmt: int = 2) -> dict[str, Any]:
    """NGFF attributes of a label image: multiscales over (y, x) plus image-label."""
    version = {"version": NGFF_VERSION} if fmt == 2 else {}
    return {**_multiscales(YX_AXES, name, fmt),
            "image-label": {**version, "source": {"image": "../../"}}}


def _new_label_image(folder: Path, name: str, shape: tuple[int, int], chunk: int,
                     fmt: int = 2) -> Any:
    from .blockwise import create_labels_array

    _group(folder, label_metadata(name, fmt), fmt)
    return create_labels_array(folder / "0", shape, chunk, zarr_format=fmt)


def _copy_image(image: Any, target: Path, chunk: int) -> None:
    """Write ``image`` (Y, X[, C], array-like) as level 0 of a new image group at ``target``
    (stored c, y, x), one chunk at a time."""
    import zarr

    ly, lx = int(image.shape[0]), int(image.shape[1])
    has_c = len(image.shape) == 3
    axes = ([{"name": "c", "type": "channel"}] if has_c else []) + YX_AXES
    _group(target, _multiscales(axes, target.stem))
    shape = ((int(image.shape[2]),) if has_c else ()) + (ly, lx)
    chunks = ((int(image.shape[2]),) if has_c else ()) + (chunk, chunk)
    arr = zarr.open_array(str(target / "0"), mode="w", shape=shape, chunks=chunks,
                          dtype=np.dtype(image.dtype), zarr_format=2, dimension_separator="/")
    for y in range(0, ly, chunk):
        for x in range(0, lx, chunk):
            win = np.asarray(image[y:y + chunk, x:x + chunk])
            if has_c:
                arr[:, y:y + chunk, x:x + chunk] = np.moveaxis(win, -1, 0)
            else:
                arr[y:y + chunk, x:x + chunk] = win


def labels_into(
    container: str | os.PathLike[str], shape: tuple[int, int], chunk: int,
    fill: Callable[[Any], None], image: Any = None, name: str = "masks",
) -> Path:
    """Write labels (Y, X) uint32 as ``container/labels/NAME`` with ``fill(zarr_array)``.

    An existing OME-Zarr ``container`` gets the labels beside its image (replacing labels of
    the same name only when ``fill`` succeeded). Otherwise a new container is made from
    ``image`` (Y, X[, C]; required then), copied chunk by chunk. Returns the label image's
    path.
    """
    container = Path(container)
    if container.exists() and ngff_attrs(container).get("multiscales"):
        fmt = zarr_format_of(container)
        labels_dir = container / "labels"
        if not labels_dir.exists():
            _group(labels_dir, {"labels": []}, fmt)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=labels_dir))
        try:
            fill(_new_label_image(tmp, name, shape, chunk, fmt))
            final = labels_dir / name
            old = None
            if final.exists():
                old = labels_dir / f".{name}.old-{os.getpid()}"
                os.replace(final, old)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        attrs = {k: v for k, v in ngff_attrs(labels_dir).items() if k != "version"}
        names = [n for n in attrs.get("labels", []) if n != name] + [name]
        _group(labels_dir, {**attrs, "labels": names}, fmt)
        return final
    if image is None:
        raise ValueError(f"{container} is not an OME-Zarr image; give the image to copy")
    if container.exists():
        from .errors import CellplugError

        raise CellplugError(f"{container} exists and is not an OME-Zarr image (no "
                            f"multiscales); give another --out folder (nothing was written)")
    container.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{container.name}.partial-", dir=container.parent))
    try:
        _copy_image(image, tmp, chunk)
        _group(tmp / "labels", {"labels": [name]})
        fill(_new_label_image(tmp / "labels" / name, name, shape, chunk))
        old = None
        if container.exists():
            old = container.with_name(f".{container.name}.old-{os.getpid()}")
            os.replace(container, old)
        os.replace(tmp, container)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return container / "labels" / name


def read_labels(container: str | os.PathLike[str], name: str = "masks") -> Any:
    """The label array (zarr, (Y, X)) ``container/labels/NAME/0``."""
    import zarr

    return zarr.open_array(str(Path(container) / "labels" / name / "0"), mode="r")


def _tiles(arr: Any, tile: int, dtype: np.dtype) -> Iterator[np.ndarray]:
    ly, lx = arr.shape
    for y in range(0, ly, tile):
        for x in range(0, lx, tile):
            t = np.zeros((tile, tile), dtype)
            win = np.asarray(arr[y:y + tile, x:x + tile])
            t[:win.shape[0], :win.shape[1]] = win
            yield t


def write_tiled_tiff(path: str | os.PathLike[str], labels: Any, n_objects: int,
                     tile: int = 512) -> Path:
    """Write labels (Y, X) (zarr or numpy) as a tiled, zlib-compressed TIFF, a tile at a time
    (uint16 when ``n_objects`` fits, else uint32), atomically."""
    import tifffile

    from .io import atomic_path

    dtype = np.dtype(np.uint16 if n_objects < 2**16 else np.uint32)
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, _tiles(labels, tile, dtype), shape=tuple(labels.shape),
                         dtype=dtype, tile=(tile, tile), compression="zlib",
                         photometric="minisblack", metadata={"axes": "YX"},
                         bigtiff=labels.shape[0] * labels.shape[1] * dtype.itemsize > 2**31)
    return Path(path)
