"""Pictures of results: outline overlays and flow colour maps (uint8 RGB arrays)."""

from __future__ import annotations

import numpy as np
from skimage.segmentation import find_boundaries


def to_display(image: np.ndarray, percentiles: tuple[float, float] = (1.0, 99.0)) -> np.ndarray:
    """Any (Y, X) or (Y, X, C) image -> uint8 (Y, X, 3) for display, percentile-stretched."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] == 2:
        img = np.concatenate([img, np.zeros_like(img[:, :, :1])], axis=2)
    elif img.shape[2] > 3:
        img = img[:, :, :3]
    out = np.empty_like(img)
    for c in range(img.shape[2]):
        lo, hi = np.percentile(img[:, :, c], percentiles)
        out[:, :, c] = np.clip((img[:, :, c] - lo) / (hi - lo), 0, 1) if hi > lo else 0
    if out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    return (out * 255).round().astype(np.uint8)


def outline_overlay(
    image: np.ndarray, labels: np.ndarray, color: tuple[int, int, int] = (255, 64, 64)
) -> np.ndarray:
    """The image with the outline of every object drawn in ``color``: uint8 (Y, X, 3)."""
    rgb = to_display(image)
    edges = find_boundaries(np.asarray(labels), mode="inner")
    rgb[edges] = color
    return rgb


def flow_to_rgb(flows: np.ndarray) -> np.ndarray:
    """Flow field (2, Y, X) -> uint8 (Y, X, 3): hue = direction, brightness = magnitude."""
    from skimage.color import hsv2rgb

    dy, dx = flows[0], flows[1]
    hue = (np.arctan2(dy, dx) + np.pi) / (2 * np.pi)
    mag = np.clip(np.sqrt(dy**2 + dx**2), 0, 1)
    hsv = np.stack([hue, np.ones_like(hue), mag], axis=-1)
    return (hsv2rgb(hsv) * 255).round().astype(np.uint8)
