"""Z-stacks and time series: what ``cellplug segment --stack`` does with more than one plane.

Axes come from the file (tifffile's series axes: OME-TIFF and ImageJ hyperstacks name T, Z
and C) or from ``--axes``; an axis of unknown meaning (a TIFF without metadata) is taken as
Z. C (or S, RGB samples) stays the channel axis and is used as ``--channels`` says.

- **Z** (a z-stack): each plane is segmented on its own, with one diameter for the whole
  stack (estimated on the middle plane when not given) and each plane normalised on its own
  (as Cellpose's 2-D mode on a stack). Labels are numbered through the stack (no id is used
  in two planes). With ``stitch_threshold`` > 0, an object of plane z+1 whose best IoU with
  an object of plane z is at least the threshold takes that object's id: 3-D objects,
  Cellpose's ``stitch_threshold`` (``stitch3D``).
- **T** (a time series): each frame on its own, labels 1..n per frame (no tracking: ids
  are not linked through time).
- **T and Z**: each time point is a z-stack as above.

Output: labels (T?, Z?, Y, X) uint32, saved as ``<stem>_masks.tif`` with those axes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError

STACK_AXES = "TZ"


def read_stack(path: str | os.PathLike[str], axes: str | None = None
               ) -> tuple[np.ndarray, str]:
    """A TIFF as (lead..., Y, X[, C]) and its leading axes (``""``, ``"Z"``, ``"T"`` or
    ``"TZ"``); length-1 axes are dropped. Raises :class:`InputError` as
    :func:`cellplug.io.read_image` does (size, values, unknown axes)."""
    from . import io

    path = Path(path)
    if path.suffix.lower() not in io.TIFF_SUFFIXES:
        return io.read_image(path, axes=axes), ""
    import tifffile

    if not path.is_file():
        raise InputError(path, "no such file")
    try:
        with io._quiet_tifffile(), tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            io._check_size(series.shape, series.dtype, path)
            data = np.asarray(series.asarray())
            stored = series.axes
    except InputError:
        raise
    except Exception as exc:
        raise InputError(path, f"not a readable TIFF ({type(exc).__name__}: {exc})") from None
    stored = (io._given_axes(axes, data, path) or stored).upper()
    keep = [i for i, a in enumerate(stored) if a in "YX" or data.shape[i] != 1]
    data = data.reshape([data.shape[i] for i in keep])
    stored = "".join(stored[i] for i in keep)
    named = "".join({"Q": "Z", "I": "Z", "S": "C"}.get(a, a) for a in stored)
    if len(set(named)) != len(named) or any(a not in "TZCYX" for a in named):
        raise InputError(path, f"cannot segment axes {stored} (shape {data.shape}): expected "
                               f"T, Z, C, Y and X")
    if "Y" not in named or "X" not in named:
        raise InputError(path, f"cannot find Y and X axes (axes {stored})")
    lead = "".join(a for a in STACK_AXES if a in named)
    order = [named.index(a) for a in lead + "YX" + ("C" if "C" in named else "")]
    data = io._check_values(np.ascontiguousarray(np.transpose(data, order)), path)
    return data, lead


def stitch_planes(labels: np.ndarray, threshold: float) -> np.ndarray:
    """Link the objects of consecutive planes of ``labels`` (Z, Y, X) uint32 (ids unique
    through the stack): an object of plane z+1 takes the id of its best-IoU object in plane
    z when that IoU is at least ``threshold`` (each plane-z object given at most once, to the
    object of z+1 that overlaps it best). Returns (Z, Y, X) uint32 numbered 1..N."""
    from .metrics import iou_matrix

    out = np.asarray(labels, np.uint32).copy()
    for z in range(1, out.shape[0]):
        prev, cur = out[z - 1], out[z]
        ids_p, ids_c = np.unique(prev[prev > 0]), np.unique(cur[cur > 0])
        if not ids_p.size or not ids_c.size:
            continue
        iou = iou_matrix(prev, cur)  # (n_prev, n_cur), ids in increasing order
        best = iou.argmax(axis=0)
        ok = iou[best, np.arange(ids_c.size)] >= threshold
        lut = np.arange(int(cur.max()) + 1, dtype=np.uint32)
        taken: set[int] = set()
        for j in np.argsort(-iou.max(axis=0)):
            if ok[j] and best[j] not in taken:
                taken.add(int(best[j]))
                lut[ids_c[j]] = ids_p[best[j]]
        out[z] = lut[cur]
    _, inv = np.unique(out, return_inverse=True)
    return inv.reshape(out.shape).astype(np.uint32)


def segment_stack(segmenter: Any, stack: np.ndarray, lead: str, opts: Any,
                  stitch_threshold: float = 0.0) -> tuple[np.ndarray, float]:
    """Labels (lead..., Y, X) uint32 of ``stack`` (lead..., Y, X[, C]) from
    :func:`read_stack`, plane by plane as the module describes; returns (labels, diameter).
    ``segmenter``: a :class:`~cellplug.segmenter.Segmenter`."""
    from dataclasses import replace

    if not lead:
        res = segmenter.segment(stack, opts)
        return res.labels, res.diameter
    if "T" in lead:  # each time point on its own
        parts = [segment_stack(segmenter, stack[t], lead[1:], opts, stitch_threshold)
                 for t in range(stack.shape[0])]
        return np.stack([p[0] for p in parts]), float(np.median([p[1] for p in parts]))
    diameter = opts.diameter or 0
    if diameter <= 0:  # once for the stack, on the middle plane
        diameter = segmenter.estimate_diameter(stack[stack.shape[0] // 2], opts)
    opts = replace(opts, diameter=float(diameter))
    planes = [segmenter.segment(plane, opts).labels for plane in stack]
    if lead == "Z":
        offset = 0
        for k, lab in enumerate(planes):  # ids through the stack
            n = int(lab.max())
            planes[k] = np.where(lab > 0, lab + offset, 0).astype(np.uint32)
            offset += n
        out = np.stack(planes)
        if stitch_threshold > 0:
            out = stitch_planes(out, stitch_threshold)
        return out, float(diameter)
    return np.stack(planes), float(diameter)
