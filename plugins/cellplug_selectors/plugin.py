"""Registers the default style selector."""

from cellplug import hookimpl

from .nearest import nearest_centroid


@hookimpl
def register_style_selectors(register):
    register("nearest-centroid", nearest_centroid)
