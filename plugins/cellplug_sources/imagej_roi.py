"""Annotation source and writer: ImageJ / Fiji ROI sets beside their images.

Reading: each image ``<stem>.<ext>`` of a folder is paired with ``<stem>_RoiSet.zip``,
``<stem>.zip`` or ``<stem>.roi`` (or, in a folder holding one image, ``RoiSet.zip``: what the
ROI Manager saves by default). ROIs are read with ``roifile`` and rasterised to a label image,
one label per ROI in ROI Manager order:

- polygon, freehand, traced, rectangle and oval ROIs (and rotated rectangles and ellipses,
  which ImageJ stores as polygons) cover the pixels whose centres lie inside them, ImageJ's own
  rule (coordinates are pixel corners: pixel (x, y) has its centre at (x + 0.5, y + 0.5));
- composite ROIs cover their sub-paths with the even-odd rule, so an inner path is a hole;
- **overlaps**: a pixel inside several ROIs goes to the one listed last (as the last drawn
  is on top in an overlay); a warning counts such pixels;
- lines, points, angles and text carry no area: skipped with a warning, as is a ROI wholly
  outside the image; a ROI partly outside is clipped;
- a ROI set with more than 65,535 ROIs is refused (ImageJ's 16-bit label images stop there).

Writing: :func:`labels_to_rois` traces each object's outline (the 0.5 iso-line between its
pixel centres and the others, so every pixel centre falls on the right side) as a polygon
ROI named after its label; composite ROIs with holes are written for objects with holes.
Reading that back gives the same labels for objects without holes and with holes alike.
"""

from __future__ import annotations

import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from cellplug.annotations import Annotation, read_each
from cellplug.errors import CellplugError, InputError
from cellplug.io import EXTRA_OUTPUT_SUFFIXES, IMAGE_SUFFIXES, read_image

ROI_SUFFIXES = ("_RoiSet.zip", ".zip", ".roi")
MAX_ROIS = 65535


class RoiWarning(UserWarning):
    """A ROI was skipped or clipped, or ROIs overlap."""


def read_rois(path: Path) -> list:
    """The ROIs of a ``.roi`` or ROI-set ``.zip`` file (an error naming it if unreadable)."""
    import roifile

    try:
        rois = roifile.roiread(path)
    except (OSError, ValueError, zipfile.BadZipFile, KeyError, IndexError) as exc:
        raise InputError(path, f"not a readable ImageJ ROI file ({type(exc).__name__}: "
                               f"{' '.join(str(exc).split())[:120]})") from None
    return rois if isinstance(rois, list) else [rois]


