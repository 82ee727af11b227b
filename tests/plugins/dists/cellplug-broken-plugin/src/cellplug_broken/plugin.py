"""Raises ModuleNotFoundError at import: its dependency is not installed."""

import cellplug_missing_dependency  # noqa: F401 - this import is the point

from cellplug import hookimpl


@hookimpl
def register_backbones(register):  # never reached
    register("broken-net", object)
