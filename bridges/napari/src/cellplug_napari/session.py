"""What the dock widget works on, without Qt: the images, their segmentations and corrections,
the models to pick from, saving, and the training data. Everything here calls cellplug's
Python API; nothing segments or trains by itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellplug import io
from cellplug.annotations import Annotation
from cellplug.errors import CellplugError
from cellplug.models import DEFAULT_MODEL, available_models, resolve_model
from cellplug.plugins import PluginRegistry, get_registry
from cellplug.segmenter import Segmentation, Segmenter, SegmentOptions

AUTO = "auto"
"""The model picker's entry for ``--model auto`` (offered when the core has it and a zoo
exists for the default model)."""

# how corrections are saved: the label TIFF that the mask-folder source reads, and the kinds
# that `cellplug segment --save` writes through the annotation sources' writers
LABELS = "labels"
SAVE_KINDS = (LABELS, "roi", "seg-npy")


@dataclass
class Item:
    """One image of the session, its segmentation and its (corrected) labels.

    ``labels`` is what the Labels layer shows, edits included; ``segmentation`` keeps the
    network output (flows, cell probability) for re-running thresholds; ``model`` is the model
    that segmented it and ``reason`` why that model (the picker, or ``auto``'s choice).
    """

    name: str
    path: Path | None = None
    image: np.ndarray | None = None
    segmentation: Segmentation | None = None
    labels: np.ndarray | None = None
    model: str | None = None
    reason: str = ""
    corrected: bool = False

    @property
    def stem(self) -> str:
        return self.path.stem if self.path is not None else self.name

    def load(self) -> np.ndarray:
        """The image, read with :func:`cellplug.io.read_image` the first time."""
        if self.image is None:
            if self.path is None:
                raise CellplugError(f"{self.name}: no image data and no file")
            self.image = io.read_image(self.path)
        return self.image

    def set_segmentation(self, seg: Segmentation, model: str, reason: str) -> None:
        """A new segmentation replaces the labels (and the corrections)."""
        self.segmentation, self.model, self.reason = seg, model, reason
        self.labels = np.asarray(seg.labels).copy()
        self.corrected = False


def folder_items(folder: str | os.PathLike[str]) -> list[Item]:
    """The images of ``folder`` as :func:`cellplug.io.list_images` finds them (without our
    outputs: ``_masks``, ``_flows``...), sorted; none is read yet."""
    return [Item(p.name, p) for p in io.list_images([folder])]


class Models:
    """The model picker: the names to offer and one :class:`Segmenter` per model, built once.

    ``auto`` (:data:`AUTO`) is offered when cellplug has :mod:`cellplug.selection` and the
    default model has a zoo; its choice per image (model and reason) is returned by
    :meth:`segment` like a named model's.
    """

    def __init__(self, registry: PluginRegistry | None = None) -> None:
        self.registry = registry or get_registry()
        self._segmenters: dict[str, Segmenter] = {}
        self._auto = None

    def names(self) -> list[str]:
        """``auto`` (when available), the default model, then the others as listed."""
        found = list(available_models(self.registry))
        if DEFAULT_MODEL in found:
            found.remove(DEFAULT_MODEL)
            found.insert(0, DEFAULT_MODEL)
        return ([AUTO] if self.auto_available() else []) + found

    def auto_available(self) -> bool:
        try:
            from cellplug.selection import zoo_models
        except ImportError:  # a cellplug without --model auto
            return False
        try:
            return bool(zoo_models(resolve_model(DEFAULT_MODEL, self.registry), self.registry))
        except CellplugError:
            return False

    def refresh(self) -> None:
        """Forget ``auto``'s zoo (a new model may have joined it); built segmenters stay."""
        self._auto = None

    def segmenter(self, name: str) -> Segmenter:
        """The :class:`Segmenter` of model ``name`` (``auto``: its reference model)."""
        if name == AUTO:
            return self._auto_segmenter().reference
        if name not in self._segmenters:
            self._segmenters[name] = Segmenter.from_model(name, self.registry)
        return self._segmenters[name]

    def _auto_segmenter(self):  # -> cellplug.selection.AutoSegmenter
        if self._auto is None:
            from cellplug.selection import DEFAULT_SELECTOR, AutoSegmenter, zoo_models

            reference = self.segmenter(DEFAULT_MODEL)
            self._auto = AutoSegmenter(
                reference, zoo_models(reference.model, self.registry),
                self.registry.get("selector", DEFAULT_SELECTOR), DEFAULT_SELECTOR, self.registry)
        return self._auto

    def segment(self, name: str, image: np.ndarray, opts: SegmentOptions
                ) -> tuple[Segmentation, str, str]:
        """Segment ``image`` with model ``name``: (segmentation, model used, why that model)."""
        if name != AUTO:
            return self.segmenter(name).segment(image, opts), name, "picked in the model list"
        auto = self._auto_segmenter()
        seg, choice = auto.segment(image, opts)
        self._segmenters.setdefault(choice.model, auto.segmenter_for(choice.model))
        return seg, choice.model, f"auto: {choice.reason}"

    def estimate_diameter(self, name: str, image: np.ndarray, opts: SegmentOptions) -> float:
        """The size model's estimate (``auto``: the reference model's, as ``auto`` uses)."""
        return self.segmenter(name).estimate_diameter(image, opts)

    def remask(self, item: Item, opts: SegmentOptions) -> Segmentation:
        """``item``'s labels again from its stored network output with ``opts``' thresholds
        (:meth:`cellplug.segmenter.Segmenter.remask`: the network does not run)."""
        if item.segmentation is None or item.model is None:
            raise CellplugError(f"{item.name}: not segmented yet")
        return self.segmenter(item.model).remask(item.segmentation, opts)


def save_targets(item: Item, kinds: Iterable[str], folder: Path | None = None
                 ) -> list[tuple[str, Path]]:
    """(kind, path) of each file :func:`save_item` writes for ``item``: ``<stem>_masks.tif``
    (labels), ``<stem>_RoiSet.zip`` (roi), ``<stem>_seg.npy`` (seg-npy), in ``folder`` or
    beside the image."""
    from cellplug.cli import SUFFIXES

    if folder is None:
        if item.path is None:
            raise CellplugError(f"{item.name}: choose a folder to save into (the image has no "
                                f"file)")
        folder = item.path.parent
    out = []
    for kind in SAVE_KINDS:
        if kind in kinds:
            suffix = SUFFIXES["masks"] if kind == LABELS else _writer(kind).output_suffix
            out.append((kind, Path(folder) / f"{item.stem}{suffix}"))
    return out


def _writer(kind: str):
    from cellplug.cli import SOURCE_WRITERS

    return get_registry().get("source", SOURCE_WRITERS[kind])


def save_item(item: Item, kinds: Sequence[str], folder: Path | None = None,
              channels: Sequence[int] = (0, 0)) -> list[Path]:
    """Write ``item``'s labels as each of ``kinds`` (:data:`SAVE_KINDS`), all or none.

    The label TIFF is what the ``mask-folder`` source reads; ROI sets and ``_seg.npy`` are
    written by the ``imagej-roi`` and ``cellpose-seg-npy`` sources' writers, as ``cellplug
    segment --save roi|seg-npy`` does, so Fiji, the Cellpose GUI, CellProfiler and
    ``cellplug train`` read the same corrections. Labels are renumbered 1..N first.
    """
    from skimage.segmentation import relabel_sequential

    if item.labels is None:
        raise CellplugError(f"{item.name}: nothing to save (not segmented or annotated)")
    unknown = set(kinds) - set(SAVE_KINDS)
    if unknown:
        raise CellplugError(f"unknown save kind(s) {sorted(unknown)}; use {SAVE_KINDS}")
    image = item.load()
    labels = relabel_sequential(np.asarray(item.labels))[0]
    targets = save_targets(item, kinds, folder)
    seg = item.segmentation
    extra = {"diameter": seg.diameter if seg is not None else 0.0,
             "channels": tuple(int(c) for c in channels),
             "filename": str(item.path or item.name)}
    if seg is not None and seg.cellprob.shape == labels.shape:
        extra.update(flows=seg.flows, cellprob=seg.cellprob)
    write = {
        LABELS: lambda p: io.write_labels(p, labels, atomic=False),
        "roi": lambda p: _writer("roi").write(p, image, labels),
        "seg-npy": lambda p: _writer("seg-npy").write(p, image, labels, **extra),
    }
    paths = [p for _, p in targets]
    try:
        with io.atomic_paths(paths) as temps:
            for (kind, _), tmp in zip(targets, temps, strict=True):
                write[kind](tmp)
    except OSError as exc:
        where = exc.filename or paths[0].parent
        raise CellplugError(f"cannot write {where} ({exc.strerror or exc})") from None
    return paths


def training_annotations(items: Iterable[Item]) -> list[Annotation]:
    """The corrected items as :class:`cellplug.annotations.Annotation` (what
    :func:`cellplug.hitl.fine_tune` trains on)."""
    return [Annotation(item.load(), np.asarray(item.labels), item.stem,
                       str(item.path or item.name))
            for item in items if item.corrected and item.labels is not None]


def new_model_name(base: str) -> str:
    """The first free ``<base>-napari-<n>`` in the user's zoo (never an existing model)."""
    from cellplug.zoo import new_model_path

    stem = base if base != AUTO else DEFAULT_MODEL
    for n in range(1, 1000):
        name = f"{stem[:48]}-napari-{n}"
        try:
            new_model_path(name)
        except CellplugError:
            continue
        return name
    raise CellplugError(f"no free model name for {stem}-napari-N")
