"""Training and correction data: (image, label image) pairs from annotation sources."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CellplugError
from .plugins import PluginRegistry, get_registry


@dataclass
class Annotation:
    """One annotated image.

    image: (Y, X) or (Y, X, C) in its own dtype; labels: (Y, X) integer, 0 = background;
    stem: a name unique within its source; source: where it came from (for reports).
    """

    image: np.ndarray
    labels: np.ndarray
    stem: str
    source: str = ""

    def __post_init__(self) -> None:
        if self.labels.shape != self.image.shape[:2]:
            raise CellplugError(
                f"{self.source or self.stem}: labels {self.labels.shape} do not match "
                f"image {self.image.shape[:2]}"
            )


def find_source(location: str | os.PathLike[str], name: str | None = None,
                registry: PluginRegistry | None = None):
    """The annotation source called ``name``, or the first one that can read ``location``."""
    registry = registry or get_registry()
    path = Path(location)
    if name is not None:
        return registry.get("source", name)
    for reg_name in registry.names("source"):
        source = registry.get("source", reg_name)
        try:
            found = source.detect(path)
        except Exception as exc:  # a plugin's bug: name it rather than crash with a traceback
            plugin = registry.registrations("source")[reg_name].plugin
            raise CellplugError(
                f"{path}: annotation source {reg_name!r} (plugin {plugin!r}) failed to inspect "
                f"it: {type(exc).__name__}: {exc}"
            ) from exc
        if found:
            return source
    kinds = ", ".join(registry.names("source")) or "none"
    raise CellplugError(f"{path}: no annotation source can read this (sources: {kinds})")


def read_annotations(location: str | os.PathLike[str], source: str | None = None,
                     registry: PluginRegistry | None = None) -> Iterator[Annotation]:
    """Yield the annotations at ``location`` using ``source`` (auto-detected if ``None``)."""
    yield from find_source(location, source, registry).read(Path(location))
