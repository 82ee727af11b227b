"""Default flow decoder and mask reconstructor (numpy + numba, no torch needed).

Names are imported on first use: registering the plugin (``cellplug_flows.plugin``) does not
import numba, whose import and first load take about half a second; the segmenter loads it
in the background while the network runs (the registered reconstructor's ``warm_up``,
:func:`cellplug_flows.reconstruct.warm_up`).
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "CellposeFlows": "decoder",
    "fill_holes_and_remove_small": "reconstruct",
    "flow_errors": "reconstruct",
    "flows_to_masks": "reconstruct",
    "masks_to_flows": "heat",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
