"""Registers every bundled model whose weights file is present."""

from cellplug import hookimpl

from . import WEIGHTS_DIR


@hookimpl
def register_models(register):
    for weights in sorted(WEIGHTS_DIR.glob("*.pth")):
        register(weights.stem, weights)
