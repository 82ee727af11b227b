"""cellplug: cell segmentation with flow fields, built from plugins."""

from __future__ import annotations

import importlib.metadata
import os

import pluggy

# OpenMP threads that sleep rather than spin while waiting: torch's default spinning halves
# inference speed when other processes share the CPU (see cellplug.inference). Read once
# when torch loads its OpenMP runtime, so it is set here, before any plugin imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .errors import CellplugError, InputError

try:
    __version__ = importlib.metadata.version("cellplug")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"

hookimpl = pluggy.HookimplMarker("cellplug")
"""Marker for plugin hook implementations: ``@cellplug.hookimpl``."""

__all__ = ["CellplugError", "InputError", "__version__", "hookimpl"]
