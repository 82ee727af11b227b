"""Fixtures: an empty user zoo per test, the plugin's dock widget in a napari viewer (napari's
``make_napari_viewer``; needs a display with OpenGL, e.g. ``xvfb-run -a pytest``), and
folders of real images (the README's nuclei image, the crops of tests/data)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
NUCLEI = REPO / "examples" / "nuclei.tif"
DATA = REPO / "tests" / "data"
PLUGIN = "cellplug-napari"
WIDGET = "Segment, correct, train"


@pytest.fixture(autouse=True)
def zoo(tmp_path, monkeypatch) -> Path:
    """An empty user model folder, and a fresh plugin registry, per test."""
    from cellplug.plugins import set_registry

    folder = tmp_path / "zoo"
    monkeypatch.setenv("CELLPLUG_MODELS", str(folder))
    set_registry(None)
    yield folder
    set_registry(None)


@pytest.fixture
def widget(make_napari_viewer):
    """The dock widget, added the way napari's Plugins menu adds it."""
    viewer = make_napari_viewer()
    _, w = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    return w


def wait_idle(qtbot, widget, timeout: float = 120) -> None:
    """Until the widget runs no job (and none chained after it)."""
    qtbot.waitUntil(lambda: widget.worker is None and not widget._remask_timer.isActive(),
                    timeout=int(timeout * 1000))


@pytest.fixture
def nuclei_folder(tmp_path) -> Path:
    """A folder holding the README's image, nuclei.tif (360 x 360)."""
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(NUCLEI, folder / "nuclei.tif")
    return folder


@pytest.fixture
def crops_folder(tmp_path) -> Path:
    """The small real images of tests/data (crops of dsb2018 and Usiigaci images, 128-256 px,
    10-41 objects each: fine-tuning needs 5 per image), without their labels."""
    folder = tmp_path / "crops"
    folder.mkdir()
    for name in ("dsb2018_bf", "dsb2018_fluo", "usiigaci_phc"):
        shutil.copy(DATA / f"{name}.tif", folder / f"{name}.tif")
    return folder
