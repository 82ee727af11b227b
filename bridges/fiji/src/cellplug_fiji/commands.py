"""The two ImageJ commands, Segment and Train from ROI Manager, independent of the host.

Their dialog fields are defined once here: the in-process way builds an ImageJ
``GenericDialog`` from them, ``cellplug fiji install`` writes the same fields into its macros.
So a line the macro recorder wrote, ``run("Segment", "model=generalist diameter=0 ...")``,
runs the same in both ways. The actions only call cellplug's API (the segmenter, the
human-in-the-loop trainer); there is no segmentation logic in the bridge.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellplug.errors import CellplugError
from cellplug.models import DEFAULT_MODEL

from . import convert

SEGMENT = "Segment"
TRAIN = "Train from ROI Manager"


@dataclass(frozen=True)
class Field:
    """One dialog field. ``key`` is what ImageJ makes of ``label`` in macro options (its first
    word, lower case), so recorded macros name it."""

    key: str
    label: str
    kind: str  # "string" or "number"
    default: Any
    digits: int = 0
    units: str = ""

    def __post_init__(self) -> None:
        assert self.label.split()[0].lower() == self.key, (self.key, self.label)


SEGMENT_FIELDS: tuple[Field, ...] = (
    Field("model", "Model", "string", DEFAULT_MODEL, units="name or path"),
    Field("diameter", "Diameter", "number", 0.0, 1, "px (0 = estimate)"),
    Field("cyto", "Cyto channel", "number", 0, 0, "(0 = grey)"),
    Field("nucleus", "Nucleus channel", "number", 0, 0, "(0 = none)"),
    Field("flow", "Flow threshold", "number", 0.4, 2),
    Field("cellprob", "Cellprob threshold", "number", 0.0, 2),
)
TRAIN_FIELDS: tuple[Field, ...] = (
    Field("base", "Base model", "string", DEFAULT_MODEL, units="to fine-tune"),
    Field("name", "Name of new model", "string", "", units="(empty: <base>-fiji-N)"),
    Field("epochs", "Epochs", "number", 100, 0),
    Field("cyto", "Cyto channel", "number", 0, 0, "(0 = grey)"),
    Field("nucleus", "Nucleus channel", "number", 0, 0, "(0 = none)"),
)
COMMANDS: dict[str, tuple[Field, ...]] = {SEGMENT: SEGMENT_FIELDS, TRAIN: TRAIN_FIELDS}

Progress = Callable[[int, int], None]


def defaults(command: str) -> dict[str, Any]:
    return {f.key: f.default for f in COMMANDS[command]}


def _int(values: dict[str, Any], key: str) -> int:
    value = float(values[key])
    if value != int(value) or value < 0:
        raise CellplugError(f"{key}: {values[key]!r} is not a whole number >= 0")
    return int(value)


# -- Segment -----------------------------------------------------------------------------
def segment_options(values: dict[str, Any]) -> Any:
    """cellplug's :class:`~cellplug.segmenter.SegmentOptions` from the dialog's values; what
    the dialog does not set keeps ``cellplug segment``'s defaults."""
    from cellplug.segmenter import SegmentOptions
    from cellplug.transforms import parse_channels

    diameter = float(values["diameter"])
    if not (diameter >= 0 and math.isfinite(diameter)):
        raise CellplugError(f"diameter: {values['diameter']!r} must be a number >= 0")
    return SegmentOptions(diameter=diameter,
                          channels=parse_channels((_int(values, "cyto"),
                                                   _int(values, "nucleus"))),
                          flow_threshold=float(values["flow"]),
                          cellprob_threshold=float(values["cellprob"]))


_segmenter_cache: dict[str, Any] = {}


def segmenter_for(model: str) -> Any:
    """The segmenter of ``model``, kept for the next call (models are never overwritten, so a
    name always means the same weights)."""
    from cellplug.segmenter import Segmenter

    key = model or DEFAULT_MODEL
    if key not in _segmenter_cache:
        _segmenter_cache.clear()  # one model in memory at a time
        _segmenter_cache[key] = Segmenter.from_model(key)
    return _segmenter_cache[key]


def segment_image(data: np.ndarray, values: dict[str, Any],
                  progress: Progress | None = None) -> np.ndarray:
    """Labels (T, Z, Y, X) uint32 of a (T, Z, Y, X, C) image, each plane segmented alone."""
    opts = segment_options(values)
    segmenter = segmenter_for(str(values["model"]))
    labels = np.zeros(data.shape[:4], np.uint32)
    todo = list(convert.planes(data))
    for i, ((t, z), plane) in enumerate(todo):
        if progress is not None:
            progress(i, len(todo))
        labels[t, z] = segmenter.segment(plane, opts).labels
    if progress is not None:
        progress(len(todo), len(todo))
    return labels


# -- Train from ROI Manager ----------------------------------------------------------------
def free_model_name(base: str) -> str:
    """``<base>-fiji-N`` with the first N not taken in the zoo."""
    from cellplug.models import available_models, user_model_dir

    stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(base).stem if base.endswith(".pth") else base)
    stem = stem.lstrip("._-")[:50] or "model"
    taken = set(available_models())
    n = 1
    while f"{stem}-fiji-{n}" in taken or (user_model_dir() / f"{stem}-fiji-{n}.pth").exists():
        n += 1
    return f"{stem}-fiji-{n}"


def train_from_rois(data: np.ndarray, rois: Sequence[Any], stem: str, values: dict[str, Any],
                    current: tuple[int, int] = (0, 0),
                    should_stop: Callable[[], bool] | None = None,
                    progress: Progress | None = None, log: Callable[[str], None] | None = None,
                    source: str = "ROI Manager") -> tuple[str, Any]:
    """Fine-tune ``values["base"]`` on the image ``data`` (T, Z, Y, X, C) annotated by the
    roifile ``rois`` (the ROI Manager's), with cellplug's human-in-the-loop recipe; the new
    model goes into the user's zoo. Returns (its name, the TrainResult).

    ``progress(step, steps)`` is called before every training step; ``should_stop`` cancels
    (:class:`cellplug.train.TrainingCancelled`, nothing saved).
    """
    from cellplug.hitl import fine_tune, recipe_config

    base = str(values["base"]) or DEFAULT_MODEL
    name = str(values.get("name") or "").strip() or free_model_name(base)
    epochs = _int(values, "epochs")
    if epochs < 1:
        raise CellplugError("epochs: train at least 1 epoch")
    config = recipe_config("hitl", epochs=epochs,
                           channels=(_int(values, "cyto"), _int(values, "nucleus")))
    annotations = convert.rois_to_annotations(data, rois, stem, current, source)
    per_epoch = math.ceil((config.images_per_epoch or len(annotations)) / config.batch_size)
    steps = config.epochs * per_epoch
    done = 0

    def stop() -> bool:  # asked before every step: the step counter for the progress bar too
        nonlocal done
        if progress is not None:
            progress(done, steps)
        done += 1
        return bool(should_stop and should_stop())

    result = fine_tune(annotations, base, name=name, config=config,
                       source_format=f"imagej-roi ({source})", progress=False, log_fn=log,
                       should_stop=stop)
    if progress is not None:
        progress(steps, steps)
    return name, result