def _fill_polygon(xy: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centres lie inside the polygon ``xy`` (x, y in pixel-corner units)."""
    from skimage.draw import polygon

    mask = np.zeros(shape, bool)
    if len(xy) >= 3:
        rr, cc = polygon(xy[:, 1] - 0.5, xy[:, 0] - 0.5, shape)
        mask[rr, cc] = True
    return mask


def roi_mask(roi, shape: tuple[int, int]) -> np.ndarray | None:
    """bool (Y, X) mask of one ROI, or None for a ROI without area (line, point, text...)."""
    import roifile

    kind = roifile.ROI_TYPE
    sub = roifile.ROI_SUBTYPE
    if roi.subtype == sub.TEXT or roi.roitype in (kind.LINE, kind.FREELINE, kind.POLYLINE,
                                                  kind.ANGLE, kind.POINT, kind.NOROI):
        return None
    if roi.composite:
        mask = np.zeros(shape, bool)
        for path in roi.coordinates(multi=True):
            mask ^= _fill_polygon(np.asarray(path, np.float64), shape)  # even-odd: holes
        return mask
    if roi.roitype == kind.RECT and roi.subtype != sub.ROTATED_RECT:
        mask = np.zeros(shape, bool)
        mask[max(roi.top, 0):max(roi.bottom, 0), max(roi.left, 0):max(roi.right, 0)] = True
        return mask
    if roi.roitype == kind.OVAL and roi.subtype != sub.ELLIPSE:
        ys, xs = np.mgrid[: shape[0], : shape[1]] + 0.5
        cx, cy = (roi.left + roi.right) / 2, (roi.top + roi.bottom) / 2
        rx, ry = (roi.right - roi.left) / 2, (roi.bottom - roi.top) / 2
        if rx <= 0 or ry <= 0:
            return np.zeros(shape, bool)
        return ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
    return _fill_polygon(np.asarray(roi.coordinates(), np.float64), shape)


def rois_to_labels(rois: list, shape: tuple[int, int], source: object = "ROI set") -> np.ndarray:
    """Rasterise ROIs to uint16 (or uint32) labels 1..N in list order (see the module doc)."""
    if len(rois) > MAX_ROIS:
        raise CellplugError(f"{source}: {len(rois)} ROIs; at most {MAX_ROIS} fit a 16-bit label "
                            f"image as ImageJ reads it")
    labels = np.zeros(shape, np.uint16)
    claimed = np.zeros(shape, np.uint16)  # how many ROIs cover a pixel
    skipped, outside, n = [], [], 0
    for i, roi in enumerate(rois):
        mask = roi_mask(roi, shape)
        name = roi.name or f"#{i + 1}"
        if mask is None:
            skipped.append(f"{name} ({roi.roitype.name.lower()})")
            continue
        if not mask.any():
            outside.append(name)
            continue
        n += 1
        claimed += mask
        labels[mask] = n
    if skipped:
        warnings.warn(f"{source}: skipped {len(skipped)} ROI(s) without area: "
                      f"{', '.join(skipped[:5])}", RoiWarning, stacklevel=2)
    if outside:
        warnings.warn(f"{source}: skipped {len(outside)} ROI(s) outside the {shape[1]} x "
                      f"{shape[0]} image: {', '.join(outside[:5])}", RoiWarning, stacklevel=2)
    overlap = int((claimed > 1).sum())
    if overlap:
        warnings.warn(f"{source}: {overlap} pixel(s) lie in more than one ROI; each went to the "
                      f"ROI listed last", RoiWarning, stacklevel=2)
    # an overlapped ROI can vanish entirely: renumber so labels stay 1..N
    present = np.unique(labels[labels > 0])
    if present.size != n:
        lut = np.zeros(n + 1, labels.dtype)
        lut[present] = np.arange(1, present.size + 1)
        labels = lut[labels]
    return labels


def labels_to_rois(labels: np.ndarray) -> list:
    """One polygon ROI per object of ``labels`` (Y, X) int, named by its label.

    Outlines are the 0.5 iso-lines of each object's mask (skimage's marching squares), in
    ImageJ's pixel-corner coordinates; an object with holes becomes a composite ROI.
    """
    import roifile
    from scipy import ndimage
    from skimage.measure import find_contours

    rois = []
    for label, sl in enumerate(ndimage.find_objects(np.asarray(labels)), start=1):
        if sl is None:
            continue
        y0, x0 = sl[0].start, sl[1].start
        mask = np.pad(labels[sl] == label, 1)
        paths = [c[:, ::-1] + (x0 - 1 + 0.5, y0 - 1 + 0.5) for c in find_contours(mask, 0.5)
                 if len(c) >= 3]
        if not paths:
            continue
        roi = roifile.ImagejRoi.frompoints(max(paths, key=len), name=str(label))
        roi.roitype = roifile.ROI_TYPE.POLYGON
        if len(paths) > 1:  # holes, or parts joined only at a corner
            roi = _composite(paths, str(label))
        rois.append(roi)
    return rois


def _composite(paths: list[np.ndarray], name: str):
    """A composite (shape) ROI of closed sub-paths, filled with the even-odd rule."""
    import roifile

    ops = []
    for p in paths:
        ops.append(np.array([[0, *p[0]]], np.float32))  # MOVETO
        ops += [np.array([[1, *q]], np.float32) for q in p[1:]]  # LINETO
        ops.append(np.array([[4]], np.float32))  # CLOSE
    flat = np.concatenate([o.ravel() for o in ops]).astype(np.float32)
    roi = roifile.ImagejRoi.frompoints(np.concatenate(paths), name=name)
    roi.roitype = roifile.ROI_TYPE.RECT  # ImageJ stores shape ROIs as RECT + a path
    roi.multi_coordinates = flat  # absolute coordinates, as ImageJ's ShapeRoi saves them
    roi.shape_roi_size = flat.size  # > 0 makes it composite
    roi.integer_coordinates = None
    roi.subpixel_coordinates = None
    roi.n_coordinates = 0
    return roi


def write_roi_zip(path: Path, labels: np.ndarray) -> None:
    """Write the objects of ``labels`` as an ImageJ ROI set (a ``.zip`` the ROI Manager opens)."""
    import roifile

    rois = labels_to_rois(labels)
    path.unlink(missing_ok=True)  # roifile appends to an existing zip
    if rois:
        roifile.roiwrite(path, rois, mode="w")
    else:  # an empty ROI set is an empty zip, which ImageJ opens as "no ROIs"
        with zipfile.ZipFile(path, "w"):
            pass


class ImagejRois:
    """Folder source: images with ImageJ ROI sets beside them (see the module doc)."""

    name = "imagej-roi"
    output_suffix = "_RoiSet.zip"

    def _scan(self, folder: Path) -> tuple[list[tuple[Path, Path]], list[Path]]:
        images = sorted(
            f for f in folder.iterdir()
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")
            and not f.stem.endswith(("_masks", *EXTRA_OUTPUT_SUFFIXES))
        )
        pairs, unpaired = [], []
        for img in images:
            for suffix in ROI_SUFFIXES:
                candidate = img.with_name(img.stem + suffix)
                if candidate.is_file():
                    pairs.append((img, candidate))
                    break
            else:
                unpaired.append(img)
        if not pairs and len(images) == 1 and (folder / "RoiSet.zip").is_file():
            return [(images[0], folder / "RoiSet.zip")], []
        return pairs, unpaired

    def detect(self, location: Path) -> bool:
        return location.is_dir() and bool(self._scan(location)[0])

    def why_not(self, location: Path) -> str | None:
        if not location.is_dir() or not any(location.glob("*.zip")) and not any(
            location.glob("*.roi")
        ):
            return None
        return ("ROI files need an image of the same stem (<stem>.tif + <stem>_RoiSet.zip, "
                "<stem>.zip or <stem>.roi)")

    def read(self, location: Path,
             on_error: Callable[[CellplugError], None] | None = None) -> Iterator[Annotation]:
        pairs, _ = self._scan(location)
        if not pairs:
            raise InputError(location, "no image with a ROI set beside it (<stem>_RoiSet.zip, "
                                       "<stem>.zip or <stem>.roi)")
        def load(pair: tuple[Path, Path]) -> Annotation:
            img_path, roi_path = pair
            image = read_image(img_path)
            labels = rois_to_labels(read_rois(roi_path), image.shape[:2], roi_path)
            return Annotation(image, labels, img_path.stem, str(roi_path))

        yield from read_each(pairs, load, on_error)

    def write(self, path: Path, image: np.ndarray, labels: np.ndarray) -> None:
        """Write ``labels`` as the ROI set of ``image`` to ``path`` (``<stem>_RoiSet.zip``)."""
        write_roi_zip(path, labels)
