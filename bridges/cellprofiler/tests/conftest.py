"""Fixtures for the bridge's tests: CellProfiler loaded headless with the plugin, workspaces,
and `cellplug segment` run on the same images as the reference.

CellProfiler's module list is process-global: the plugins folder must be set before
``cellprofiler_core.modules`` is first imported, and ``fill_modules()`` must not run again (it
drops the plugins). So this conftest installs the plugin file into a temporary folder and
imports CellProfiler's modules once, before any test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import tifffile

HERE = Path(__file__).resolve().parent
BRIDGE = HERE.parent
REPO = BRIDGE.parents[1]
DATA = REPO / "tests" / "data"
NUCLEI = REPO / "examples" / "nuclei.tif"
EXAMPLE_PIPELINE = BRIDGE / "examples" / "segment_nuclei.cppipe"
BIN = Path(sys.executable).parent
GRAY = {"nuclei": NUCLEI, "dsb2018_fluo": DATA / "dsb2018_fluo.tif",
        "dsb2018_bf": DATA / "dsb2018_bf.tif", "usiigaci_phc": DATA / "usiigaci_phc.tif"}

PLUGINS_DIR = Path(tempfile.mkdtemp(prefix="cellplug-cp-plugins-"))


def _load_cellprofiler() -> None:
    from cellplug_cellprofiler.plugin import install_plugin

    install_plugin(PLUGINS_DIR)
    import cellprofiler_core.preferences as prefs

    prefs.set_headless()
    prefs.set_plugin_directory(str(PLUGINS_DIR), globally=False)
    import cellprofiler_core.modules  # noqa: F401 - fills modules, loads the plugin


_load_cellprofiler()


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(PLUGINS_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def plugins_dir() -> Path:
    return PLUGINS_DIR


def cellplug_cli(*args: object, check: bool = True) -> subprocess.CompletedProcess:
    """The real `cellplug` command of this environment."""
    proc = subprocess.run([str(BIN / "cellplug"), *map(str, args)], capture_output=True,
                          text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"cellplug {args} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def segment_reference(images: dict[str, Path], out: Path, *options: object) -> dict[str, dict]:
    """`cellplug segment IMAGES --out OUT --json --save cellprob OPTIONS` -> per stem: labels,
    cellprob, objects and diameter."""
    proc = cellplug_cli("segment", *images.values(), "--out", out, "--json", "--save",
                        "cellprob", "-q", *options)
    doc = json.loads(proc.stdout)
    by_path = {e["image"]: e for e in doc["images"]}
    result = {}
    for name, path in images.items():
        entry = by_path[str(path)]
        result[name] = {
            "labels": tifffile.imread(entry["masks"]),
            "cellprob": tifffile.imread(out / f"{Path(path).stem}_cellprob.tif"),
            "objects": entry["objects"],
            "diameter": entry["diameter"],
        }
    return result


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cp")


@pytest.fixture(scope="session")
def extra_images(work) -> dict[str, Path]:
    """Images made from the real ones: the H&E crop's red and blue channels as a two-channel
    TIFF (cytoplasm, nuclei), and a 3 x 3 mosaic of the fluorescence crop (> 255 nuclei)."""
    he = tifffile.imread(DATA / "dsb2018_he.tif")
    folder = work / "made"
    folder.mkdir()
    two = folder / "he_two_channel.tif"
    tifffile.imwrite(two, np.stack([he[..., 0], he[..., 2]]), metadata={"axes": "CYX"})
    mosaic = folder / "fluo_mosaic.tif"
    tifffile.imwrite(mosaic, np.tile(tifffile.imread(DATA / "dsb2018_fluo.tif"), (3, 3)),
                     metadata={"axes": "YX"})
    return {"he_rgb": DATA / "dsb2018_he.tif", "he_two_channel": two, "fluo_mosaic": mosaic}


@pytest.fixture(scope="session")
def reference(work, extra_images) -> dict[str, dict]:
    """`cellplug segment` with default options on the grayscale, RGB and mosaic images."""
    images = {**GRAY, "he_rgb": extra_images["he_rgb"],
              "fluo_mosaic": extra_images["fluo_mosaic"]}
    return segment_reference(images, work / "ref_default")


# The bundled generalist was trained on single-channel images (empty nucleus channel): with
# a nuclei channel its flows fail the flow check, so the two-channel comparison runs with the
# check off and a given diameter. The point is that the two images reach the model as
# channels 1 and 2, exactly as `--channels 1 2` does.
TWO_CHANNEL_OPTIONS = {"flow_threshold": 0.0, "diameter": 20.0}


@pytest.fixture(scope="session")
def reference_two_channel(work, extra_images) -> dict:
    return segment_reference({"he": extra_images["he_two_channel"]}, work / "ref_2ch",
                             "--channels", 1, 2, "--flow-threshold", 0, "--diameter", 20)["he"]


# -- running the module -------------------------------------------------------------------
def cp_image(array: np.ndarray, **kwargs):
    """A CellProfiler Image as NamesAndTypes makes it from a file ("Image bit-depth": integers
    scaled to 0..1 by their type's range with CellProfiler's own function, scale recorded)."""
    from cellprofiler_core.image import Image
    from cellprofiler_core.image.abstract_image.file._file_image import FileImage

    data, scale = FileImage.normalize_to_float32(np.asarray(array), wants_inscale=True)
    return Image(data, convert=False, scale=scale, **kwargs)


def make_module(cls=None, **settings):
    """A RunCellplug (the package's class unless ``cls``), input "DNA", settings by name."""
    if cls is None:
        from cellplug_cellprofiler.module import RunCellplug as cls
    module = cls()
    module.set_module_num(1)
    module.x_name.value = "DNA"
    for name, value in settings.items():
        getattr(module, name).value = value
    return module


def run_module(module, images: dict[str, object], file_names: dict[str, str] | None = None):
    """Run ``module`` on one image set holding ``images`` (name -> array or Image); returns the
    workspace. ``file_names`` become FileName_<image> measurements, as NamesAndTypes sets."""
    from cellprofiler_core.image import Image, ImageSetList
    from cellprofiler_core.measurement import Measurements
    from cellprofiler_core.object import ObjectSet
    from cellprofiler_core.pipeline import Pipeline
    from cellprofiler_core.workspace import Workspace

    image_set_list = ImageSetList()
    image_set = image_set_list.get_image_set(0)
    for name, image in images.items():
        image_set.add(name, image if isinstance(image, Image) else cp_image(image))
    measurements = Measurements()
    for name, file_name in (file_names or {}).items():
        measurements.add_image_measurement(f"FileName_{name}", file_name)
    pipeline = Pipeline()
    pipeline.add_module(module)
    workspace = Workspace(pipeline, module, image_set, ObjectSet(), measurements,
                          image_set_list)
    module.run(workspace)
    return workspace


def cellprofiler_cmd() -> str:
    return str(BIN / "cellprofiler")


def env_without_display() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("DISPLAY", None)
    return env
