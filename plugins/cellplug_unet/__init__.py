"""Default backbone: a residual style U-Net with Cellpose's state-dict layout."""

from .network import StyleUNet, build_style_unet, options_from_state_dict

__all__ = ["StyleUNet", "build_style_unet", "options_from_state_dict"]
