"""napari reader for cellplug's outputs: label TIFFs (``<stem>_masks.tif``), ImageJ ROI sets
(``<stem>_RoiSet.zip``, ``.zip``, ``.roi``) and Cellpose GUI files (``<stem>_seg.npy``).

Each opens as a Labels layer, read by cellplug's own readers (those the annotation sources
use); a ``_seg.npy`` also gives its stored image. A ROI set is rasterised at the size of the
image of the same stem beside it, else at the ROIs' extent.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

LayerData = tuple[Any, dict[str, Any], str]
ReaderFunction = Callable[[Any], list[LayerData]]

MASK_SUFFIXES = ("_masks.tif", "_masks.tiff")
SEG_SUFFIX = "_seg.npy"
ROI_SUFFIXES = ("_RoiSet.zip", ".zip", ".roi")


def get_reader(path: str | list[str]) -> ReaderFunction | None:
    """npe2 reader contribution: a function reading ``path``, or None if it is not ours."""
    paths = [path] if isinstance(path, str | Path) else list(path)
    if not paths or not all(_kind(Path(p)) for p in paths):
        return None
    return read


def _kind(path: Path) -> str | None:
    name = path.name
    if name.endswith(SEG_SUFFIX):
        return "seg-npy"
    if name.lower().endswith(MASK_SUFFIXES):
        return "labels"
    if name.lower().endswith(".roi"):
        return "roi"
    if name.lower().endswith(".zip") and path.is_file():
        try:
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if not n.endswith("/")]
        except (OSError, zipfile.BadZipFile):
            return None
        # an ImageJ ROI set holds .roi entries only (an empty set is an empty zip)
        if all(n.lower().endswith(".roi") for n in names):
            return "roi"
    return None


def read(path: str | list[str]) -> list[LayerData]:
    """Layer data for each path (see the module doc)."""
    paths = [path] if isinstance(path, str | Path) else list(path)
    out: list[LayerData] = []
    for p in paths:
        out.extend(_read_one(Path(p)))
    return out


def _stem(path: Path, suffixes: tuple[str, ...]) -> str:
    for suffix in suffixes:
        if path.name.lower().endswith(suffix.lower()):
            return path.name[: -len(suffix)]
    return path.stem


def _read_one(path: Path) -> list[LayerData]:
    kind = _kind(path)
    if kind == "labels":
        from cellplug.io import read_labels

        stem = _stem(path, MASK_SUFFIXES)
        return [(read_labels(path), {"name": f"{stem} labels"}, "labels")]
    if kind == "seg-npy":
        from cellplug_sources.seg_npy import read_seg_npy

        data = read_seg_npy(path)
        stem = path.name[: -len(SEG_SUFFIX)]
        layers: list[LayerData] = []
        img = np.asarray(data.get("img")) if data.get("img") is not None else None
        masks = np.asarray(data["masks"])
        if img is not None and img.ndim in (2, 3) and img.shape[:2] == masks.shape:
            layers.append((img, {"name": stem, "rgb": img.ndim == 3 and img.shape[2] in (3, 4)},
                           "image"))
        layers.append((masks, {"name": f"{stem} labels"}, "labels"))
        return layers
    if kind == "roi":
        from cellplug_sources.imagej_roi import read_rois, rois_to_labels

        rois = read_rois(path)
        stem = _stem(path, ROI_SUFFIXES)
        shape = _image_shape(path.parent, stem) or _roi_extent(rois)
        return [(rois_to_labels(rois, shape, path), {"name": f"{stem} ROIs"}, "labels")]
    raise ValueError(f"{path}: not a cellplug output")


def _image_shape(folder: Path, stem: str) -> tuple[int, int] | None:
    from cellplug.io import IMAGE_SUFFIXES, read_image

    for ext in IMAGE_SUFFIXES:
        candidate = folder / f"{stem}{ext}"
        if candidate.is_file():
            return tuple(read_image(candidate).shape[:2])  # type: ignore[return-value]
    return None


def _roi_extent(rois: list) -> tuple[int, int]:
    bottom = max((int(r.bottom) for r in rois), default=1)
    right = max((int(r.right) for r in rois), default=1)
    return max(bottom, 1), max(right, 1)
