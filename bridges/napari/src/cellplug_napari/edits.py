"""The two corrections napari's label tools lack: delete an object, merge two objects.

Both go through :meth:`napari.layers.Labels.data_setitem`, so they are undoable with napari's
own undo (Ctrl-Z) and emit the layer's ``paint`` event like any brush stroke, which is how the
widget learns that an image was corrected.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def object_at(layer: Any, position: Sequence[float], world: bool = True) -> int:
    """The label of ``layer`` (a napari Labels layer) at ``position`` (0: background or
    outside the image)."""
    value = layer.get_value(position, world=world)
    if value is None:
        return 0
    return int(np.asarray(value).ravel()[-1] if np.ndim(value) else value)


def delete_object(layer: Any, label: int) -> int:
    """Erase object ``label`` from ``layer``; returns the number of pixels erased."""
    if label <= 0:
        return 0
    where = np.nonzero(np.asarray(layer.data) == label)
    layer.data_setitem(where, 0)
    return int(where[0].size)


def merge_objects(layer: Any, keep: int, other: int) -> int:
    """Give object ``other`` the label ``keep`` (one object from two); returns the number of
    pixels relabelled (0 when either is background or they are the same object)."""
    if keep <= 0 or other <= 0 or keep == other:
        return 0
    where = np.nonzero(np.asarray(layer.data) == other)
    layer.data_setitem(where, keep)
    return int(where[0].size)


def next_free_label(labels: np.ndarray) -> int:
    """A label not used in ``labels`` (one above the largest)."""
    return int(np.max(labels, initial=0)) + 1
