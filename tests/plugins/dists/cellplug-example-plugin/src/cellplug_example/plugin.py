"""Hook implementations of the example plugin: one of several kinds, nothing more.

- style selector ``first-model``: picks the first candidate model for every image;
- annotation source ``example-npz``: ``*.npz`` files holding ``image`` and ``labels`` arrays;
- backbone ``example-tiny``: a two-layer convolutional net satisfying the backbone contract;
- reconstructor ``example-threshold``: connected components of ``cellprob > threshold``
  (no flows), for ``segment --reconstructor``;
- command ``example-hello``: ``cellplug example-hello NAME`` prints a greeting.
"""

from __future__ import annotations

from cellplug import hookimpl


def first_model(styles, models):
    """Style selector: the first candidate model, for every image."""
    if not models:
        raise ValueError("no candidate models")
    return [models[0].name] * len(styles)


class NpzSource:
    """Annotation source: a folder of ``.npz`` files with ``image`` and ``labels`` arrays."""

    def detect(self, location):
        return location.is_dir() and any(location.glob("*.npz"))

    def read(self, location):
        import numpy as np

        from cellplug.annotations import Annotation

        for f in sorted(location.glob("*.npz")):
            with np.load(f) as data:
                yield Annotation(data["image"], data["labels"], f.stem, str(f))


def build_tiny(n_channels: int = 2, n_outputs: int = 3, n_style: int = 8, **options):
    """A tiny backbone: (B, C, H, W) -> (raw (B, K, H, W), style (B, S))."""
    from .tiny import TinyNet

    return TinyNet(n_channels, n_outputs, n_style, **options)


def threshold_components(flows, cellprob, cellprob_threshold=0.0, min_size=0, **params):
    """Reconstructor: 4-connected components of ``cellprob > cellprob_threshold``."""
    import numpy as np
    from scipy import ndimage

    labels, _ = ndimage.label(np.asarray(cellprob) > cellprob_threshold)
    if min_size > 0:
        sizes = np.bincount(labels.ravel())
        keep = sizes >= min_size
        keep[0] = False
        lut = np.zeros(sizes.size, np.uint32)
        lut[keep] = np.arange(1, int(keep.sum()) + 1)
        return lut[labels]
    return labels.astype(np.uint32)


@hookimpl
def register_mask_reconstructors(register):
    register("example-threshold", threshold_components)


@hookimpl
def register_style_selectors(register):
    register("first-model", first_model)


@hookimpl
def register_annotation_sources(register):
    register("example-npz", NpzSource())


@hookimpl
def register_backbones(register):
    register("example-tiny", build_tiny)


@hookimpl
def register_commands(register):
    import click

    @click.command()
    @click.argument("name")
    def hello(name):
        """Say hello (a command added by a plugin)."""
        click.echo(f"hello {name} from cellplug-example-plugin")

    register("example-hello", hello)
