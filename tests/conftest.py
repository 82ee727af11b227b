"""Shared fixtures: paths to the small real test images and a tiny random-weight model."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"


def load_data_module(relative: str):
    """Import a helper script kept under tests/data (not a package), once per session."""
    import importlib.util

    name = "cellplug_tests_" + relative.replace("/", "_").removesuffix(".py")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, DATA / relative)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


# label ids where dtypes and lookup tables change (property tests)
EDGE_IDS = [1, 2, 255, 256, 65535, 65536, 70000, 2**31 - 1, 2**32 - 1, 2**40]


def ids_for(dtype):
    """hypothesis strategy: label ids that fit ``dtype``, small, at the edges, or anywhere."""
    from hypothesis import strategies as st

    top = int(np.iinfo(dtype).max)
    return st.one_of(
        st.integers(1, min(top, 20)),
        st.sampled_from([i for i in EDGE_IDS if i <= top]),
        st.integers(1, top),
    )


# test modules (imported with --import-mode=importlib, so they cannot import conftest by name)
# reach the helper above as ``from cellplug_testutils import load_data_module``
sys.modules.setdefault("cellplug_testutils", sys.modules[__name__])


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def fluo_pair() -> tuple[np.ndarray, np.ndarray]:
    """dsb2018 fluorescence crop (160, 160) uint8 and its labels (160, 160) uint16."""
    import tifffile

    return tifffile.imread(DATA / "dsb2018_fluo.tif"), tifffile.imread(
        DATA / "dsb2018_fluo_masks.tif"
    )


@pytest.fixture(scope="session")
def random_model(tmp_path_factory) -> Path:
    """A Cellpose-layout model with random weights (seed 0), diam_mean 17, plus metadata.

    It segments nothing meaningful, but exercises every step end to end.
    """
    import torch

    from cellplug.models import save_model
    from cellplug.plugins import get_registry

    torch.manual_seed(0)
    net = get_registry().get("backbone", "cellpose-unet")(n_channels=2, n_outputs=3, diam_mean=17.0)
    path = tmp_path_factory.mktemp("models") / "random.pth"
    save_model(path, net.eval(), {"name": "random", "diam_mean": 17.0, "diam_labels": 17.0})
    return path


@pytest.fixture(scope="session")
def random_cellpose_file(tmp_path_factory) -> Path:
    """The same kind of network saved as a bare Cellpose state dict (no JSON metadata)."""
    import torch

    from cellplug.plugins import get_registry

    torch.manual_seed(1)
    net = get_registry().get("backbone", "cellpose-unet")(n_channels=2, n_outputs=3, diam_mean=30.0)
    path = tmp_path_factory.mktemp("cellpose") / "cellpose_random"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def golden_segmenters(tmp_path_factory):
    """The golden fixtures' two models (tests/data/golden): the bundled generalist, by path so
    a renamed default cannot change what is compared, and the seeded random CPnet saved as a
    bare Cellpose file."""
    import torch

    from cellplug.plugins import get_registry
    from cellplug.segmenter import Segmenter

    gs = load_data_module("golden/golden_support.py")
    weights = gs.REPO / gs.manifest()["models"]["generalist"]["weights"]
    template = get_registry().get("backbone", "cellpose-unet")().state_dict()
    random_path = tmp_path_factory.mktemp("golden_models") / "random_cpnet"
    torch.save(gs.random_model_torch_state(template), random_path)
    return {
        "generalist": Segmenter.from_model(str(weights)),
        "random": Segmenter.from_model(str(random_path)),
    }


@pytest.fixture
def user_models(tmp_path, monkeypatch) -> Path:
    """An empty user model folder (``$CELLPLUG_MODELS``, not created) and a fresh plugin
    registry before and after the test; modules make it autouse under their own name."""
    from cellplug.plugins import set_registry

    folder = tmp_path / "zoo"
    monkeypatch.setenv("CELLPLUG_MODELS", str(folder))
    set_registry(None)
    yield folder
    set_registry(None)

