"""Registers the Cellpose flow decoder and the numba mask reconstructor (without importing
numba: the reconstructor's module is imported at its first call or warm-up)."""

from __future__ import annotations

from typing import Any

import numpy as np

from cellplug import hookimpl

from .decoder import CellposeFlows


def flows_to_masks(flows: np.ndarray, cellprob: np.ndarray, **options: Any) -> np.ndarray:
    """Labels uint32 (H, W) from flows float32 (2, H, W) and cellprob float32 (H, W): Cellpose's
    dynamics (:func:`cellplug_flows.reconstruct.flows_to_masks`, whose keyword options it
    takes)."""
    from .reconstruct import flows_to_masks as run

    return run(flows, cellprob, **options)


def warm_up() -> None:
    """Import numba and load the reconstructor's compiled code (see
    :func:`cellplug_flows.reconstruct.warm_up`)."""
    from .reconstruct import warm_up as run

    run()


flows_to_masks.warm_up = warm_up  # type: ignore[attr-defined]


@hookimpl
def register_flow_decoders(register):
    register("cellpose-flows", CellposeFlows())


@hookimpl
def register_mask_reconstructors(register):
    register("cellpose-dynamics", flows_to_masks)
