"""A residual style U-Net with the parameter layout of Cellpose 2.x/3.x ``CPnet``.

Encoder: four residual blocks (channels ``nbase`` = 32, 64, 128, 256 by default), 2x2 max
pooling between them. Style: the deepest features, averaged over space and L2-normalised.
Decoder: residual blocks that add the skip connection and, through one linear layer each,
the style vector. Every convolution is pre-activated (batch norm, ReLU, conv).

Parameter names match Cellpose's ``.pth`` state dicts exactly, so its files load unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

BN_EPS = 1e-5
BN_MOMENTUM = 0.05


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


def _bn_relu_conv(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(_bn(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, cout, k, padding=k // 2))


def _bn_conv(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(_bn(cin), nn.Conv2d(cin, cout, k, padding=k // 2))


class ResDown(nn.Module):
    """Two residual pairs of convolutions; a 1x1 projection on the first shortcut.

    (B, cin, H, W) -> (B, cout, H, W).
    """

    def __init__(self, cin: int, cout: int, k: int) -> None:
        super().__init__()
        self.proj = _bn_conv(cin, cout, 1)
        self.conv = nn.Sequential()
        for t in range(4):
            self.conv.add_module(f"conv_{t}", _bn_relu_conv(cin if t == 0 else cout, cout, k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x) + self.conv[1](self.conv[0](x))
        return x + self.conv[3](self.conv[2](x))


class StyleConv(nn.Module):
    """Adds a (projected) style vector, and optionally a skip tensor, before a conv.

    style (B, n_style), x (B, cin, H, W), skip (B, cin, H, W) or None -> (B, cout, H, W).
    """

    def __init__(self, cin: int, cout: int, n_style: int, k: int) -> None:
        super().__init__()
        self.conv = _bn_relu_conv(cin, cout, k)
        self.full = nn.Linear(n_style, cout)

    def forward(
        self, style: torch.Tensor, x: torch.Tensor, skip: torch.Tensor | None = None
    ) -> torch.Tensor:
        if skip is not None:
            x = x + skip
        return self.conv(x + self.full(style)[:, :, None, None])


class ResUp(nn.Module):
    """Decoder block: x (B, cin, H, W), skip (B, cout, H, W), style (B, S) -> (B, cout, H, W)."""

    def __init__(self, cin: int, cout: int, n_style: int, k: int) -> None:
        super().__init__()
        self.conv = nn.Sequential()
        self.conv.add_module("conv_0", _bn_relu_conv(cin, cout, k))
        for t in range(1, 4):
            self.conv.add_module(f"conv_{t}", StyleConv(cout, cout, n_style, k))
        self.proj = _bn_conv(cin, cout, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        x = self.proj(x) + self.conv[1](style, self.conv[0](x), skip)
        return x + self.conv[3](style, self.conv[2](style, x))


class Encoder(nn.Module):
    """(B, nbase[0], H, W) -> features at 1, 1/2, 1/4, 1/8 resolution (nbase[1:] channels)."""

    def __init__(self, nbase: Sequence[int], k: int) -> None:
        super().__init__()
        self.down = nn.Sequential()
        for n in range(len(nbase) - 1):
            self.down.add_module(f"res_down_{n}", ResDown(nbase[n], nbase[n + 1], k))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for n, block in enumerate(self.down):
            x = block(x if n == 0 else F.max_pool2d(feats[-1], 2, 2))
            feats.append(x)
        return feats


class Decoder(nn.Module):
    """Style (B, S) and encoder features -> (B, nbaseup[0], H, W) at full resolution."""

    def __init__(self, nbaseup: Sequence[int], k: int) -> None:
        super().__init__()
        self.up = nn.Sequential()
        for n in range(1, len(nbaseup)):
            self.up.add_module(
                f"res_up_{n - 1}", ResUp(nbaseup[n], nbaseup[n - 1], nbaseup[-1], k)
            )

    def forward(self, style: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        x = self.up[-1](feats[-1], feats[-1], style)
        for n in range(len(self.up) - 2, -1, -1):
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            x = self.up[n](x, feats[n], style)
        return x


class StyleUNet(nn.Module):
    """The network: image batch (B, C, H, W) -> (raw (B, n_outputs, H, W), style (B, S)).

    ``H`` and ``W`` must be multiples of 8 (three poolings); the tiling code pads to 16.
    """

    def __init__(
        self,
        n_channels: int = 2,
        n_outputs: int = 3,
        nbase: Sequence[int] = (32, 64, 128, 256),
        kernel_size: int = 3,
        diam_mean: float = 30.0,
    ) -> None:
        super().__init__()
        widths = [int(n_channels), *[int(c) for c in nbase]]
        self.n_channels = int(n_channels)
        self.n_outputs = int(n_outputs)
        self.nbase = [int(c) for c in nbase]
        self.downsample = Encoder(widths, kernel_size)
        nbaseup = [*widths[1:], widths[-1]]
        self.upsample = Decoder(nbaseup, kernel_size)
        self.output = _bn_relu_conv(nbaseup[0], n_outputs, 1)
        # stored in the state dict, as Cellpose does: the diameter objects were rescaled to
        # in training, and the mean diameter of the training labels
        self.diam_mean = nn.Parameter(torch.full((1,), float(diam_mean)), requires_grad=False)
        self.diam_labels = nn.Parameter(torch.full((1,), float(diam_mean)), requires_grad=False)

    @staticmethod
    def make_style(deepest: torch.Tensor) -> torch.Tensor:
        style = deepest.mean(dim=(2, 3))
        return style / torch.sqrt((style**2).sum(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.downsample(x)
        style = self.make_style(feats[-1])
        return self.output(self.upsample(style, feats)), style


_FIRST_PROJ = "downsample.down.res_down_0.proj.1.weight"


def options_from_state_dict(state: Mapping[str, Any]) -> dict[str, Any] | None:
    """Constructor options that rebuild the network of a Cellpose-layout state dict.

    Returns ``None`` when ``state`` does not have this layout.
    """
    if _FIRST_PROJ not in state or "output.2.weight" not in state:
        return None
    nbase = []
    n = 0
    while f"downsample.down.res_down_{n}.proj.1.weight" in state:
        nbase.append(int(state[f"downsample.down.res_down_{n}.proj.1.weight"].shape[0]))
        n += 1
    k = int(state["downsample.down.res_down_0.conv.conv_0.2.weight"].shape[-1])
    opts: dict[str, Any] = {
        "n_channels": int(state[_FIRST_PROJ].shape[1]),
        "n_outputs": int(state["output.2.weight"].shape[0]),
        "nbase": nbase,
        "kernel_size": k,
    }
    if "diam_mean" in state:
        opts["diam_mean"] = float(state["diam_mean"].reshape(-1)[0])
    return opts


def build_style_unet(n_channels: int = 2, n_outputs: int = 3, **options: Any) -> StyleUNet:
    """Factory registered as the ``cellpose-unet`` backbone."""
    return StyleUNet(n_channels=n_channels, n_outputs=n_outputs, **options)


build_style_unet.accepts_state_dict = options_from_state_dict  # type: ignore[attr-defined]
