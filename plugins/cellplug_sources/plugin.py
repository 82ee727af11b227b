"""Registers the default annotation sources."""

from cellplug import hookimpl

from .mask_folder import MaskFolder


@hookimpl
def register_annotation_sources(register):
    register("mask-folder", MaskFolder())
