"""Registers the Cellpose-compatible style U-Net as the ``cellpose-unet`` backbone."""

from cellplug import hookimpl


@hookimpl
def register_backbones(register):
    # imported here so that listing plugins does not import torch
    from .network import build_style_unet

    register("cellpose-unet", build_style_unet)
