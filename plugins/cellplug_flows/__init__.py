"""Default flow decoder and mask reconstructor (numpy + numba, no torch needed)."""

from .decoder import CellposeFlows
from .heat import masks_to_flows
from .reconstruct import fill_holes_and_remove_small, flow_errors, flows_to_masks

__all__ = [
    "CellposeFlows",
    "fill_holes_and_remove_small",
    "flow_errors",
    "flows_to_masks",
    "masks_to_flows",
]
