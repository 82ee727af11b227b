"""The ``example-tiny`` backbone (torch is imported only when one is built)."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(
        self, n_channels: int = 2, n_outputs: int = 3, n_style: int = 8, diam_mean: float = 30.0
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(n_channels, n_style, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(n_style, n_outputs, 1)
        self.diam_mean = nn.Parameter(torch.full((1,), float(diam_mean)), requires_grad=False)
        self.diam_labels = nn.Parameter(torch.full((1,), float(diam_mean)), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        style = f.mean(dim=(2, 3))
        style = style / (style.norm(dim=1, keepdim=True) + 1e-8)
        return self.head(f), style
