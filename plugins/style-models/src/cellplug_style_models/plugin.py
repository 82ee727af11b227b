"""Registers the pack's models; their metadata's ``zoo`` block ties them to the generalist."""

from cellplug import hookimpl

from . import WEIGHTS_DIR


@hookimpl
def register_models(register):
    for weights in sorted(WEIGHTS_DIR.glob("*.pth")):
        register(weights.stem, weights)
