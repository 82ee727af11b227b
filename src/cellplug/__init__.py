"""cellplug: cell segmentation with flow fields, built from plugins."""

from __future__ import annotations

import importlib.metadata

import pluggy

from .errors import CellplugError, InputError

try:
    __version__ = importlib.metadata.version("cellplug")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"

hookimpl = pluggy.HookimplMarker("cellplug")
"""Marker for plugin hook implementations: ``@cellplug.hookimpl``."""

__all__ = ["CellplugError", "InputError", "__version__", "hookimpl"]
