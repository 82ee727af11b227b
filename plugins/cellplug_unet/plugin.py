"""Registers the Cellpose-compatible style U-Net as the ``cellpose-unet`` backbone.

Registering imports nothing of torch: the factory below imports the network when it is
called, so listing plugins, and segmenting with a runtime backbone that serves these
weights from its own cache (``cellplug-openvino``), stay free of torch's import time.
"""

from typing import Any

from cellplug import hookimpl


def build_style_unet(n_channels: int = 2, n_outputs: int = 3, **options: Any) -> Any:
    """The ``cellpose-unet`` backbone: a :class:`cellplug_unet.network.StyleUNet`."""
    from .network import build_style_unet as build

    return build(n_channels=n_channels, n_outputs=n_outputs, **options)


def accepts_state_dict(state: Any) -> dict[str, Any] | None:
    """:func:`cellplug_unet.network.options_from_state_dict`."""
    from .network import options_from_state_dict

    return options_from_state_dict(state)


build_style_unet.accepts_state_dict = accepts_state_dict  # type: ignore[attr-defined]


@hookimpl
def register_backbones(register):
    register("cellpose-unet", build_style_unet)
