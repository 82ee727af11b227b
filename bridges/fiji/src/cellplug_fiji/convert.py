"""Conversion shared by both ways into ImageJ: numpy images, label images, LUT and ROIs.

Nothing here imports Java. An ImageJ image is held as a numpy array in one canonical order,
``(T, Z, Y, X, C)`` (time, slice, rows, columns, channels or RGB samples), in the pixel type
ImageJ had: 8-bit -> uint8, 16-bit -> uint16, 32-bit -> float32, RGB -> uint8 with C = 3.
The in-process way fills it from an ``ImagePlus`` (:mod:`cellplug_fiji.imagej1`), the
standalone way from the TIFF that ImageJ saved (:func:`read_imagej_tiff`); from there on
both run the same code: each (t, z) plane is segmented on its own, the labels go back as a
``(T, Z, Y, X)`` image with one channel, and the objects as ROIs with their plane's position.

Label values: ImageJ's integer types stop at 16 bits, so labels up to 65,535 (per plane) come
back as a 16-bit image, exactly. Above that, up to 16,777,216 (2**24, the largest run of
integers a 32-bit float holds exactly), they come back as a 32-bit float image, still exact;
more objects than that in one plane is an error.
"""

from __future__ import annotations

import colorsys
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellplug.annotations import Annotation
from cellplug.errors import CellplugError, InputError

MAX_UINT16_LABEL = 65535
MAX_FLOAT_LABEL = 2**24  # float32 holds every integer up to here exactly


def label_dtype(max_label: int) -> np.dtype:
    """The pixel type ImageJ gets for labels up to ``max_label`` (see the module doc)."""
    if max_label <= MAX_UINT16_LABEL:
        return np.dtype(np.uint16)
    if max_label <= MAX_FLOAT_LABEL:
        return np.dtype(np.float32)
    raise CellplugError(f"{max_label} objects in one plane: more than {MAX_FLOAT_LABEL} "
                        f"(2**24) cannot be stored exactly in any ImageJ image type")


def to_label_image(labels: np.ndarray) -> np.ndarray:
    """``(T, Z, Y, X)`` integer labels in the type :func:`label_dtype` picks."""
    labels = np.asarray(labels)
    top = int(labels.max()) if labels.size else 0
    return labels.astype(label_dtype(top), copy=False)


