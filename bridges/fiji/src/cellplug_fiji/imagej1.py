"""The in-process way: ImageJ in this Python process, with a ``Plugins > Cellplug`` menu.

The menu items are ``java.awt.MenuItem`` objects whose ``ActionListener`` is a Python class
(a JPype proxy); no Java is compiled. A click asks ImageJ to run the command
(``IJ.doCommand``), and a ``CommandListener`` (another proxy) takes the commands
"Segment" and "Train from ROI Manager" from ImageJ's command runner and runs them here. So
a menu click, ``run("Segment", "model=... diameter=...")`` in a macro and the macro
recorder all go one way: the dialog (an ImageJ ``GenericDialog`` built from
:data:`cellplug_fiji.commands.COMMANDS`) reads macro options when a macro gives them, and
records its fields when the recorder is on.

Images cross as numpy arrays in :mod:`cellplug_fiji.convert`'s (T, Z, Y, X, C) order; the
conversion of plain ImageJ 1.x is here (:class:`ImageJ1Host`), pyimagej's for Fiji in
:mod:`cellplug_fiji.fiji`. Import this module only once the JVM runs (:func:`start`).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from cellplug.errors import CellplugError

from . import commands, convert, jvm

CANCEL = "Cancel Training"
MENU = "Cellplug"


def _java() -> dict[str, Any]:
    """The Java classes used here (importable only once the JVM runs)."""
    import jpype.imports  # noqa: F401 - enables `from ij import ...`
    from ij import IJ, ImagePlus, ImageStack, Macro, WindowManager  # type: ignore
    from ij.gui import GenericDialog, Overlay  # type: ignore
    from ij.io import RoiDecoder, RoiEncoder  # type: ignore
    from ij.plugin.frame import Recorder, RoiManager  # type: ignore
    from ij.process import LUT, FloatProcessor, ShortProcessor  # type: ignore

    return dict(IJ=IJ, ImagePlus=ImagePlus, ImageStack=ImageStack, Macro=Macro,
                WindowManager=WindowManager, GenericDialog=GenericDialog, Overlay=Overlay,
                RoiDecoder=RoiDecoder, RoiEncoder=RoiEncoder, Recorder=Recorder,
                RoiManager=RoiManager, FloatProcessor=FloatProcessor, LUT=LUT,
                ShortProcessor=ShortProcessor)


# -- conversion: ImagePlus <-> numpy ----------------------------------------------------------
_PIXEL_TYPES = {8: np.uint8, 16: np.uint16, 32: np.float32}


def imageplus_to_array(imp: Any) -> np.ndarray:
    """An ``ImagePlus`` as (T, Z, Y, X, C) in its own pixel type, exactly: 8-bit -> uint8,
    16-bit -> uint16, 32-bit -> float32, RGB -> uint8 with C = 3 (R, G, B)."""
    w, h = int(imp.getWidth()), int(imp.getHeight())
    n_c, n_z, n_t = int(imp.getNChannels()), int(imp.getNSlices()), int(imp.getNFrames())
    bits = int(imp.getBitDepth())
    stack = imp.getStack()
    if bits == 24:
        if n_c != 1:
            raise CellplugError(f"{imp.getTitle()}: an RGB image with {n_c} channels")
        out = np.empty((n_t, n_z, h, w, 3), np.uint8)
    elif bits in _PIXEL_TYPES:
        out = np.empty((n_t, n_z, h, w, n_c), _PIXEL_TYPES[bits])
    else:
        raise CellplugError(f"{imp.getTitle()}: unsupported bit depth {bits}")
    for t in range(n_t):
        for z in range(n_z):
            for c in range(n_c):
                pixels = np.array(stack.getPixels(imp.getStackIndex(c + 1, z + 1, t + 1)))
                if bits == 24:  # packed 0xAARRGGBB ints
                    argb = pixels.astype(np.uint32).reshape(h, w)
                    out[t, z] = np.stack([(argb >> 16) & 255, (argb >> 8) & 255, argb & 255],
                                         axis=-1)
                else:  # Java's bytes and shorts are signed: same bits, read unsigned
                    out[t, z, :, :, c] = pixels.view(out.dtype).reshape(h, w)
    return out


def labels_to_imageplus(labels: np.ndarray, title: str, like: Any | None = None) -> Any:
    """A (T, Z, Y, X) label image as an ``ImagePlus``: 16-bit (or 32-bit float above 65,535
    objects, see :mod:`cellplug_fiji.convert`), the glasbey-like LUT, and ``like``'s spatial
    and time calibration (not its value calibration)."""
    import jpype

    j = _java()
    labels = convert.to_label_image(labels)
    n_t, n_z, h, w = labels.shape
    stack = j["ImageStack"](w, h)
    for t in range(n_t):
        for z in range(n_z):
            plane = np.ascontiguousarray(labels[t, z]).ravel()
            if labels.dtype == np.uint16:
                ip = j["ShortProcessor"](w, h, jpype.JArray(jpype.JShort)(plane.view(np.int16)),
                                         None)
            else:
                ip = j["FloatProcessor"](w, h, jpype.JArray(jpype.JFloat)(plane))
            stack.addSlice(None, ip)
    return finish_labels(j["ImagePlus"](title, stack), labels, like)


def finish_labels(imp: Any, labels: np.ndarray, like: Any | None) -> Any:
    """Geometry, calibration, LUT and display range of a label ``ImagePlus`` (both hosts)."""
    import jpype

    j = _java()
    n_t, n_z = labels.shape[:2]
    imp.setDimensions(1, n_z, n_t)
    if n_z > 1 and n_t > 1:
        imp.setOpenAsHyperStack(True)
    if like is not None:
        cal = like.getCalibration().copy()
        cal.disableDensityCalibration()  # labels are counts, not the source's intensities
        imp.setCalibration(cal)
    lut = convert.glasbey_lut()
    imp.setLut(j["LUT"](*(jpype.JArray(jpype.JByte)(c.view(np.int8)) for c in lut)))
    low, high = convert.display_range(labels)
    imp.setDisplayRange(low, high)
    return imp


def java_rois(rois: list) -> list:
    """roifile ROIs as ImageJ ``Roi`` objects: the same bytes a ROI set zip holds, decoded
    by ImageJ's own ``RoiDecoder``, so both ways give the same ROIs."""
    import jpype

    decode = _java()["RoiDecoder"].openFromByteArray
    return [decode(jpype.JArray(jpype.JByte)(np.frombuffer(r.tobytes(), np.int8)))
            for r in rois]


