"""Annotation source and writer: Cellpose GUI files, ``<stem>_seg.npy``.

A ``_seg.npy`` is ``np.save`` of a dict, i.e. a pickle. It is read with
:func:`cellplug.safeload.load_pickled_npy`, which builds arrays and plain containers only and
refuses anything else (a file carrying code is an error; the code never runs). Never
``allow_pickle=True`` on a user's file.

Reading: ``masks`` is the label image. The image is the file beside it with the same stem
(``<stem>.tif``, ``.png``...), else the ``img`` the GUI stored in the file. Masks the user
drew or edited are flagged in ``ismanual``; cellplug trains on the whole label image (a
partial correction is trained on as complete, so correct every object in an image you keep).

Writing: the keys the Cellpose GUI reads (``masks``, ``outlines``, ``chan_choose``,
``ismanual``, ``filename``, ``flows``, ``diameter``, ``est_diam``, ``colors``, ``img``), so a
segmentation from cellplug can be corrected in the Cellpose GUI and read back here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cellplug.annotations import Annotation, read_each
from cellplug.errors import CellplugError, InputError
from cellplug.io import IMAGE_SUFFIXES, read_image
from cellplug.safeload import load_pickled_npy

SUFFIX = "_seg.npy"


def read_seg_npy(path: Path) -> dict[str, Any]:
    """The dict of a ``_seg.npy``, checked to hold a 2-D integer ``masks`` array."""
    data = load_pickled_npy(path, what="Cellpose _seg.npy file")
    if not isinstance(data, dict) or "masks" not in data:
        raise InputError(path, "not a Cellpose _seg.npy file (no 'masks' entry)")
    masks = np.asarray(data["masks"])
    if masks.ndim != 2 or not (np.issubdtype(masks.dtype, np.integer) or masks.dtype == bool):
        raise InputError(path, f"'masks' must be a 2-D integer label image, got {masks.dtype} "
                               f"{masks.shape} (3-D _seg.npy files are not supported)")
    if masks.size and masks.min() < 0:
        raise InputError(path, "'masks' has negative labels")
    return data


def outlines(labels: np.ndarray) -> np.ndarray:
    """Label of each object's boundary pixels (inner boundary), 0 elsewhere, as Cellpose."""
    from skimage.segmentation import find_boundaries

    return np.where(find_boundaries(labels, mode="inner"), labels, 0).astype(labels.dtype)


def write_seg_npy(path: Path, image: np.ndarray, labels: np.ndarray,
                  flows: np.ndarray | None = None, cellprob: np.ndarray | None = None,
                  diameter: float = 0.0, channels: tuple[int, int] = (0, 0),
                  filename: str = "") -> None:
    """Write a ``_seg.npy`` the Cellpose GUI opens (image, masks and, if given, flows)."""
    from cellplug.render import flow_to_rgb

    labels = np.asarray(labels)
    masks = labels.astype(np.uint16 if labels.max(initial=0) < 2**16 else np.uint32)
    n = int(masks.max(initial=0))
    rng = np.random.default_rng(0)
    shape = masks.shape
    if flows is not None and cellprob is not None:
        prob = np.clip(1 / (1 + np.exp(-cellprob)) * 255, 0, 255).astype(np.uint8)
        flow_list = [flow_to_rgb(flows)[None], prob[None], np.zeros((1, *shape), np.uint8),
                     np.concatenate([flows * 5, cellprob[None]]).astype(np.float32),
                     np.zeros((2, *shape), np.float32)]
    else:
        flow_list = [np.zeros((1, *shape, 3), np.uint8), np.zeros((1, *shape), np.uint8),
                     np.zeros((1, *shape), np.uint8)]
    data = {
        "img": np.asarray(image),
        "masks": masks,
        "outlines": outlines(masks),
        "chan_choose": [int(channels[0]), int(channels[1])],
        "ismanual": np.zeros(n, bool),
        "filename": filename,
        "flows": flow_list,
        "diameter": float(diameter),
        "est_diam": float(diameter),
        "colors": rng.integers(0, 255, (n, 3)).astype(np.uint8),
    }
    with open(path, "wb") as fh:  # np.save would add .npy to a temporary name
        np.save(fh, data, allow_pickle=True)


class CellposeSegNpy:
    """Folder source: ``<stem>_seg.npy`` files, with their images beside them or inside."""

    name = "cellpose-seg-npy"
    output_suffix = SUFFIX

    def files(self, folder: Path) -> list[Path]:
        return sorted(f for f in folder.glob(f"*{SUFFIX}") if not f.name.startswith("."))

    def detect(self, location: Path) -> bool:
        return location.is_dir() and bool(self.files(location))

    def _image(self, seg: Path, data: dict[str, Any]) -> np.ndarray:
        stem = seg.name[: -len(SUFFIX)]
        for ext in IMAGE_SUFFIXES:
            for candidate in (seg.with_name(stem + ext), seg.with_name(stem + ext.upper())):
                if candidate.is_file():
                    return read_image(candidate)
        if "img" in data and np.asarray(data["img"]).ndim in (2, 3):
            img = np.asarray(data["img"])
            # the GUI stores (Y, X, C) or (C, Y, X): put channels last
            if img.ndim == 3 and img.shape[0] <= 8 and img.shape[1:] == data["masks"].shape:
                img = np.moveaxis(img, 0, -1)
            return img
        raise InputError(seg, f"no image {stem}.tif (or .png...) beside it and no 'img' inside")

    def read(self, location: Path,
             on_error: Callable[[CellplugError], None] | None = None) -> Iterator[Annotation]:
        files = self.files(location)
        if not files:
            raise InputError(location, f"no *{SUFFIX} files")
        def load(seg: Path) -> Annotation:
            data = read_seg_npy(seg)
            return Annotation(self._image(seg, data), np.asarray(data["masks"]),
                              seg.name[: -len(SUFFIX)], str(seg))

        yield from read_each(files, load, on_error)

    def write(self, path: Path, image: np.ndarray, labels: np.ndarray, **extra: Any) -> None:
        write_seg_npy(path, image, labels, **extra)