def glasbey_lut(n: int = 256) -> np.ndarray:
    """A glasbey-like lookup table, (3, n) uint8: black background, then colours that
    neighbours can tell apart (hues stepped by the golden ratio, three brightness levels)."""
    lut = np.zeros((3, n), np.uint8)
    golden = 0.618033988749895
    for i in range(1, n):
        h = (i * golden) % 1.0
        s = (1.0, 0.75, 0.55)[i % 3]
        v = (1.0, 0.85, 0.7)[(i // 3) % 3]
        lut[:, i] = np.round(np.array(colorsys.hsv_to_rgb(h, s, v)) * 255)
    return lut


def display_range(labels: np.ndarray) -> tuple[float, float]:
    """Display range for a label image: 0-255 maps label i to LUT entry i (up to 255
    objects every one has its own colour); above that the range is stretched to the maximum."""
    top = float(labels.max()) if labels.size else 0.0
    return 0.0, max(255.0, top)


# -- planes ------------------------------------------------------------------------------
def planes(data: np.ndarray) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
    """((t, z), plane) for each plane of a ``(T, Z, Y, X, C)`` image; a plane is (Y, X) for
    one channel (as ``cellplug.io.read_image`` gives a grey image) else (Y, X, C)."""
    if data.ndim != 5:
        raise ValueError(f"expected (T, Z, Y, X, C), got shape {data.shape}")
    for t in range(data.shape[0]):
        for z in range(data.shape[1]):
            plane = data[t, z]
            yield (t, z), plane[..., 0] if plane.shape[-1] == 1 else plane


def plane_positions(shape_tz: tuple[int, int], n_channels: int) -> dict[tuple[int, int], dict]:
    """How ImageJ addresses each (t, z) plane in a ROI: nothing for a single plane, the
    stack index (``position``) in a plain stack, (c=0: all channels, z, t) in a hyperstack."""
    n_t, n_z = shape_tz
    hyper = sum(n > 1 for n in (n_channels, n_z, n_t)) >= 2  # ImageJ: more than 3 dimensions
    out = {}
    for t in range(n_t):
        for z in range(n_z):
            if n_t * n_z == 1:
                out[t, z] = {}
            elif hyper:
                out[t, z] = {"c_position": 0, "z_position": z + 1, "t_position": t + 1}
            else:
                out[t, z] = {"position": t * n_z + z + 1}
    return out


# -- ROIs --------------------------------------------------------------------------------
def _imagej_roi():
    # the imagej-roi annotation source: one rasterisation and outline rule for every way in
    from cellplug_sources import imagej_roi

    return imagej_roi


def labels_to_rois(labels: np.ndarray, n_channels: int = 1) -> list:
    """roifile ROIs of every object of ``(T, Z, Y, X)`` labels, each with its plane's position
    (see :func:`plane_positions`). A single plane's ROIs are named by label, as
    ``cellplug segment --save roi`` names them; a stack's by plane and label (``0003-12``)."""
    labels = np.asarray(labels)
    positions = plane_positions(labels.shape[:2], n_channels)
    many = labels.shape[0] * labels.shape[1] > 1
    out = []
    for (t, z), where in positions.items():
        index = t * labels.shape[1] + z + 1
        for roi in _imagej_roi().labels_to_rois(labels[t, z]):
            if many:
                roi.name = f"{index:04d}-{roi.name}"
            for key, value in where.items():
                setattr(roi, key, value)
            out.append(roi)
    return out


def roi_plane(roi: Any, shape_tz: tuple[int, int], n_channels: int,
              current: tuple[int, int]) -> tuple[int, int] | None:
    """The (t, z) plane a roifile ROI belongs to: its hyperstack position, else its stack
    position, else (no position: drawn for every plane) ``current``. None: outside the stack."""
    n_t, n_z = shape_tz
    z, t = int(roi.z_position or 0), int(roi.t_position or 0)
    if z or t:
        plane = ((t or current[0] + 1) - 1, (z or current[1] + 1) - 1)
    elif roi.position and n_t * n_z > 1:
        index = int(roi.position) - 1
        if n_channels > 1 and sum(n > 1 for n in (n_channels, n_z, n_t)) < 2:
            index //= n_channels  # a plain channel stack: the position counts channels too
        plane = divmod(index, n_z)
    else:
        plane = current
    return plane if 0 <= plane[0] < n_t and 0 <= plane[1] < n_z else None


def rois_to_annotations(data: np.ndarray, rois: Sequence[Any], stem: str,
                        current: tuple[int, int] = (0, 0), source: str = "ROI Manager"
                        ) -> list[Annotation]:
    """One :class:`Annotation` per plane of ``data`` (T, Z, Y, X, C) that has ROIs: the plane
    and its ROIs rasterised by the imagej-roi source (ROI Manager order, the last on top)."""
    by_plane: dict[tuple[int, int], list] = {}
    for roi in rois:
        plane = roi_plane(roi, data.shape[:2], data.shape[4], current)
        if plane is not None:
            by_plane.setdefault(plane, []).append(roi)
    if not by_plane:
        raise CellplugError(f"{source}: no ROIs on this image to train on")
    all_planes = dict(planes(data))
    out = []
    for (t, z), group in sorted(by_plane.items()):
        image = all_planes[t, z]
        name = stem if len(all_planes) == 1 else f"{stem}-t{t + 1}-z{z + 1}"
        labels = _imagej_roi().rois_to_labels(group, image.shape[:2], f"{source} ({name})")
        out.append(Annotation(image, labels, name, source))
    return out


def read_roiset(path: Path) -> list:
    """The ROIs of an ImageJ ``.roi`` / ROI set ``.zip`` (the imagej-roi source's reader)."""
    return _imagej_roi().read_rois(Path(path))


def write_roiset(path: Path, rois: Sequence[Any]) -> None:
    """Write roifile ROIs as a ROI set zip the ROI Manager opens (an empty zip: no ROIs)."""
    import zipfile

    import roifile

    path = Path(path)
    path.unlink(missing_ok=True)  # roifile appends to an existing zip
    if rois:
        roifile.roiwrite(path, list(rois), mode="w")
    else:
        with zipfile.ZipFile(path, "w"):
            pass


# -- TIFF files (the standalone way) ------------------------------------------------------
# ImageJ's calibration as its TIFF writer stores it: these description keys pass through
# verbatim, the pixel size through the resolution tags as the same rationals.
CALIBRATION_KEYS = ("unit", "yunit", "zunit", "spacing", "finterval", "tunit", "fps",
                    "xorigin", "yorigin", "zorigin", "vunit", "cf", "c0", "c1")


@dataclass
class TiffMeta:
    """What a label image takes over from the image it was made from."""

    resolution: tuple[Any, Any] | None = None  # X and Y resolution tags (rationals)
    calibration: dict[str, str] = field(default_factory=dict)  # CALIBRATION_KEYS found
    n_channels: int = 1  # ImageJ channels (C), or 1 for RGB


def _description_values(description: str) -> dict[str, str]:
    return dict(re.findall(r"^(\w+)=(.*)$", description, flags=re.MULTILINE))


def read_imagej_tiff(path: Path) -> tuple[np.ndarray, TiffMeta]:
    """An ImageJ-written TIFF (or any TIFF of up to 5 dimensions) as ``(T, Z, Y, X, C)`` in
    its own pixel type, with the calibration to pass on to its labels."""
    import tifffile

    path = Path(path)
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            data = series.asarray()
            axes = series.axes
            page = tif.pages.first
            description = page.description if tif.is_imagej else ""
            xres = page.tags.get("XResolution")
            yres = page.tags.get("YResolution")
            resolution = (xres.value, yres.value) if xres and yres else None
    # a damaged file can fail anywhere in tifffile's parsing (IndexError for a corrupt IFD)
    except (OSError, ValueError, IndexError, KeyError, tifffile.TiffFileError) as exc:
        raise InputError(path, f"not a readable TIFF ({type(exc).__name__}: {exc})") from None
    axes = axes.replace("I", "Z").replace("Q", "Z")  # unnamed pages: a stack of slices
    unknown = set(axes) - set("TZCYXS")
    if unknown or len(set(axes)) != len(axes) or ("C" in axes and "S" in axes):
        raise InputError(path, f"cannot map axes {axes} (shape {data.shape}) to an ImageJ image")
    for missing in "TZCYX":
        if missing not in axes and not (missing == "C" and "S" in axes):
            data = data[np.newaxis]
            axes = missing + axes
    data = np.transpose(data, [axes.index(a) for a in ("T", "Z", "Y", "X",
                                                        "S" if "S" in axes else "C")])
    values = _description_values(description)
    meta = TiffMeta(resolution, {k: values[k] for k in CALIBRATION_KEYS if k in values},
                    1 if "S" in axes else data.shape[4])
    return np.ascontiguousarray(data), meta


def write_label_tiff(path: Path, labels: np.ndarray, meta: TiffMeta | None = None) -> None:
    """Write ``(T, Z, Y, X)`` labels as an ImageJ hyperstack TIFF: 16-bit (or 32-bit float,
    see :func:`label_dtype`), the glasbey-like LUT, and the source image's calibration."""
    import tifffile

    meta = meta or TiffMeta()
    labels = to_label_image(labels)
    low, high = display_range(labels)
    metadata: dict[str, Any] = {"axes": "TZYX", "LUTs": [glasbey_lut()], "min": low,
                                "max": high, "mode": "color"}
    metadata.update(meta.calibration)  # as ImageJ wrote them: the same text comes back
    kwargs: dict[str, Any] = {}
    if meta.resolution is not None:
        kwargs["resolution"] = meta.resolution
    tifffile.imwrite(path, labels, imagej=True, metadata=metadata, **kwargs)

