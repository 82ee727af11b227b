"""The dock widget: segment -> correct -> train -> save, on one image or a folder of them.

Long work (segmenting, estimating the diameter, re-running thresholds, training) runs in a
``napari.qt.threading`` worker, one at a time, with a progress bar and a Cancel button; the
UI never waits for it. The widget only arranges calls to cellplug's Python API
(:mod:`cellplug_napari.session` holds the state) and napari's layers.
"""

from __future__ import annotations

import json
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QObject, Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from cellplug.errors import CellplugError
from cellplug.segmenter import SegmentOptions

from . import edits
from .session import AUTO, LABELS, SAVE_KINDS, Item, Models, folder_items, new_model_name

if TYPE_CHECKING:
    import napari

DELETE_KEY = "Shift-D"
MERGE_KEY = "Shift-M"
CHANNELS = ["0: gray", "1: red", "2: green", "3: blue"]
NUCLEUS = ["0: none", "1: red", "2: green", "3: blue"]
SAVE_LABELS = {LABELS: "labels TIFF (_masks.tif)", "roi": "ImageJ ROI set (_RoiSet.zip)",
               "seg-npy": "Cellpose GUI (_seg.npy)"}


class _Relay(QObject):
    """Carries the trainer's progress from its thread to the widget (a queued signal)."""

    progress = Signal(int, int, str)


