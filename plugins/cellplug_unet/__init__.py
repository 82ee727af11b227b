"""Default backbone: a residual style U-Net with Cellpose's state-dict layout.

The names below are imported on first use: importing the package (as the plugin manager
does) does not import torch.
"""

from typing import Any

__all__ = ["StyleUNet", "build_style_unet", "options_from_state_dict"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import network

        return getattr(network, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
