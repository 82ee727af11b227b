"""Annotation source: a folder of ``<stem>.<ext>`` images and ``<stem>_masks.<ext>`` labels.

This is Cellpose's training-folder convention (``--mask_filter _masks``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from cellplug.annotations import Annotation
from cellplug.errors import InputError
from cellplug.io import IMAGE_SUFFIXES, read_image, read_labels


class MaskFolder:
    """Pairs every image in a folder with the label image of the same stem + ``_masks``."""

    name = "mask-folder"

    def __init__(self, mask_suffix: str = "_masks") -> None:
        self.mask_suffix = mask_suffix

    def pairs(self, folder: Path) -> list[tuple[Path, Path]]:
        """(image, labels) paths, sorted; the mask may have another extension (or case).

        Hidden files (such as the temporary files of an interrupted write) are ignored.
        """
        files = {
            f.name.lower(): f
            for f in folder.iterdir()
            if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".") and f.is_file()
        }
        out = []
        for f in sorted(files.values()):
            if f.stem.endswith(self.mask_suffix):
                continue
            # the image's own extension first, then the others in IMAGE_SUFFIXES order
            for ext in (f.suffix.lower(), *IMAGE_SUFFIXES):
                m = files.get(f"{f.stem}{self.mask_suffix}{ext}".lower())
                if m is not None:
                    out.append((f, m))
                    break
        return out

    def detect(self, location: Path) -> bool:
        return location.is_dir() and bool(self.pairs(location))

    def read(self, location: Path) -> Iterator[Annotation]:
        pairs = self.pairs(location)
        if not pairs:
            raise InputError(location, f"no <stem>.tif + <stem>{self.mask_suffix}.tif pairs found")
        for img_path, mask_path in pairs:
            yield Annotation(
                read_image(img_path), read_labels(mask_path), img_path.stem, str(img_path)
            )
