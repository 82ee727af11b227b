"""Running a backbone on one prepared image: tiled or whole, numpy in, numpy out.

This is the only place in the core where tensors meet arrays at inference time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import tiling


@dataclass(frozen=True)
class NetworkOutput:
    """raw: float32 (K, Y, X) network output; style: float32 (S,) L2-normalised."""

    raw: np.ndarray
    style: np.ndarray
    n_tiles: int


def forward_batches(net: Any, batch: np.ndarray, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Run ``net`` on float32 (N, C, H, W) in chunks of ``batch_size``.

    Returns raw float32 (N, K, H, W) and styles float32 (N, S).
    """
    import torch

    raws, styles = [], []
    with torch.inference_mode():
        for start in range(0, batch.shape[0], batch_size):
            x = torch.from_numpy(np.ascontiguousarray(batch[start : start + batch_size]))
            x = x.contiguous(memory_format=torch.channels_last)
            raw, style = net(x)
            raws.append(raw.float().contiguous().numpy())
            styles.append(style.float().numpy())
    return np.concatenate(raws), np.concatenate(styles)


def run_network(
    net: Any,
    image: np.ndarray,
    *,
    tile: bool = True,
    bsize: int = 224,
    tile_overlap: float = 0.1,
    batch_size: int = 8,
    augment: bool = False,
    vector_channels: tuple[int, int] = (0, 1),
) -> NetworkOutput:
    """Network output for one normalised, rescaled image.

    Parameters
    ----------
    net
        A backbone module in eval mode: (B, C, H, W) -> (raw (B, K, H, W), style (B, S)).
    image
        float32 (C, Y, X).
    tile
        Cut into ``bsize`` tiles overlapping by ``tile_overlap`` and blend them (Cellpose's
        default). ``False`` runs the whole padded image at once: faster on CPU, slightly
        different near tile seams, more memory.
    augment
        Test-time augmentation: half-overlapping tiles, alternately mirrored (implies tiles).
    vector_channels
        Raw channels holding the (Y, X) flow, sign-flipped when un-mirroring tiles.
    """
    padded, (sy, sx) = tiling.pad_image(np.asarray(image, dtype=np.float32))
    if not tile and not augment:
        raw, styles = forward_batches(net, padded[None], batch_size=1)
        return NetworkOutput(raw[0][:, sy, sx], styles[0], 1)
    grid = tiling.tile_grid(padded.shape[1], padded.shape[2], bsize, tile_overlap, augment)
    tiles = tiling.cut_tiles(padded, grid)
    raw, styles = forward_batches(net, tiles, batch_size=batch_size)
    raw = tiling.unflip_outputs(raw, grid, vector_channels)
    blended = tiling.blend_tiles(raw, grid)[:, : padded.shape[1], : padded.shape[2]]
    style = styles.sum(axis=0)
    style /= np.sqrt((style**2).sum())
    return NetworkOutput(blended[:, sy, sx], style.astype(np.float32), grid.n_tiles)
