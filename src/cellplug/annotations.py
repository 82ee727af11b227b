"""Training and correction data: (image, label image) pairs from annotation sources."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from .errors import CellplugError
from .plugins import PluginRegistry, get_registry

T = TypeVar("T")


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
        where = self.source or self.stem
        labels = np.asarray(self.labels)
        if labels.ndim != 2:
            raise CellplugError(f"{where}: labels must be 2-D (Y, X), got shape {labels.shape}")
        if labels.shape != self.image.shape[:2]:
            raise CellplugError(
                f"{where}: labels {labels.shape} do not match image {self.image.shape[:2]}"
            )
        if labels.dtype == bool:
            labels = labels.astype(np.uint8)
        if np.issubdtype(labels.dtype, np.floating):
            if not np.all(np.isfinite(labels)) or np.any(np.mod(labels, 1)):
                raise CellplugError(f"{where}: labels must be whole numbers")
            if labels.size and labels.max() >= 2**24:  # float32 cannot tell such ids apart
                raise CellplugError(f"{where}: float labels above 2**24 have lost precision")
            labels = labels.astype(np.int64)
        elif not np.issubdtype(labels.dtype, np.integer):
            raise CellplugError(f"{where}: labels must be integers, got {labels.dtype}")
        if labels.size and labels.min() < 0:
            raise CellplugError(f"{where}: labels must be >= 0 (0 = background)")
        self.labels = labels


def read_each(items: Iterable[T], load: Callable[[T], Annotation],
              on_error: Callable[[CellplugError], None] | None = None) -> Iterator[Annotation]:
    """``load(item)`` for each item, for a source's ``read``: with ``on_error``, an item whose
    loading raises :class:`CellplugError` is passed to it and skipped; without, it raises."""
    for item in items:
        try:
            ann = load(item)
        except CellplugError as exc:
            if on_error is None:
                raise
            on_error(exc)
            continue
        yield ann


def find_source(location: str | os.PathLike[str], name: str | None = None,
                registry: PluginRegistry | None = None,
                options: dict[str, str] | None = None):
    """The annotation source called ``name``, or the first one that can read ``location``.

    ``options`` (e.g. ``{"mask_suffix": "_Nuclei"}``) configure the named source through its
    optional ``configured(**options)``; they need an explicit ``name``.
    """
    registry = registry or get_registry()
    if options:
        if name is None:
            raise CellplugError("source options need an explicit source (--source NAME)")
        configure = getattr(registry.get("source", name), "configured", None)
        if configure is None:
            raise CellplugError(f"annotation source {name!r} takes no options")
        try:
            return configure(**options)
        except TypeError as exc:
            raise CellplugError(f"annotation source {name!r}: {exc}") from None
    return registry.get("source", source_name(location, name, registry))


def source_name(location: str | os.PathLike[str], name: str | None = None,
                registry: PluginRegistry | None = None) -> str:
    """The name of the annotation source :func:`find_source` picks for ``location``."""
    registry = registry or get_registry()
    path = Path(location)
    if name is not None:
        registry.get("source", name)  # an unknown name is an error listing the known ones
        return name
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
            return reg_name
    kinds = ", ".join(registry.names("source")) or "none"
    reasons = []
    for reg_name in registry.names("source"):
        why_not = getattr(registry.get("source", reg_name), "why_not", None)
        try:
            reason = why_not(path) if why_not is not None else None
        except Exception:  # noqa: BLE001 - only an explanation; the error below stands
            reason = None
        if reason:
            reasons.append(f"{reg_name}: {reason}")
    detail = f"; {'; '.join(reasons)}" if reasons else ""
    raise CellplugError(
        f"{path}: no annotation source can read this (sources: {kinds}){detail}"
    )


def read_annotations(location: str | os.PathLike[str], source: str | None = None,
                     registry: PluginRegistry | None = None,
                     on_error: Callable[[CellplugError], None] | None = None,
                     options: dict[str, str] | None = None,
                     ) -> Iterator[Annotation]:
    """Yield the annotations at ``location`` using ``source`` (auto-detected if ``None``).

    With ``on_error``, a source that supports it (``read(location, on_error=...)``) passes
    each item it cannot read to ``on_error`` and goes on; other sources raise as usual.
    """
    src = find_source(location, source, registry, options)
    if on_error is not None and "on_error" in inspect.signature(src.read).parameters:
        yield from src.read(Path(location), on_error=on_error)
    else:
        yield from src.read(Path(location))
