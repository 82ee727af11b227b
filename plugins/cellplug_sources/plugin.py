"""Registers the default annotation sources (and writers: ``write`` + ``output_suffix``)."""

from cellplug import hookimpl

from .imagej_roi import ImagejRois
from .mask_folder import MaskFolder
from .seg_npy import CellposeSegNpy


@hookimpl
def register_annotation_sources(register):
    register("mask-folder", MaskFolder())
    register("cellpose-seg-npy", CellposeSegNpy())
    register("imagej-roi", ImagejRois())
