"""Annotation source: a folder of ``<stem>.<ext>`` images and ``<stem>_masks.<ext>`` labels.

This is Cellpose's training-folder convention (``--mask_filter _masks``). Another suffix
(``train --source mask-folder --source-option mask_suffix=_Nuclei``) reads CellProfiler's label
images: objects turned into an image by ``ConvertObjectsToImage`` (uint16) and saved by
``SaveImages`` with the input's name plus a suffix.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from cellplug.annotations import Annotation, read_each
from cellplug.errors import CellplugError, InputError
from cellplug.io import EXTRA_OUTPUT_SUFFIXES, IMAGE_SUFFIXES, read_image, read_labels


class MaskFolder:
    """Pairs every image in a folder with the label image of the same stem + ``_masks``."""

    name = "mask-folder"

    def __init__(self, mask_suffix: str = "_masks") -> None:
        self.mask_suffix = mask_suffix

    def configured(self, mask_suffix: str = "_masks") -> MaskFolder:
        """Another suffix, e.g. ``_Nuclei`` for CellProfiler's ``SaveImages`` of objects
        converted with ``ConvertObjectsToImage`` (uint16 labels, ``<stem>_Nuclei.tiff``)."""
        if not mask_suffix or "/" in mask_suffix:
            raise TypeError(f"mask_suffix must be a file-name suffix, got {mask_suffix!r}")
        return MaskFolder(mask_suffix)

    def _scan(self, folder: Path) -> tuple[list[tuple[Path, Path]], list[Path]]:
        """(image, labels) pairs and the images without labels, sorted.

        The mask may have another extension (or case). Hidden files (such as the temporary
        files of an interrupted write) and ``segment``'s extra outputs are ignored.
        """
        files = {
            f.name.lower(): f
            for f in folder.iterdir()
            if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".") and f.is_file()
        }
        out, unpaired = [], []
        for f in sorted(files.values()):
            if f.stem.endswith((self.mask_suffix, *EXTRA_OUTPUT_SUFFIXES)):
                continue
            # the image's own extension first, then the others in IMAGE_SUFFIXES order
            for ext in (f.suffix.lower(), *IMAGE_SUFFIXES):
                m = files.get(f"{f.stem}{self.mask_suffix}{ext}".lower())
                if m is not None:
                    out.append((f, m))
                    break
            else:
                unpaired.append(f)
        return out, unpaired

    def pairs(self, folder: Path) -> list[tuple[Path, Path]]:
        """(image, labels) paths, sorted (see :meth:`_scan`)."""
        return self._scan(folder)[0]

    def detect(self, location: Path) -> bool:
        return location.is_dir() and bool(self.pairs(location))

    def why_not(self, location: Path) -> str | None:
        """Why :meth:`detect` is False for a folder of images: the label files it lacks."""
        if not location.is_dir():
            return None
        _, unpaired = self._scan(location)
        if not unpaired:
            return None
        return f"{len(unpaired)} image(s) without labels, e.g. " + ", ".join(
            f"{f.name} (no {f.stem}{self.mask_suffix}.tif)" for f in unpaired[:3]
        )

    def read(
        self, location: Path, on_error: Callable[[CellplugError], None] | None = None
    ) -> Iterator[Annotation]:
        """Yield the pairs of ``location``; with ``on_error``, a bad pair is passed to it and
        skipped instead of raised. Images without labels are named in a warning."""
        pairs, unpaired = self._scan(location)
        if not pairs:
            reason = self.why_not(location) or "no images"
            raise InputError(
                location, f"no <stem>.tif + <stem>{self.mask_suffix}.tif pairs found ({reason})"
            )
        if unpaired:
            names = ", ".join(f.name for f in unpaired[:3])
            warnings.warn(
                f"{location}: {len(unpaired)} image(s) have no {self.mask_suffix} file and are "
                f"not used: {names}{', ...' if len(unpaired) > 3 else ''}",
                UserWarning,
                stacklevel=2,
            )
        yield from read_each(
            pairs,
            lambda pair: Annotation(read_image(pair[0]), read_labels(pair[1]), pair[0].stem,
                                    str(pair[0])),
            on_error,
        )