class CellplugWidget(QWidget):
    """cellplug in napari: pick a model, segment, correct, train on the corrections, save."""

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None
                 ) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.models = Models()
        self.items: list[Item] = []
        self.index = -1
        self.worker: Any = None
        self.job: str | None = None
        self._cancel = threading.Event()
        self._then: Callable[[], None] | None = None
        self._updating = False
        self._merge_first: int | None = None
        self._image_from_user = False
        self.trained_model: str | None = None
        self._relay = _Relay()
        self._relay.progress.connect(self._on_train_progress)
        self.image_layer: Any = None
        self.labels_layer: Any = None
        self.flows_layer: Any = None
        self.prob_layer: Any = None
        self.diameter_layer: Any = None
        self._remask_timer = QTimer(self)
        self._remask_timer.setSingleShot(True)
        self._remask_timer.setInterval(300)
        self._remask_timer.timeout.connect(self.rerun_thresholds)
        self._build()
        self.refresh_models()
        self.viewer.bind_key(DELETE_KEY, self._delete_key, overwrite=True)
        self.viewer.bind_key(MERGE_KEY, self._merge_key, overwrite=True)

    # -- layout --------------------------------------------------------------------------
    def _build(self) -> None:
        root = QVBoxLayout(self)
        root.setContentsMargins(4, 4, 4, 4)

        box = QGroupBox("Images")
        row = QHBoxLayout(box)
        self.open_button = QPushButton("Open folder…")
        self.open_button.clicked.connect(self._choose_folder)
        self.prev_button = QPushButton("◀")
        self.next_button = QPushButton("▶")
        self.prev_button.clicked.connect(lambda: self.go(-1))
        self.next_button.clicked.connect(lambda: self.go(+1))
        for b in (self.prev_button, self.next_button):
            b.setFixedWidth(32)
        self.image_label = QLabel("no folder: the selected image layer")
        self.image_label.setWordWrap(True)
        row.addWidget(self.open_button)
        row.addWidget(self.prev_button)
        row.addWidget(self.next_button)
        row.addWidget(self.image_label, 1)
        root.addWidget(box)

        box = QGroupBox("Segmentation")
        form = QFormLayout(box)
        self.model_combo = QComboBox()
        refresh = QPushButton("↻")
        refresh.setFixedWidth(32)
        refresh.setToolTip("List the models again (e.g. after `cellplug models add`)")
        refresh.clicked.connect(self.refresh_models)
        row = QHBoxLayout()
        row.addWidget(self.model_combo, 1)
        row.addWidget(refresh)
        form.addRow("model", row)
        self.model_label = QLabel("")
        self.model_label.setWordWrap(True)
        form.addRow("", self.model_label)
        self.diameter = QDoubleSpinBox()
        self.diameter.setRange(0.0, 1000.0)
        self.diameter.setDecimals(1)
        self.diameter.setSpecialValueText("estimate")
        self.diameter.setToolTip("Object diameter in pixels; 0 = estimated by the model's size "
                                 "model when segmenting. Drawn as a circle on the image.")
        self.diameter.valueChanged.connect(lambda _: self._draw_diameter())
        self.estimate_button = QPushButton("Estimate")
        self.estimate_button.clicked.connect(self.estimate_diameter)
        row = QHBoxLayout()
        row.addWidget(self.diameter, 1)
        row.addWidget(self.estimate_button)
        form.addRow("diameter (px)", row)
        self.cyto = QComboBox()
        self.cyto.addItems(CHANNELS)
        self.nucleus = QComboBox()
        self.nucleus.addItems(NUCLEUS)
        row = QHBoxLayout()
        row.addWidget(self.cyto)
        row.addWidget(self.nucleus)
        form.addRow("channels", row)
        self.flow_threshold = _spin(0.0, 10.0, 0.4, 0.05, "Flow error threshold (higher: more "
                                    "masks kept)")
        self.cellprob_threshold = _spin(-8.0, 8.0, 0.0, 0.5, "Cell probability threshold "
                                        "(lower: larger and more masks)")
        self.min_size = QSpinBox()
        self.min_size.setRange(0, 100000)
        self.min_size.setValue(15)
        for w in (self.flow_threshold, self.cellprob_threshold, self.min_size):
            w.valueChanged.connect(lambda _: self._remask_timer.start())
        form.addRow("flow threshold", self.flow_threshold)
        form.addRow("cellprob threshold", self.cellprob_threshold)
        form.addRow("min size (px)", self.min_size)
        self.show_maps = QCheckBox("flows and cell probability layers")
        self.show_maps.toggled.connect(lambda _: self._show_maps())
        form.addRow("", self.show_maps)
        row = QHBoxLayout()
        self.segment_button = QPushButton("Segment")
        self.segment_button.clicked.connect(self.segment)
        self.segment_all_button = QPushButton("Segment all")
        self.segment_all_button.setToolTip("Every image of the folder not corrected yet")
        self.segment_all_button.clicked.connect(self.segment_all)
        row.addWidget(self.segment_button)
        row.addWidget(self.segment_all_button)
        form.addRow(row)
        root.addWidget(box)

        box = QGroupBox("Correct")
        col = QVBoxLayout(box)
        help_text = QLabel(f"Paint, erase, fill and new label (M) with napari's label tools. "
                           f"{DELETE_KEY}: delete the object under the cursor. {MERGE_KEY} over "
                           f"one object, then over another: merge them.")
        help_text.setWordWrap(True)
        self.corrected_label = QLabel("corrected: 0")
        col.addWidget(help_text)
        col.addWidget(self.corrected_label)
        root.addWidget(box)

        box = QGroupBox("Train on corrections")
        form = QFormLayout(box)
        self.model_name = QLineEdit()
        self.model_name.setPlaceholderText("new model name (default: <model>-napari-N)")
        self.epochs = QSpinBox()
        self.epochs.setRange(1, 10000)
        self.epochs.setValue(100)  # the hitl recipe's
        self.train_button = QPushButton("Train on corrections")
        self.train_button.clicked.connect(self.train)
        form.addRow("name", self.model_name)
        form.addRow("epochs", self.epochs)
        form.addRow(self.train_button)
        root.addWidget(box)

        box = QGroupBox("Save corrections")
        col = QVBoxLayout(box)
        self.save_kinds: dict[str, QCheckBox] = {}
        for kind in SAVE_KINDS:
            check = QCheckBox(SAVE_LABELS[kind])
            check.setChecked(kind == LABELS)
            self.save_kinds[kind] = check
            col.addWidget(check)
        self.save_button = QPushButton("Save corrected images")
        self.save_button.clicked.connect(lambda: self.save())
        col.addWidget(self.save_button)
        root.addWidget(box)

        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        row = QHBoxLayout()
        row.addWidget(self.progress, 1)
        row.addWidget(self.cancel_button)
        root.addLayout(row)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        root.addWidget(self.status)
        root.addStretch(1)
        self._busy_widgets = [self.open_button, self.prev_button, self.next_button,
                              self.segment_button, self.segment_all_button,
                              self.estimate_button, self.train_button, self.save_button,
                              self.model_combo]
        self._update_labels()

    # -- state shown ---------------------------------------------------------------------
    def say(self, text: str) -> None:
        self.status.setText(text)

    @property
    def item(self) -> Item | None:
        return self.items[self.index] if 0 <= self.index < len(self.items) else None

    def options(self) -> SegmentOptions:
        """The segmentation options set in the widget (the rest are cellplug's defaults, as
        in ``cellplug segment``)."""
        return SegmentOptions(
            diameter=self.diameter.value(),
            channels=(self.cyto.currentIndex(), self.nucleus.currentIndex()),
            flow_threshold=self.flow_threshold.value(),
            cellprob_threshold=self.cellprob_threshold.value(),
            min_size=self.min_size.value(),
        )

    def refresh_models(self, select: str | None = None) -> None:
        """List the models again (``auto`` first when the core offers it and a zoo exists)."""
        current = select or self.model_combo.currentText()
        self.models.refresh()
        try:
            names = self.models.names()
        except CellplugError as exc:
            names = []
            self.say(f"error: {exc}")
        self.model_combo.clear()
        self.model_combo.addItems(names)
        if current in names:
            self.model_combo.setCurrentText(current)

    def _update_labels(self) -> None:
        item = self.item
        n = len(self.items)
        if item is None:
            self.image_label.setText("no folder: the selected image layer")
        else:
            mark = " ✎ corrected" if item.corrected else ""
            self.image_label.setText(f"{self.index + 1} / {n}: {item.name}{mark}")
        if item is not None and item.model:
            seg = item.segmentation
            objects = int(np.unique(item.labels[item.labels > 0]).size) \
                if item.labels is not None else 0
            diameter = f", diameter {seg.diameter:.1f} px" if seg is not None else ""
            self.model_label.setText(f"segmented by {item.model} ({item.reason}){diameter}, "
                                     f"{objects} objects")
        else:
            self.model_label.setText("")
        done = sum(i.corrected for i in self.items)
        self.corrected_label.setText(f"corrected: {done} of {n} image(s)")
        idle = self.worker is None
        self.prev_button.setEnabled(idle and self.index > 0)
        self.next_button.setEnabled(idle and 0 <= self.index < n - 1)

    # -- images --------------------------------------------------------------------------
    def _choose_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Folder of images")
        if folder:
            self.open_folder(folder)

    def open_folder(self, folder: str | Path) -> None:
        """Work on the images of ``folder`` (next / previous), starting with the first."""
        try:
            items = folder_items(folder)
        except CellplugError as exc:
            self.say(f"error: {exc}")
            return
        self.items = items
        self.index = -1
        self.show(0)
        self.say(f"{len(items)} image(s) in {folder}")

    def go(self, step: int) -> None:
        """The next (+1) or previous (-1) image of the folder."""
        if self.items and self.worker is None:
            self.show(min(max(self.index + step, 0), len(self.items) - 1))

    def show(self, index: int) -> None:
        """Display image ``index`` with its labels (if segmented or annotated)."""
        item = self.items[index]
        try:
            image = item.load()
        except CellplugError as exc:
            self.say(f"error: {exc}")
            return
        self.index = index
        self._merge_first = None
        if self.image_layer is None or self.image_layer not in self.viewer.layers or \
                self._image_from_user:
            self.image_layer = self.viewer.add_image(image, name=item.name,
                                                     rgb=_is_rgb(image))
            self._image_from_user = False
        else:
            resized = self.image_layer.data.shape != image.shape
            self.image_layer.data = image
            self.image_layer.name = item.name
            self.image_layer.reset_contrast_limits()
            if resized:
                self.viewer.reset_view()
        self._display(item)

    def _ensure_item(self) -> Item | None:
        """The current item; without a folder, the selected (or the first) image layer."""
        if self.item is not None:
            return self.item
        from napari.layers import Image

        active = self.viewer.layers.selection.active
        layers = [active] if isinstance(active, Image) else \
            [la for la in self.viewer.layers if isinstance(la, Image)]
        if not layers:
            self.say("open a folder or an image first")
            return None
        layer = layers[0]
        image = np.asarray(layer.data)
        if layer.rgb and image.ndim == 3 and image.shape[-1] == 4:
            image = image[..., :3]
        self.items = [Item(layer.name, getattr(layer.source, "path", None) and
                           Path(layer.source.path), image)]
        self.index = 0
        self.image_layer = layer
        self._image_from_user = True
        return self.items[0]

    def _display(self, item: Item) -> None:
        """Show ``item``'s labels, its maps if asked for, and the diameter circle."""
        image = item.load()
        labels = item.labels if item.labels is not None else np.zeros(image.shape[:2],
                                                                       np.uint32)
        item.labels = labels
        self._updating = True
        try:
            if self.labels_layer is None or self.labels_layer not in self.viewer.layers:
                self.labels_layer = self.viewer.add_labels(labels, name="cellplug masks")
                self.labels_layer.events.paint.connect(self._on_paint)
            else:
                self.labels_layer.data = labels
                self.labels_layer.refresh()
            item.labels = self.labels_layer.data
        finally:
            self._updating = False
        self._show_maps()
        self._draw_diameter()
        self._update_labels()

    def _on_paint(self, event: Any = None) -> None:
        """Any edit of the Labels layer (napari's tools, delete, merge) marks a correction."""
        item = self.item
        if self._updating or item is None:
            return
        item.labels = self.labels_layer.data
        item.corrected = True
        # napari's brush emits the event before it writes: count the objects afterwards
        QTimer.singleShot(0, self._update_labels)

    def _show_maps(self) -> None:
        """Add (or update, or remove) the flows and cell probability layers."""
        item = self.item
        seg = item.segmentation if item is not None else None
        wanted = self.show_maps.isChecked() and seg is not None and \
            seg.cellprob.shape == seg.labels.shape
        if not wanted:
            for name in ("flows_layer", "prob_layer"):
                layer = getattr(self, name)
                if layer is not None and layer in self.viewer.layers:
                    self.viewer.layers.remove(layer)
                setattr(self, name, None)
            return
        from cellplug.render import flow_to_rgb

        flows = flow_to_rgb(seg.flows)
        prob = 1 / (1 + np.exp(-seg.cellprob))
        if self.flows_layer is None or self.flows_layer not in self.viewer.layers:
            self.flows_layer = self.viewer.add_image(flows, name="cellplug flows", rgb=True,
                                                     opacity=0.6)
            self.prob_layer = self.viewer.add_image(prob, name="cellplug cell probability",
                                                    colormap="magma", opacity=0.5,
                                                    contrast_limits=(0, 1), visible=False)
            self._labels_on_top()
        else:
            self.flows_layer.data = flows
            self.prob_layer.data = prob

    def _labels_on_top(self) -> None:
        layers = self.viewer.layers
        for layer in (self.labels_layer, self.diameter_layer):
            if layer is not None and layer in layers:
                layers.move(layers.index(layer), len(layers))

    def _draw_diameter(self, diameter: float | None = None) -> None:
        """The diameter as a circle in the image's lower left corner (as Cellpose's GUI)."""
        item = self.item
        if item is None or item.image is None:
            return
        if diameter is None:
            diameter = self.diameter.value() or (item.segmentation.diameter
                                                 if item.segmentation is not None else 0.0)
        if diameter <= 0:
            if self.diameter_layer is not None and self.diameter_layer in self.viewer.layers:
                self.diameter_layer.data = []
            return
        h = item.image.shape[0]
        r = diameter / 2
        cy, cx = h - r - 2, r + 2
        ellipse = np.array([[cy - r, cx - r], [cy - r, cx + r], [cy + r, cx + r],
                            [cy + r, cx - r]])
        if self.diameter_layer is None or self.diameter_layer not in self.viewer.layers:
            self.diameter_layer = self.viewer.add_shapes(
                [ellipse], shape_type="ellipse", name="cellplug diameter", edge_color="white",
                face_color=[1, 1, 1, 0.25], edge_width=1.5)
        else:
            self.diameter_layer.data = []
            self.diameter_layer.add_ellipses([ellipse], edge_color="white",
                                             face_color=[1, 1, 1, 0.25], edge_width=1.5)
        self.diameter_layer.metadata["diameter"] = float(diameter)

    # -- jobs ----------------------------------------------------------------------------
    def _start(self, job: str, func: Callable[..., Any], *args: Any, total: int = 0,
               then: Callable[[], None] | None = None, **kwargs: Any) -> None:
        from napari.qt.threading import create_worker

        self._cancel.clear()
        self.job = job
        self._then = then
        self.progress.setRange(0, total)  # 0: busy
        self.progress.setValue(0)
        worker = create_worker(func, *args, _start_thread=False, _ignore_errors=True, **kwargs)
        if hasattr(worker, "yielded"):
            worker.yielded.connect(self._on_yield)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        for w in self._busy_widgets:
            w.setEnabled(False)
        self.cancel_button.setEnabled(True)
        worker.start()

    def cancel(self) -> None:
        """Stop the running job at its next step; what it had not finished is dropped."""
        if self.worker is None:
            return
        self._cancel.set()
        self.worker.quit()
        self._then = None
        self.say(f"cancelling {self.job}…")

    def _on_finished(self) -> None:
        job, cancelled, then = self.job, self._cancel.is_set(), self._then
        self.worker = None
        self.job = None
        self._then = None
        for w in self._busy_widgets:
            w.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.progress.setRange(0, 1)
        self.progress.setValue(0 if cancelled else 1)
        if cancelled:
            self.say(f"{job} cancelled")
        self._update_labels()
        if then is not None and not cancelled:
            then()

    def _on_error(self, exc: BaseException) -> None:
        self._then = None
        if not isinstance(exc, CellplugError):
            traceback.print_exception(exc)
        self.say(f"error: {exc}")

    def _on_returned(self, result: Any) -> None:
        if self.job == "training" and result is not None and not self._cancel.is_set():
            self._trained(result)

    def _on_yield(self, msg: tuple) -> None:
        if self._cancel.is_set():  # a result that arrived after Cancel is dropped
            return
        kind = msg[0]
        if kind == "start":
            _, k, n, i = msg
            if n > 1:  # one image: the bar stays busy
                self.progress.setRange(0, n)
                self.progress.setValue(k)
            self.say(f"segmenting {k + 1}/{n}: {self.items[i].name}…")
        elif kind == "done":
            _, k, n, i, seg, model, reason = msg
            item = self.items[i]
            item.set_segmentation(seg, model, reason)
            if n > 1:
                self.progress.setValue(k + 1)
            if i == self.index:
                self._display(item)
            self.say(f"{item.name}: {seg.n_objects} objects (diameter {seg.diameter:.1f} px, "
                     f"{seg.timings.get('total', 0):.1f} s, model {model})")
        elif kind == "remask":
            _, i, seg = msg
            item = self.items[i]
            if item.corrected:  # edited meanwhile: keep the edits
                return
            item.set_segmentation(seg, item.model or "", item.reason)
            if i == self.index:
                self._display(item)
            self.say(f"{item.name}: {seg.n_objects} objects with the new thresholds "
                     f"(masks only, {seg.timings['total']:.2f} s)")
        elif kind == "estimate":
            _, diameter = msg
            self.diameter.setValue(round(diameter, 1))
            self.say(f"estimated diameter: {diameter:.1f} px")

    # -- segmentation --------------------------------------------------------------------
    def segment(self) -> None:
        """Segment the current image (corrections of it are replaced)."""
        item = self._ensure_item()
        if item is not None and self.worker is None:
            self._segment([self.index])

    def segment_all(self) -> None:
        """Segment every image of the folder that is not corrected yet."""
        if self._ensure_item() is None or self.worker is not None:
            return
        todo = [i for i, it in enumerate(self.items) if not it.corrected]
        if not todo:
            self.say("every image is corrected; nothing to segment")
            return
        self._segment(todo)

    def _segment(self, indices: list[int], model: str | None = None) -> None:
        model = model or self.model_combo.currentText()
        if not model:
            self.say("no model to segment with")
            return
        self._start("segmentation", self._segment_job, indices, model, self.options(),
                    total=len(indices) if len(indices) > 1 else 0)

    def _segment_job(self, indices: list[int], model: str, opts: SegmentOptions
                     ) -> Iterator[tuple]:
        n = len(indices)
        for k, i in enumerate(indices):
            if self._cancel.is_set():
                return
            yield ("start", k, n, i)
            item = self.items[i]
            seg, used, reason = self.models.segment(model, item.load(), opts)
            yield ("done", k, n, i, seg, used, reason)

    def rerun_thresholds(self) -> None:
        """The current image's masks again with the widget's thresholds, from its stored
        network output (only the reconstruction runs). A corrected image keeps its edits."""
        item = self.item
        if item is None or item.segmentation is None:
            return
        if item.corrected:
            self.say("thresholds not applied: this image is corrected (Segment starts over)")
            return
        if self.worker is not None:
            self._remask_timer.start()  # after the running job
            return
        self._start("thresholds", self._remask_job, self.index, self.options())

    def _remask_job(self, index: int, opts: SegmentOptions) -> Iterator[tuple]:
        yield ("remask", index, self.models.remask(self.items[index], opts))

    def estimate_diameter(self) -> None:
        """The size model's diameter for the current image, set in the widget and drawn."""
        item = self._ensure_item()
        model = self.model_combo.currentText()
        if item is None or self.worker is not None or not model:
            return
        self.say("estimating the diameter…")
        self._start("diameter estimate", self._estimate_job, item, model, self.options())

    def _estimate_job(self, item: Item, model: str, opts: SegmentOptions) -> Iterator[tuple]:
        yield ("estimate", self.models.estimate_diameter(model, item.load(), opts))

    # -- corrections ---------------------------------------------------------------------
    def object_under_cursor(self) -> int:
        if self.labels_layer is None or self.labels_layer not in self.viewer.layers:
            return 0
        return edits.object_at(self.labels_layer, self.viewer.cursor.position)

    def delete_object(self, label: int) -> int:
        """Erase object ``label`` (undoable); marks the image corrected."""
        if self.labels_layer is None:
            return 0
        n = edits.delete_object(self.labels_layer, label)
        if n:
            self.say(f"deleted object {label} ({n} px)")
        return n

    def merge_objects(self, keep: int, other: int) -> int:
        """Make objects ``keep`` and ``other`` one object ``keep`` (undoable)."""
        if self.labels_layer is None:
            return 0
        n = edits.merge_objects(self.labels_layer, keep, other)
        if n:
            self.say(f"merged object {other} into {keep}")
        return n

    def _delete_key(self, viewer: Any = None) -> None:
        label = self.object_under_cursor()
        if label:
            self.delete_object(label)

    def _merge_key(self, viewer: Any = None) -> None:
        label = self.object_under_cursor()
        if not label:
            self._merge_first = None
            self.say("merge: no object under the cursor")
        elif self._merge_first is None or self._merge_first == label:
            self._merge_first = label
            self.say(f"merge: object {label} marked; {MERGE_KEY} over the object to merge "
                     f"it with")
        else:
            first, self._merge_first = self._merge_first, None
            self.merge_objects(first, label)

    # -- training ------------------------------------------------------------------------
    def train(self) -> None:
        """Fine-tune the current model on the corrected images (the ``hitl`` recipe) into a
        new model of the user's zoo; then select it and re-segment the images not corrected."""
        from .session import training_annotations

        if self.worker is not None:
            return
        anns = training_annotations(self.items)
        if not anns:
            self.say("no corrected image yet: correct the masks of at least one image")
            return
        base = self.model_combo.currentText()
        if base == AUTO or not base:  # start from what segmented the corrected images
            base = next((i.model for i in self.items if i.corrected and i.model), None) or ""
        try:
            name = self.model_name.text().strip() or new_model_name(base or "generalist")
        except CellplugError as exc:
            self.say(f"error: {exc}")
            return
        epochs = self.epochs.value()
        channels = (self.cyto.currentIndex(), self.nucleus.currentIndex())
        self.say(f"training {name} from {base or 'the default model'} on {len(anns)} "
                 f"corrected image(s)…")
        self._start("training", self._train_job, anns, base or None, name, epochs, channels,
                    total=epochs)

    def _train_job(self, anns: list, base: str | None, name: str, epochs: int,
                   channels: tuple[int, int]) -> Any:
        from cellplug.hitl import fine_tune, recipe_config

        def log(message: str) -> None:
            if message.startswith("{"):
                record = json.loads(message)
                done = int(record["epoch"]) + 1
                self._relay.progress.emit(done, epochs, f"training {name}: epoch {done}/"
                                          f"{epochs}, loss {record['loss']:.3f}")
            else:
                self._relay.progress.emit(-1, epochs, message)

        config = recipe_config("hitl", epochs=epochs, channels=tuple(channels))
        return fine_tune(anns, base or "generalist", name=name, config=config,
                         source_format="napari", progress=False, log_fn=log,
                         should_stop=self._cancel.is_set)

    def _on_train_progress(self, done: int, total: int, message: str) -> None:
        if self.job != "training" or self._cancel.is_set():
            return
        if done >= 0:
            self.progress.setRange(0, total)
            self.progress.setValue(done)
        self.say(message)

    def _trained(self, result: Any) -> None:
        name = Path(result.model_path).stem
        self.refresh_models(select=name)
        self.model_name.clear()
        todo = [i for i, it in enumerate(self.items)
                if not it.corrected and (it.segmentation is not None or i == self.index)]
        self.say(f"saved model {name} in the zoo; re-segmenting {len(todo)} image(s) not "
                 f"corrected")
        self.trained_model = name
        if todo:
            self._then = lambda: self._segment(todo, name)

    # -- saving --------------------------------------------------------------------------
    def save(self, folder: str | Path | None = None) -> list[Path]:
        """Write every corrected image's labels as the checked kinds, beside each image (or
        into ``folder``), each image all or none."""
        from .session import save_item

        kinds = [k for k, check in self.save_kinds.items() if check.isChecked()]
        items = [i for i in self.items if i.corrected]
        if not kinds or not items:
            self.say("nothing to save: no corrected image" if not items else
                     "choose what to save")
            return []
        written: list[Path] = []
        channels = (self.cyto.currentIndex(), self.nucleus.currentIndex())
        for item in items:
            try:
                written += save_item(item, kinds, Path(folder) if folder else None, channels)
            except CellplugError as exc:
                self.say(f"error: {exc}")
                return written
        self.say(f"saved {len(items)} corrected image(s): " + ", ".join(p.name for p in written))
        return written

    def closeEvent(self, event: Any) -> None:  # noqa: N802 - Qt's name
        self.cancel()
        for key in (DELETE_KEY, MERGE_KEY):
            self.viewer.bind_key(key, None)
        super().closeEvent(event)


def _spin(lo: float, hi: float, value: float, step: float, tip: str) -> QDoubleSpinBox:
    spin = QDoubleSpinBox()
    spin.setRange(lo, hi)
    spin.setDecimals(2)
    spin.setSingleStep(step)
    spin.setValue(value)
    spin.setToolTip(tip)
    return spin


def _is_rgb(image: np.ndarray) -> bool:
    return image.ndim == 3 and image.shape[-1] in (3, 4)
