"""RunCellplug: a CellProfiler 5 module that segments with cellplug, in CellProfiler's process.

A thin adapter. CellProfiler's conventions are kept outside (settings, objects, measurements,
display); inside, one call to :meth:`cellplug.segmenter.Segmenter.segment` with a
:class:`cellplug.segmenter.SegmentOptions` made from the settings, exactly what
``cellplug segment`` does with the same options. The loaded :class:`Segmenter` is cached between
image sets, keyed by the model settings and the weights file's identity.

Errors: a model that cannot be loaded and an image that cannot be segmented raise
:class:`RunCellplugError`, whose message names the image set (number and file) and the reason;
CellProfiler reports it for that image set. An image without objects gives zero objects.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np
from cellprofiler_core.constants.measurement import COLTYPE_FLOAT, IMAGE
from cellprofiler_core.image import Image
from cellprofiler_core.module.image_segmentation import ImageSegmentation
from cellprofiler_core.object import Objects
from cellprofiler_core.setting import Binary, ValidationError
from cellprofiler_core.setting.choice import Choice
from cellprofiler_core.setting.subscriber import ImageSubscriber
from cellprofiler_core.setting.text import Directory, Filename, Float, ImageName, Integer

LOGGER = logging.getLogger(__name__)

CUSTOM_MODEL = "Custom model file"
DEFAULT_MODEL = "generalist"  # cellplug.models.DEFAULT_MODEL, without importing cellplug here
C_CELLPLUG = "RunCellplug"
FTR_DIAMETER = "Diameter"  # Image measurement RunCellplug_Diameter_<objects>: diameter used

# Loaded Segmenters, most recently used last; two so that a pipeline with two RunCellplug
# modules (e.g. nuclei and cells models) does not reload a model on every image set.
_CACHE: OrderedDict[tuple, Any] = OrderedDict()
_CACHE_SIZE = 2
_CACHE_LOCK = threading.Lock()


class RunCellplugError(RuntimeError):
    """An image set could not be segmented; the message names it and says why."""


def installed_models() -> list[str]:
    """Names of the models installed in this Python (the default first), or [] if none."""
    try:
        from cellplug.models import DEFAULT_MODEL as default
        from cellplug.models import available_models

        names = sorted(available_models())
    except Exception as exc:  # noqa: BLE001 - a broken install must not break the settings UI
        LOGGER.warning("RunCellplug: cannot list cellplug models: %s", exc)
        return []
    return sorted(names, key=lambda n: (n != default, n))


def model_choices(current: str | None = None) -> list[str]:
    """What the model drop-down offers: installed models, then a custom file.

    ``current`` (the saved value) stays in the list even when it is not installed here, so a
    pipeline from another machine loads unchanged; running it reports the missing model.
    """
    names = installed_models() or [DEFAULT_MODEL]
    if current and current not in names and current != CUSTOM_MODEL:
        names.append(current)
    return [*names, CUSTOM_MODEL]


def remove_edge_objects(labels: np.ndarray) -> np.ndarray:
    """Drop the objects of (Y, X) labels that touch the image border; renumber 1..N in order."""
    if labels.size == 0 or labels.max() == 0:
        return labels
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    edge = edge[edge > 0]
    if edge.size == 0:
        return labels
    n = int(labels.max())
    keep = np.ones(n + 1, bool)
    keep[0] = False
    keep[edge] = False
    lut = np.zeros(n + 1, labels.dtype)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=labels.dtype)
    return lut[labels]


def stored_values(image: Any, data: np.ndarray) -> np.ndarray:
    """The intensities as stored in the file, when CellProfiler's 0..1 scaling can be undone.

    CellProfiler divides an integer image by its scale (255 for 8 bits, 65535 for 16 bits,
    or the bit depth from the file's metadata) when it loads it. cellplug normalises each
    image by its percentiles, so the scale changes nothing in principle, but in float32 the
    divided values round differently, and (with bfloat16 inference) a few boundary pixels or
    the estimated diameter can move. Multiplying back gives exactly the numbers that
    ``cellplug segment`` reads from the file. When that does not reproduce the pixel data
    (an image computed by another module, which inherits its parent's scale), the pixel data
    is used as it is.
    """
    scale = getattr(image, "scale", None)
    if scale is None or not np.isfinite(scale) or scale <= 1 or scale > 2**24:
        return data
    if not np.issubdtype(data.dtype, np.floating) or data.size == 0:
        return data
    if not np.isfinite(data).all():
        return data
    restored = np.rint(data.astype(np.float64) * scale)
    if restored.min() < 0 or not np.array_equal((restored / scale).astype(data.dtype), data):
        return data
    return restored.astype(np.float32)


class RunCellplug(ImageSegmentation):
    """RunCellplug: segment cells or nuclei with cellplug (flow fields, Cellpose-compatible).

    Segments a grayscale image, or a cytoplasm image together with a nuclei image, with a
    cellplug model (a bundled or user-trained model, or a Cellpose 2/3 model file) in
    CellProfiler's own process, and adds the objects with the standard measurements. The
    objects are those that ``cellplug segment`` gives for the same image and settings.

    Please cite Cellpose (Stringer et al., Nature Methods 18, 2021) when you use it.
    """

    category = "Object Processing"
    module_name = "RunCellplug"
    variable_revision_number = 2
    doi = {"Please cite Cellpose, whose method cellplug implements:":
           "https://doi.org/10.1038/s41592-020-01018-x"}

    def create_settings(self) -> None:
        super().create_settings()
        self.y_name.value = "Cells"
        self.model = Choice(
            "Model",
            model_choices(),
            value=DEFAULT_MODEL,
            choices_fn=lambda pipeline: model_choices(self.model.value),
            doc=f"""\
The cellplug model. The list shows the models installed in the Python that runs CellProfiler
(`cellplug models list` shows the same): models of installed plugins, such as the bundled
*{DEFAULT_MODEL}* (nuclei and cells, fluorescence, brightfield, H&E, phase contrast), and models
saved by `cellplug train` in the user model folder. Choose *{CUSTOM_MODEL}* to give a model
file: a cellplug model (`.pth` with its `.json`) or a Cellpose 2/3 model file.""",
        )
        self.model_directory = Directory(
            "Location of the model file",
            doc="*(Used only with a custom model file)* The folder that holds the model file.",
        )

        def get_directory_fn() -> str:
            return self.model_directory.get_absolute_path()

        def set_directory_fn(path: str) -> None:
            choice, custom = self.model_directory.get_parts_from_path(path)
            self.model_directory.join_parts(choice, custom)

        self.model_file_name = Filename(
            "Model file name",
            "model.pth",
            get_directory_fn=get_directory_fn,
            set_directory_fn=set_directory_fn,
            doc="*(Used only with a custom model file)* The model file: a cellplug `.pth` "
                "(its `.json` beside it) or a Cellpose 2/3 model.",
        )
        self.diameter = Float(
            "Expected object diameter",
            0.0,
            minval=0.0,
            doc="""\
The typical object diameter in pixels. The image is rescaled so that objects have the
diameter the model was trained at. **0** estimates the diameter of each image with the
model's size model (as `cellplug segment --diameter 0`, the default).""",
        )
        self.supply_nuclei = Binary(
            "Supply a nuclei image as well?",
            False,
            doc="""\
Segment whole cells from a cytoplasm image (the input image) together with a nuclear stain
(this image), as `cellplug segment --channels 1 2` on a two-channel image. This helps to
split touching cells.""",
        )
        self.nuclei_image = ImageSubscriber(
            "Select the nuclei image",
            doc="The grayscale image of the nuclear stain, the same size as the input image.",
        )
        self.invert = Binary(
            "Invert images?",
            False,
            doc="Invert intensities before segmenting (dark objects on a bright background), "
                "as `cellplug segment --invert`.",
        )
        self.flow_threshold = Float(
            "Flow threshold",
            0.4,
            minval=0.0,
            doc="""\
The largest error allowed between an object's predicted flows and the flows of its mask.
Increase it if objects are missing, decrease it if there are ill-shaped objects (0.4, as
`cellplug segment --flow-threshold`).""",
        )
        self.cellprob_threshold = Float(
            "Cell probability threshold",
            0.0,
            minval=-6.0,
            maxval=6.0,
            doc="""\
Pixels whose cell-probability logit is above this threshold make up objects (0.0, from -6 to
6). Lower it to get more or larger objects, raise it for fewer or smaller ones.""",
        )
        self.min_size = Integer(
            "Minimum size",
            15,
            minval=-1,
            doc="Objects with fewer pixels are removed (15); 0 or -1 keeps every object.",
        )
        self.remove_edge_masks = Binary(
            "Remove objects that are touching the edge?",
            False,
            doc="""\
Remove objects that touch the image border, and renumber the others. Off by default, so the
objects are exactly those of `cellplug segment` (RunCellpose removes them by default).""",
        )
        self.save_probabilities = Binary(
            "Save probability image?",
            False,
            doc="""\
Also add the cell probability as an image, values from 0 to 1 (the logistic function of the
model's cell-probability logit: 0.5 is a logit of 0, the default threshold).""",
        )
        self.probabilities_name = ImageName(
            "Name the probability image",
            "Probabilities",
            doc="The name of the probability image.",
        )
        self.use_gpu = Binary(
            "Use GPU",
            False,
            doc="""\
Use a CUDA GPU when PyTorch sees one. cellplug 0.1 runs its network on the CPU only, so this
setting has no effect yet (it is saved, and a note is logged when a GPU is present).""",
        )

    # -- settings: the order is the saved format; change it only with a new revision -------
    def settings(self) -> list:
        return [
            self.x_name,
            self.y_name,
            self.model,
            self.model_directory,
            self.model_file_name,
            self.diameter,
            self.supply_nuclei,
            self.nuclei_image,
            self.invert,
            self.flow_threshold,
            self.cellprob_threshold,
            self.min_size,
            self.remove_edge_masks,
            self.save_probabilities,
            self.probabilities_name,
            self.use_gpu,
        ]

    def visible_settings(self) -> list:
        shown = [self.x_name, self.supply_nuclei]
        if self.supply_nuclei.value:
            shown.append(self.nuclei_image)
        shown += [self.y_name, self.model]
        if self.model.value == CUSTOM_MODEL:
            shown += [self.model_directory, self.model_file_name]
        shown += [self.diameter, self.flow_threshold, self.cellprob_threshold, self.min_size,
                  self.invert, self.remove_edge_masks, self.save_probabilities]
        if self.save_probabilities.value:
            shown.append(self.probabilities_name)
        shown.append(self.use_gpu)
        return shown

    def upgrade_settings(self, setting_values, variable_revision_number, module_name):
        if variable_revision_number == 1:
            # revision 2 added "Invert images?" after the nuclei image
            setting_values = setting_values[:8] + ["No"] + setting_values[8:]
            variable_revision_number = 2
        return setting_values, variable_revision_number

    def validate_module(self, pipeline) -> None:
        if self.model.value == CUSTOM_MODEL:
            path = self.model_path()
            if not os.path.isfile(path):
                raise ValidationError(f"model file not found: {path}", self.model_file_name)
        elif self.model.value not in installed_models():
            raise ValidationError(
                f"model {self.model.value!r} is not installed in this Python; installed: "
                f"{', '.join(installed_models()) or 'none'}", self.model)

    # -- measurements: the standard ones plus the diameter used ---------------------------
    def _diameter_feature(self) -> str:
        return f"{C_CELLPLUG}_{FTR_DIAMETER}_{self.y_name.value}"

    def get_measurement_columns(self, pipeline, object_name=None):
        columns = super().get_measurement_columns(pipeline, object_name)
        if object_name is None or object_name == IMAGE:
            columns.append((IMAGE, self._diameter_feature(), COLTYPE_FLOAT))
        return columns

    def get_categories(self, pipeline, object_name):
        categories = super().get_categories(pipeline, object_name)
        if object_name == IMAGE:
            categories = [*categories, C_CELLPLUG]
        return categories

    def get_measurements(self, pipeline, object_name, category):
        if object_name == IMAGE and category == C_CELLPLUG:
            return [f"{FTR_DIAMETER}_{self.y_name.value}"]
        return super().get_measurements(pipeline, object_name, category)

    # -- the model ------------------------------------------------------------------------
    def model_path(self) -> str:
        return os.path.join(self.model_directory.get_absolute_path(), self.model_file_name.value)

    def model_ref(self) -> str:
        return self.model_path() if self.model.value == CUSTOM_MODEL else self.model.value

    def segmenter(self) -> Any:
        """The cellplug Segmenter for the current settings, loaded once and then cached.

        Raises :class:`cellplug.errors.CellplugError` when the model cannot be loaded.
        """
        from cellplug.models import resolve_model
        from cellplug.segmenter import Segmenter

        ref = self.model_ref()
        if self.model.value == CUSTOM_MODEL and not os.path.exists(ref):
            from cellplug.errors import CellplugError

            raise CellplugError(f"{ref}: model file not found")
        info = resolve_model(ref)
        weights = info.weights.resolve()
        st = weights.stat()
        key = (ref, str(weights), st.st_mtime_ns, st.st_size)
        with _CACHE_LOCK:
            if key in _CACHE:
                _CACHE.move_to_end(key)
                return _CACHE[key]
        if self.use_gpu.value and _gpu_seen():
            LOGGER.info("RunCellplug: a GPU is present, but cellplug runs on the CPU")
        segmenter = Segmenter.from_model(ref)
        with _CACHE_LOCK:
            _CACHE[key] = segmenter
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
        return segmenter

    def segment_options(self) -> Any:
        from cellplug.segmenter import SegmentOptions

        return SegmentOptions(
            diameter=float(self.diameter.value),
            channels=(1, 2) if self.supply_nuclei.value else (0, 0),
            invert=bool(self.invert.value),
            flow_threshold=float(self.flow_threshold.value),
            cellprob_threshold=float(self.cellprob_threshold.value),
            min_size=max(0, int(self.min_size.value)),
        )

    # -- running --------------------------------------------------------------------------
    def image_set_description(self, workspace) -> str:
        """'image set N (file.tif)': what error messages name."""
        m = workspace.measurements
        text = f"image set {m.image_set_number}"
        names = []
        for image in [self.x_name.value] + ([self.nuclei_image.value]
                                             if self.supply_nuclei.value else []):
            feature = f"FileName_{image}"
            try:
                if m.has_feature(IMAGE, feature):
                    names.append(str(m.get_current_image_measurement(feature)))
            except Exception:  # noqa: BLE001 - a name is a nicety, never a new error
                pass
        return f"{text} ({', '.join(names)})" if names else text

    def _fail(self, workspace, reason: str) -> RunCellplugError:
        return RunCellplugError(
            f"RunCellplug ({self.y_name.value}), {self.image_set_description(workspace)}: "
            f"{' '.join(reason.split())}"
        )

    def _pixels(self, workspace) -> tuple[Any, np.ndarray]:
        """The input image and the array to segment: (Y, X), (Y, X, C) or (Y, X, 2)."""
        from cellplug.io import MAX_CHANNELS

        x = workspace.image_set.get_image(self.x_name.value)
        data = x.pixel_data
        if x.volumetric or data.ndim not in (2, 3):
            raise self._fail(workspace, f"image {self.x_name.value!r} has shape {data.shape}"
                                        f"{' (3-D)' if x.volumetric else ''}; RunCellplug "
                                        f"segments 2-D images, grayscale (Y, X) or colour "
                                        f"(Y, X, C)")
        if data.ndim == 3 and data.shape[2] > MAX_CHANNELS:
            # CellProfiler's readers give a stack of planes without axis metadata as (P, Y, X),
            # which CellProfiler itself takes for Y, X, C: refuse rather than guess
            raise self._fail(workspace, f"image {self.x_name.value!r} has shape {data.shape}, "
                                        f"{data.shape[2]} channels (at most {MAX_CHANNELS}); if "
                                        f"the file is a stack of planes, load one plane per "
                                        f"image in NamesAndTypes")
        if min(data.shape[:2]) == 1:
            # cellplug gives such an image 0 objects, but CellProfiler's label conversion
            # (convert_dense_to_sparse) drops length-1 axes and fails on any later use
            raise self._fail(workspace, f"image {self.x_name.value!r} has shape {data.shape}; "
                                        f"CellProfiler cannot hold objects of an image 1 pixel "
                                        f"high or wide")
        if not self.supply_nuclei.value:
            return x, stored_values(x, data)
        nuc = workspace.image_set.get_image(self.nuclei_image.value)
        nuc_data = nuc.pixel_data
        if data.ndim != 2 or nuc_data.ndim != 2 or nuc.volumetric:
            raise self._fail(workspace, f"with a nuclei image, both images must be grayscale 2-D "
                                        f"(got {data.shape} and {nuc_data.shape})")
        if nuc_data.shape != data.shape:
            raise self._fail(workspace, f"nuclei image {self.nuclei_image.value!r} is "
                                        f"{nuc_data.shape}, the input image is {data.shape}")
        return x, np.stack([stored_values(x, data), stored_values(nuc, nuc_data)], axis=-1)

    def run(self, workspace) -> None:
        from cellplug.errors import CellplugError

        x, pixels = self._pixels(workspace)
        try:
            segmenter = self.segmenter()
        except CellplugError as exc:
            raise self._fail(workspace, f"cannot load model: {exc}") from exc
        t0 = time.perf_counter()
        try:
            result = segmenter.segment(pixels, self.segment_options())
        except CellplugError as exc:
            raise self._fail(workspace, f"cannot segment image {self.x_name.value!r}: {exc}") \
                from exc
        except MemoryError as exc:
            raise self._fail(workspace, f"out of memory segmenting image {self.x_name.value!r} "
                                        f"of shape {pixels.shape}") from exc
        seconds = time.perf_counter() - t0
        labels = result.labels
        if self.remove_edge_masks.value:
            labels = remove_edge_objects(labels)

        objects = Objects()
        objects.segmented = labels  # CellProfiler stores them as int8/16/32 by the largest id
        objects.parent_image = x.parent_image
        workspace.object_set.add_objects(objects, self.y_name.value)
        self.add_measurements(workspace)
        workspace.measurements.add_image_measurement(self._diameter_feature(), result.diameter)

        probabilities = None
        if self.save_probabilities.value:
            probabilities = (1.0 / (1.0 + np.exp(-result.cellprob.astype(np.float64)))).astype(
                np.float32)
            workspace.image_set.add(self.probabilities_name.value,
                                    Image(probabilities, parent_image=x, convert=False))

        if self.show_window:
            d = workspace.display_data
            d.x_data = x.pixel_data
            d.y_data = labels
            d.dimensions = x.dimensions
            d.probabilities = probabilities
            d.statistics = [
                ("Objects", str(int(labels.max()) if labels.size else 0)),
                ("Diameter used (pixels)", f"{result.diameter:.1f}"),
                ("Model", segmenter.model.name),
                ("Seconds", f"{seconds:.2f}"),
            ]

    def display(self, workspace, figure) -> None:
        d = workspace.display_data
        with_prob = getattr(d, "probabilities", None) is not None
        figure.set_subplots(dimensions=d.dimensions, subplots=(3 if with_prob else 2, 2))
        figure.subplot_imshow(colormap="gray", image=d.x_data, title=self.x_name.value,
                              x=0, y=0)
        figure.subplot_imshow_labels(background_image=d.x_data, image=d.y_data,
                                     sharexy=figure.subplot(0, 0), title=self.y_name.value,
                                     x=1, y=0)
        if with_prob:
            figure.subplot_imshow(colormap="magma", image=d.probabilities,
                                  sharexy=figure.subplot(0, 0),
                                  title=self.probabilities_name.value, x=2, y=0)
        figure.subplot_table(0, 1, [[value] for _, value in d.statistics],
                             row_labels=[name for name, _ in d.statistics])

    def volumetric(self) -> bool:
        return False


def _gpu_seen() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001
        return False


__all__ = ["CUSTOM_MODEL", "RunCellplug", "RunCellplugError", "installed_models",
           "model_choices", "remove_edge_objects", "stored_values"]
