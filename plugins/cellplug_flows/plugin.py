"""Registers the Cellpose flow decoder and the numba mask reconstructor."""

from cellplug import hookimpl

from .decoder import CellposeFlows
from .reconstruct import flows_to_masks


@hookimpl
def register_flow_decoders(register):
    register("cellpose-flows", CellposeFlows())


@hookimpl
def register_mask_reconstructors(register):
    register("cellpose-dynamics", flows_to_masks)