def python_rois(java_roi_list: Any) -> list:
    """ImageJ ``Roi`` objects as roifile ROIs (encoded by ImageJ's ``RoiEncoder``)."""
    import roifile

    encode = _java()["RoiEncoder"].saveAsByteArray
    return [roifile.ImagejRoi.frombytes(bytes(np.array(encode(r)).view(np.uint8)))
            for r in java_roi_list]


class ImageJ1Host:
    """How images cross in plain ImageJ 1.x: the conversion above."""

    name = "ImageJ 1.x"

    def to_array(self, imp: Any) -> np.ndarray:
        return imageplus_to_array(imp)

    def labels_to_imageplus(self, labels: np.ndarray, title: str, like: Any) -> Any:
        return labels_to_imageplus(labels, title, like)


# -- the bridge: menu, listeners, commands ------------------------------------------------------
class Bridge:
    """The ``Plugins > Cellplug`` menu and the commands behind it, in one ImageJ."""

    def __init__(self, host: Any) -> None:
        self.host = host
        self.menu: Any = None
        self.last_error: str | None = None
        self.last_result: dict[str, Any] = {}
        self.progress: tuple[int, int] = (0, 0)  # training step, steps (as the status bar)
        self._cancel = threading.Event()
        self._idle = threading.Condition()
        self._running: str | None = None
        self._listener: Any = None
        self._command_listener: Any = None

    # menu and listeners
    def install(self) -> Any:
        """Add the menu to ImageJ's Plugins menu and the command listener to ImageJ."""
        from ij import Executer, Menus  # type: ignore
        from java.awt import EventQueue, Menu, MenuItem  # type: ignore

        self._listener, self._command_listener = _listeners(self)

        def build() -> None:
            plugins = Menus.getImageJMenu("Plugins")
            for i in reversed(range(plugins.getItemCount())):  # a previous or installed one
                if str(plugins.getItem(i).getLabel()) == MENU:
                    plugins.remove(i)
            menu = Menu(MENU)
            for label in (commands.SEGMENT, commands.TRAIN, CANCEL):
                item = MenuItem(label)
                item.addActionListener(self._listener)
                menu.add(item)
            plugins.add(menu)
            self.menu = menu

        # AWT menus are changed on the event thread
        EventQueue.invokeAndWait(_runnable(build))
        Executer.addCommandListener(self._command_listener)
        return self.menu

    def uninstall(self) -> None:
        from ij import Executer, Menus  # type: ignore

        if self._command_listener is not None:
            Executer.removeCommandListener(self._command_listener)
        plugins = Menus.getImageJMenu("Plugins")
        if self.menu is not None and plugins is not None:
            plugins.remove(self.menu)
        self.menu = None

    def item(self, label: str) -> Any:
        """The menu item called ``label``."""
        for i in range(self.menu.getItemCount()):
            if str(self.menu.getItem(i).getLabel()) == label:
                return self.menu.getItem(i)
        raise KeyError(label)

    def on_menu(self, label: str) -> None:
        """A menu item was chosen (on the event thread: hand the work to ImageJ's runner)."""
        if label == CANCEL:
            self.cancel()
            return
        _java()["IJ"].doCommand(label)  # a new thread, through the command listener

    def on_command(self, command: str) -> str | None:
        """ImageJ is about to run ``command``: ours run here (None: ImageJ runs nothing)."""
        if command not in commands.COMMANDS:
            return command
        self.run(command)
        return None

    # running commands
    def run(self, command: str) -> None:
        """Run ``command`` in this thread: dialog (or the macro options ImageJ set for this
        thread, ``run("Segment", "model=...")``), then the work.

        Errors are shown as ImageJ errors (in a macro, they stop it with that message) and
        kept in :attr:`last_error`; nothing escapes into Java.
        """
        j = _java()
        with self._idle:
            if self._running is not None:
                j["IJ"].error("Cellplug", f"cellplug is busy ({self._running}); try again when "
                                          f"it is done")
                return
            self._running = command
        self.last_error = None
        try:
            j["Recorder"].setCommand(command)  # a no-op unless the recorder is open
            values = self.dialog(command)
            if values is None:  # cancelled
                j["Recorder"].setCommand(None)
                return
            if command == commands.SEGMENT:
                self.segment(values)
            else:
                self.train(values)
            j["Recorder"].saveCommand()
        except CellplugError as exc:
            self._fail(exc)
        except Exception as exc:  # noqa: BLE001 - a bug: say so rather than leave Java hanging
            self._fail(exc, bug=True)
        finally:
            with self._idle:
                self._running = None
                self._idle.notify_all()

    def _fail(self, exc: BaseException, bug: bool = False) -> None:
        from cellplug.train import TrainingCancelled

        j = _java()
        line = " ".join(str(exc).split())
        if isinstance(exc, TrainingCancelled):
            self.last_error = line
            j["IJ"].showStatus(f"cellplug: {line}")
            j["IJ"].log(f"cellplug: {line}")
            return
        if bug:
            line = f"internal error (a bug, please report it): {type(exc).__name__}: {line}"
            import traceback

            traceback.print_exception(exc)
        self.last_error = f"error: {line}"
        j["IJ"].showProgress(1.0)
        j["IJ"].showStatus("")
        j["IJ"].log(f"cellplug {self.last_error}")
        j["IJ"].error("Cellplug", self.last_error)

    def wait_idle(self, timeout: float = 600.0) -> bool:
        """Wait until no command runs (True) or ``timeout`` seconds passed (False)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._running is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.5))
        return True

    @property
    def running(self) -> str | None:
        return self._running

    def cancel(self) -> None:
        """Stop a training run at its next step (nothing is saved)."""
        self._cancel.set()
        _java()["IJ"].showStatus("cellplug: cancelling training...")

    def dialog(self, command: str) -> dict[str, Any] | None:
        """The command's dialog; with macro options set (``run(cmd, options)``), their values.

        Returns the values by key, or None when cancelled.
        """
        j = _java()
        gd = j["GenericDialog"](f"Cellplug {command}")
        if command == commands.SEGMENT:
            from cellplug.models import available_models

            gd.addMessage("Models: " + ", ".join(sorted(available_models())))
        for f in commands.COMMANDS[command]:
            if f.kind == "string":
                gd.addStringField(f.label, str(f.default), 20)
            else:
                gd.addNumericField(f.label, float(f.default), f.digits, 8, f.units)
        gd.showDialog()
        if gd.wasCanceled():
            return None
        values: dict[str, Any] = {}
        for f in commands.COMMANDS[command]:
            values[f.key] = (str(gd.getNextString()).strip() if f.kind == "string"
                             else float(gd.getNextNumber()))
            if f.kind == "number" and np.isnan(values[f.key]):
                raise CellplugError(f"{f.label}: not a number")
        return values

    def _image(self) -> Any:
        imp = _java()["WindowManager"].getCurrentImage()
        if imp is None:
            raise CellplugError("no image is open")
        return imp

    def segment(self, values: dict[str, Any]) -> Any:
        """Segment the active image: a label image, the ROIs in the ROI Manager and as an
        overlay on the image. Returns the label ``ImagePlus``."""
        j = _java()
        imp = self._image()
        data = self.host.to_array(imp)
        j["IJ"].showStatus(f"cellplug: segmenting {imp.getTitle()} with {values['model']}...")
        labels = commands.segment_image(
            data, values, progress=lambda i, n: j["IJ"].showProgress(i, n))
        title = f"{Path(str(imp.getTitle())).stem}-labels"
        label_imp = self.host.labels_to_imageplus(labels, title, imp)
        label_imp.show()
        rois = java_rois(convert.labels_to_rois(labels, data.shape[4]
                                                if int(imp.getBitDepth()) != 24 else 1))
        manager = self._roi_manager(reset=True)
        overlay = j["Overlay"]()
        for roi in rois:
            manager.add(roi, -1)  # -1: keep the ROI's own name and position
            overlay.add(roi)
        imp.setOverlay(overlay)
        n = int(sum(int(p.max()) for p in labels.reshape(-1, *labels.shape[2:])))
        self.last_result = {"command": commands.SEGMENT, "objects": n, "rois": len(rois),
                            "labels": label_imp, "image": imp}
        j["IJ"].showStatus(f"cellplug: {n} objects in {imp.getTitle()} ({values['model']})")
        return label_imp

    def _roi_manager(self, reset: bool = False) -> Any:
        manager = _java()["RoiManager"].getInstance()
        if manager is None:
            manager = _java()["RoiManager"]()
        elif reset:
            manager.reset()
        return manager

    def train(self, values: dict[str, Any]) -> str:
        """Fine-tune on the active image and the ROI Manager's ROIs; returns the new model's
        name (in the zoo). Status bar: progress; Esc or Plugins > Cellplug > Cancel Training
        stops it."""
        from cellplug.models import available_models

        j = _java()
        IJ = j["IJ"]
        imp = self._image()
        manager = _java()["RoiManager"].getInstance()
        if manager is None or int(manager.getCount()) == 0:
            raise CellplugError("the ROI Manager is empty: add the (corrected) outlines of the "
                                "objects of this image first")
        rois = python_rois(manager.getRoisAsArray())
        data = self.host.to_array(imp)
        self._cancel.clear()
        self.progress = (0, 0)
        IJ.resetEscape()

        def progress(step: int, steps: int) -> None:
            self.progress = (step, steps)
            IJ.showStatus(f"cellplug: training {values['base']} -> step {step}/{steps} "
                          f"(Esc cancels)")
            IJ.showProgress(step, steps)

        name, result = commands.train_from_rois(
            data, rois, Path(str(imp.getTitle())).stem, values,
            current=(int(imp.getFrame()) - 1, int(imp.getSlice()) - 1),
            should_stop=lambda: self._cancel.is_set() or bool(IJ.escapePressed()),
            progress=progress, log=lambda m: IJ.log(f"cellplug: {m}"))
        IJ.log(f"cellplug: saved model {name!r} ({result.model_path}), fine-tuned from "
               f"{values['base']} on {len(rois)} ROIs of {imp.getTitle()}")
        IJ.log("cellplug: models: " + ", ".join(sorted(available_models())))
        IJ.showStatus(f"cellplug: new model {name}")
        self.last_result = {"command": commands.TRAIN, "model": name,
                            "path": result.model_path}
        return name


def _listeners(bridge: Bridge) -> tuple[Any, Any]:
    """The JPype proxies: an ActionListener for the menu items, a CommandListener for ImageJ."""
    from ij import CommandListener  # type: ignore
    from java.awt.event import ActionListener  # type: ignore
    from jpype import JImplements, JOverride

    @JImplements(ActionListener)
    class MenuListener:
        @JOverride
        def actionPerformed(self, event: Any) -> None:  # noqa: N802 - Java's name
            try:
                bridge.on_menu(str(event.getActionCommand()))
            except Exception as exc:  # noqa: BLE001 - never into Java
                bridge._fail(exc, bug=True)

    @JImplements(CommandListener)
    class Commands:
        @JOverride
        def commandExecuting(self, command: Any) -> Any:  # noqa: N802 - Java's name
            return None if bridge.on_command(str(command)) is None else command

    return MenuListener(), Commands()


def _runnable(fn: Any) -> Any:
    from java.lang import Runnable  # type: ignore
    from jpype import JImplements, JOverride

    @JImplements(Runnable)
    class Run:
        @JOverride
        def run(self) -> None:
            fn()

    return Run()


# -- starting ---------------------------------------------------------------------------------
def start(fiji_dir: str | os.PathLike[str] | None = None,
          ij_jar: str | os.PathLike[str] | None = None) -> Bridge:
    """Start ImageJ in this process with the Cellplug menu; returns the :class:`Bridge`.

    With ``fiji_dir`` (or ``$CELLPLUG_FIJI_DIR``): that Fiji through pyimagej. Otherwise plain
    ImageJ 1.x from ``ij_jar`` (see :func:`cellplug_fiji.jvm.find_ij_jar`).
    """
    fiji_dir = fiji_dir or os.environ.get("CELLPLUG_FIJI_DIR") or None
    jvm.check_display()
    if fiji_dir:
        from .fiji import start_fiji

        host: Any = start_fiji(Path(fiji_dir))
    else:
        jar = jvm.find_ij_jar(ij_jar)
        jvm.start_jvm([jar], [f"-Dplugins.dir={jvm.imagej_home(jar)}"])
        import jpype.imports  # noqa: F401
        from ij import IJ, ImageJ  # type: ignore

        if IJ.getInstance() is None:
            # EMBEDDED: quitting ImageJ closes its windows without System.exit, so Python
            # decides when the process ends
            ImageJ(ImageJ.EMBEDDED)
        host = ImageJ1Host()
    bridge = Bridge(host)
    bridge.install()
    return bridge


def wait_until_closed(poll: float = 0.5) -> None:
    """Block while ImageJ's main window is open."""
    from ij import IJ  # type: ignore

    while IJ.getInstance() is not None:
        time.sleep(poll)
