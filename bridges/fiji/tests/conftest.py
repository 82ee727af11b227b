"""Fixtures for the bridge's tests: the real ImageJ 1.x (Debian's libij-java) under a display
(xvfb-run -a), in this process (one JVM per process) and as ImageJ subprocesses with a timeout,
and `cellplug segment` on the same files as the reference.

Every model a test trains goes into a temporary model folder (CELLPLUG_MODELS, set before
cellplug is imported and inherited by the ImageJ and cellplug subprocesses).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
DATA = REPO / "tests" / "data"
NUCLEI = REPO / "examples" / "nuclei.tif"
FLUO = DATA / "dsb2018_fluo.tif"
FLUO_MASKS = DATA / "dsb2018_fluo_masks.tif"
BIN = Path(sys.executable).parent
IMAGEJ_TIMEOUT = 600  # s: an ImageJ macro error opens a modal dialog under Xvfb and waits

MODELS = Path(tempfile.mkdtemp(prefix="cellplug-fiji-models-"))
os.environ["CELLPLUG_MODELS"] = str(MODELS)
# `nox -s fiji` sets this: there a missing ImageJ or display is a failure, not a skip
REQUIRED = os.environ.get("CELLPLUG_FIJI_REQUIRE") == "1"


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(MODELS, ignore_errors=True)


def _missing(what: str) -> None:
    if REQUIRED:
        pytest.fail(what, pytrace=False)
    pytest.skip(what)


@pytest.fixture(scope="session")
def ij_jar() -> Path:
    from cellplug_fiji.jvm import find_ij_jar

    from cellplug.errors import CellplugError

    try:
        return find_ij_jar()
    except CellplugError as exc:
        _missing(str(exc))


@pytest.fixture(scope="session")
def display(ij_jar: Path) -> str:
    if not os.environ.get("DISPLAY"):
        _missing("ImageJ's GUI needs a display: run the tests under xvfb-run -a")
    return os.environ["DISPLAY"]


@pytest.fixture(scope="session")
def bridge(display: str):
    """ImageJ 1.x in this process with the Cellplug menu (one per test session)."""
    from cellplug_fiji import imagej1

    bridge = imagej1.start()
    yield bridge
    bridge.wait_idle(60)


@pytest.fixture
def ij(bridge):
    """The bridge, with no images, ROIs or recorder left from an earlier test."""
    from ij import IJ, WindowManager  # type: ignore
    from ij.plugin.frame import RoiManager  # type: ignore

    def clean() -> None:
        assert bridge.wait_idle(600), f"a command is still running: {bridge.running}"
        for image_id in list(WindowManager.getIDList() or []):
            imp = WindowManager.getImage(image_id)
            if imp is not None:
                imp.changes = False
                imp.close()
        manager = RoiManager.getInstance()
        if manager is not None:
            manager.reset()
        IJ.resetEscape()

    clean()
    yield bridge
    close_dialogs()
    clean()


def cellplug_cli(*args: object, check: bool = True) -> subprocess.CompletedProcess:
    """The real `cellplug` command of this environment."""
    proc = subprocess.run([str(BIN / "cellplug"), *map(str, args)], capture_output=True,
                          text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"cellplug {args} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


_reference_cache: dict[tuple, np.ndarray] = {}


def segment_reference(image: Path, tmp: Path, *options: object) -> np.ndarray:
    """`cellplug segment IMAGE OPTIONS`'s labels (the reference both ways must match)."""
    key = (str(image), *map(str, options))
    if key not in _reference_cache:
        out = tmp / f"reference-{len(_reference_cache)}"
        cellplug_cli("segment", image, "--out", out, "-q", *options)
        _reference_cache[key] = tifffile.imread(out / f"{image.stem}_masks.tif")
    return _reference_cache[key]


@pytest.fixture(scope="session")
def reference_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reference")


def run_imagej(ij_jar: Path, app: Path, macro: str, arg: str, tmp: Path,
               timeout: float = IMAGEJ_TIMEOUT, gui: bool = False) -> subprocess.CompletedProcess:
    """ImageJ 1.x in a subprocess: ``-batch`` runs ``macro`` with ``arg`` (``gui``: ``-macro``,
    with ImageJ's windows, which the macro must end with ``run("Quit")``); plugins come from
    ``app/plugins`` and java.io.tmpdir is ``tmp`` (so tests see every temporary file)."""
    script = tmp.parent / "driver.ijm"  # beside tmp: tmp must end empty
    script.write_text(macro, encoding="utf-8")
    cmd = ["java", f"-Dplugins.dir={app}", f"-Djava.io.tmpdir={tmp}", "-jar", str(ij_jar),
           "-macro" if gui else "-batch", str(script), arg]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"ImageJ did not finish in {timeout} s (a modal dialog?): "
                             f"{exc.stdout!r} {exc.stderr!r}") from None


# -- GUI helpers (in-process) ------------------------------------------------------------------
def find_window(title: str, timeout: float = 120.0, kind: str | None = None):
    """The visible AWT window called ``title`` (optionally of class ``kind``), waiting for it."""
    from java.awt import Window  # type: ignore

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for w in Window.getWindows():
            if not w.isShowing():
                continue
            if kind is not None and str(w.getClass().getSimpleName()) != kind:
                continue
            name = w.getTitle() if hasattr(w, "getTitle") else None
            if name is not None and str(name) == title:
                return w
        time.sleep(0.2)
    raise AssertionError(f"no window {title!r} appeared in {timeout} s")


def press_ok(dialog_title: str, fields: dict[int, str] | None = None) -> None:
    """Fill string fields (by index) of the GenericDialog ``dialog_title`` and click OK."""
    from java.awt.event import ActionEvent  # type: ignore

    gd = find_window(dialog_title)
    for index, text in (fields or {}).items():
        gd.getStringFields().get(index).setText(text)
    ok = gd.getButtons()[0]
    gd.actionPerformed(ActionEvent(ok, ActionEvent.ACTION_PERFORMED, "OK"))


def close_dialogs() -> None:
    """Dispose of message dialogs a failing test may have left open."""
    from java.awt import Window  # type: ignore

    for w in Window.getWindows():
        if w.isShowing() and str(w.getClass().getSimpleName()) in ("MessageDialog",
                                                                     "GenericDialog"):
            w.dispose()


def click(bridge, label: str) -> None:
    """Choose Plugins > Cellplug > ``label``: its ActionListener, as AWT calls it."""
    from java.awt.event import ActionEvent  # type: ignore

    item = bridge.item(label)
    event = ActionEvent(item, ActionEvent.ACTION_PERFORMED, label)
    for listener in item.getActionListeners():
        listener.actionPerformed(event)


def open_image(path: Path):
    from ij import IJ  # type: ignore

    imp = IJ.openImage(str(path))
    assert imp is not None, path
    imp.show()
    return imp


def roiset_of(labels: np.ndarray, path: Path) -> Path:
    """An ImageJ ROI set of ``labels`` written by the imagej-roi source (RoiSet.zip)."""
    from cellplug_sources.imagej_roi import write_roi_zip

    write_roi_zip(path, labels)
    return path
