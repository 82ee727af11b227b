"""Figures of docs/flows.md: an image, its flows as colour, the reconstructed masks.

Run by ``nox -s docs`` before the site is built (and by hand: ``python
docs/scripts/flow_figures.py``). Uses the bundled sample image and model, float32, so the
pictures are the same on every machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "docs" / "figures"


def main() -> int:
    from cellplug import io, render
    from cellplug.segmenter import Segmenter

    image = io.read_image(REPO / "examples" / "nuclei.tif")
    seg = Segmenter.from_model("generalist")
    result = seg.segment(image, diameter=0, precision="fp32")
    # the flows a network learns are those of the labels: masks -> flows (the decoder's
    # training targets) beside the predicted ones
    decoder = seg.decoder
    target = decoder.targets(result.labels)
    rng = np.random.default_rng(0)
    colours = rng.integers(64, 256, (result.n_objects + 1, 3)).astype(np.uint8)
    colours[0] = 0
    pictures = {
        "flows_image.png": render.to_display(image),
        "flows_predicted.png": render.flow_to_rgb(result.flows),
        "flows_cellprob.png": render.to_display(1 / (1 + np.exp(-result.cellprob))),
        "flows_masks.png": colours[result.labels],
        "flows_overlay.png": render.outline_overlay(image, result.labels),
        "flows_targets.png": render.flow_to_rgb(target[1:3]),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    for name, rgb in pictures.items():
        io.write_png(OUT / name, rgb)
    print(f"{len(pictures)} figures in {OUT} ({result.n_objects} objects, diameter "
          f"{result.diameter:.1f} px)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
