"""Input preparation and the network run (tiled and whole) against Cellpose 3.1.1.2.

Through the committed golden fixtures (``tests/data/golden/``, made by ``nox -s golden``);
no Cellpose needed.

- ``prepare_image`` (channels, percentile normalisation) gives bit for bit the float32
  input Cellpose's ``CellposeModel.eval`` feeds its network (sha256 of the bytes).
- ``run_network`` at scale 1, float32, against ``core.run_net``: tiled (224-px tiles with
  Cellpose's overlap and taper; ``usiigaci_crop`` needs two tiles, so the style is the
  normalised sum of two) and whole (one pass over the padded image), for the bundled
  generalist and the fixtures' random model. Raw outputs are stored in float16:
  ``1e-3 + 2^-11 |golden|`` (float16 rounding plus float32 noise; the two agree to ~2e-5);
  styles in float32: ``1e-5``.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from cellplug_testutils import load_data_module

from cellplug.inference import run_network
from cellplug.transforms import prepare_image

gs = load_data_module("golden/golden_support.py")
MANIFEST = gs.manifest()
RAW_ATOL = 1e-3
STYLE_ATOL = 1e-5



@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    return gs.load("network")


def test_fixtures_are_for_the_bundled_weights():
    """Regenerate the fixtures (``nox -s golden``) when the bundled model changes."""
    info = MANIFEST["models"]["generalist"]
    weights = gs.REPO / info["weights"]
    assert gs.file_sha256(weights) == info["weights_sha256"], "generalist.pth changed"
    meta = json.loads(weights.with_suffix(".json").read_text())
    assert gs.size_model_sha256(meta) == info["size_model_sha256"], "size model changed"


@pytest.mark.parametrize(
    "entry", MANIFEST["inputs"], ids=[f"{e['image']}-{e['channels']}" for e in MANIFEST["inputs"]]
)
def test_prepared_input_is_cellposes_bit_for_bit(entry):
    x = prepare_image(gs.image(entry["image"]), tuple(entry["channels"]), 2)
    assert x.dtype == np.float32 and x.shape == (2, *entry["shape"][:2])
    assert hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest() == (
        entry["normalized_sha256"]
    )


NET_CASES = MANIFEST["cases"]["network"]


@pytest.mark.parametrize("case", NET_CASES, ids=[c["key"] for c in NET_CASES])
def test_run_network_matches_cellpose(golden_segmenters, golden, case):
    key = case["key"]
    seg = golden_segmenters[case["model"]]
    tiled = case["mode"] == "tiled"
    out = run_network(seg.net, prepare_image(gs.image(case["image"])), tile=tiled,
                      precision="fp32")
    assert out.tiled == tiled and out.precision == "fp32"
    assert out.n_tiles == (2 if tiled else 1)  # tiled cases are the two-tile crop
    gs.assert_close(out.raw, golden[f"{key}/raw"], RAW_ATOL, f"{key} raw")
    gs.assert_close(out.style, golden[f"{key}/style"], STYLE_ATOL, f"{key} style")
