"""Running a backbone on one prepared image: tiled or whole, numpy in, numpy out.

This is the only place in the core where tensors meet arrays at inference time.

Two ways to cover an image:

- **tiled** (``tile=True``): 224 x 224 tiles overlapping by 10 %, blended with a taper, as
  Cellpose 3 does; in float32 outputs match Cellpose's to float rounding for the same weights.
- **whole** (``tile=False``): one pass over the padded image. Every pixel is computed once
  (tiling computes ~60-70 % more pixels), no blending: ~1.7x less work. But it is *not* the
  same function: each tile computes its own style vector, which the decoder adds everywhere
  in that tile, while a whole-image pass uses one style for the image. Style-sensitive models
  (and images whose parts look different) give different masks; measured in
  ``benchmarks/bench_segment.py``.

``tile="auto"`` runs whole when the pass fits a memory budget and tiles otherwise.

Precision: ``"fp32"``, or ``"bf16"`` (bfloat16 autocast: convolutions in bfloat16, outputs
float32), ~1.5-2x faster on CPUs with native bfloat16 instructions (AVX512-BF16, AMX), with
masks that stay equal (AP@0.5 ~0.99 against float32). ``"auto"`` picks bf16 where the CPU
supports it natively.

Threads: ``import cellplug`` sets ``OMP_WAIT_POLICY=PASSIVE`` unless it is already set (it
only takes effect when torch is imported after cellplug). OpenMP threads that spin while
waiting for work (the default) collapse when the CPU is shared with other processes: on a
2-core machine also running a 2-thread job, the default tiled bf16 pass over a 1024² image
took 14.9 s with spinning threads and 7.1 s with passive ones (``bench_segment.py``).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from . import tiling
from .errors import CellplugError

TileMode = bool | Literal["auto"]
Precision = Literal["auto", "fp32", "bf16"]

# Peak resident memory added by one whole-image pass of the default backbone (nbase 32..256),
# per padded pixel, measured with torch 2.13 on CPU (inference mode, channels-last):
# ~1.3 KB in float32 and ~0.7 KB with bfloat16 autocast. Rounded up.
BYTES_PER_PIXEL = {"fp32": 1500, "bf16": 1000}
MAX_WHOLE_BYTES = 6 * 1024**3


@dataclass(frozen=True)
class NetworkOutput:
    """Network output for one image.

    raw: float32 (K, Y, X); style: float32 (S,) L2-normalised; n_tiles: network passes
    (1 for a whole-image pass); tiled: whether tiles were used; precision: "fp32" or "bf16".
    """

    raw: np.ndarray
    style: np.ndarray
    n_tiles: int
    tiled: bool = True
    precision: str = "fp32"


@functools.cache
def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.cache
def _torch_has_bf16() -> bool:
    import torch

    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def bf16_supported(net: Any = None) -> bool:
    """Whether this CPU runs bfloat16 convolutions natively (AVX512-BF16 or AMX).

    For a torch module (or no ``net``), torch's oneDNN must support them too. An array
    backbone (``net.takes_arrays``, see :func:`forward_batches`) runs its own engine, so
    only the CPU is asked and torch is not imported.
    """
    if not _cpu_has_bf16():
        return False
    return True if getattr(net, "takes_arrays", False) else _torch_has_bf16()


def resolve_precision(precision: str, net: Any = None) -> str:
    """``"auto"`` -> ``"bf16"`` where the CPU has native bfloat16 (for ``net``: see
    :func:`bf16_supported`), else ``"fp32"``; ``"fp32"`` and ``"bf16"`` are returned as given."""
    if precision == "auto":
        return "bf16" if bf16_supported(net) else "fp32"
    if precision not in ("fp32", "bf16"):
        raise CellplugError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    return precision


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def whole_image_bytes(ly: int, lx: int, precision: str = "fp32", width: int = 32) -> int:
    """Estimated peak memory (bytes) of a whole-image pass over an (ly, lx) image
    (unpadded size; ``width`` is the backbone's first feature width, 32 for Cellpose)."""
    t, b, left, r = tiling.pad_amounts(ly, lx)
    per_pixel = BYTES_PER_PIXEL.get(precision, BYTES_PER_PIXEL["fp32"]) * max(1, width) / 32
    return int((ly + t + b) * (lx + left + r) * per_pixel)


def choose_tiling(
    tile: TileMode, shape: tuple[int, int], precision: str = "fp32", width: int = 32,
    budget: int | None = None,
) -> bool:
    """Resolve ``tile`` for an image of ``shape`` (Y, X): True = tiles, False = whole.

    ``"auto"`` tiles only when the whole-image pass would need more than ``budget`` bytes
    (default: 40 % of the available memory, at most 6 GiB).
    """
    if tile is True or tile is False:
        return tile
    if tile != "auto":
        raise CellplugError(f"tile must be True, False or 'auto', got {tile!r}")
    if budget is None:
        avail = available_memory()
        budget = MAX_WHOLE_BYTES if avail is None else min(MAX_WHOLE_BYTES, int(0.4 * avail))
    return whole_image_bytes(shape[0], shape[1], precision, width) > budget


def _first_width(net: Any) -> int:
    nbase = getattr(net, "nbase", None)
    return int(nbase[0]) if nbase else 32


def forward_batches(
    net: Any, batch: np.ndarray, batch_size: int = 8, precision: str = "fp32"
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``net`` on float32 (N, C, H, W) in chunks of ``batch_size``.

    A torch module gets channels-last tensors under ``torch.inference_mode``, with
    ``precision="bf16"`` under bfloat16 autocast. An *array backbone* (``net.takes_arrays``
    true, e.g. ``cellplug-openvino`` loaded from its cache) is called as ``net(x,
    precision)`` with float32 numpy arrays and returns numpy ``(raw, style)``; torch is not
    imported for it, and its own ``batch_size`` attribute, when larger, sets the chunks.
    Returns raw float32 (N, K, H, W) and styles float32 (N, S).
    """
    if getattr(net, "takes_arrays", False):
        return _forward_arrays(net, batch, batch_size, precision)
    import torch

    raws, styles = [], []
    bf16 = precision == "bf16"
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, batch.shape[0], batch_size):
            x = torch.from_numpy(np.ascontiguousarray(batch[start : start + batch_size]))
            x = x.contiguous(memory_format=torch.channels_last)
            raw, style = net(x)
            raws.append(raw.float().contiguous().numpy())
            style = style.float()
            if bf16:  # normalised in bfloat16 inside the net; renormalise in float32
                style = style / torch.sqrt((style**2).sum(dim=1, keepdim=True))
            styles.append(style.numpy())
    return np.concatenate(raws), np.concatenate(styles)


def _forward_arrays(
    net: Any, batch: np.ndarray, batch_size: int, precision: str
) -> tuple[np.ndarray, np.ndarray]:
    # an engine that spreads a batch over its own streams waits for its slowest stream at the
    # end of every call: it may ask for bigger chunks (fewer waits) with ``batch_size``
    batch_size = max(batch_size, int(getattr(net, "batch_size", 0) or 0))
    raws, styles = [], []
    for start in range(0, batch.shape[0], batch_size):
        x = np.ascontiguousarray(batch[start : start + batch_size], dtype=np.float32)
        raw, style = net(x, precision)
        raws.append(np.asarray(raw, np.float32))
        style = np.asarray(style, np.float32)
        if precision == "bf16":  # as for torch: renormalise the style in float32
            style = style / np.sqrt((style**2).sum(axis=1, keepdims=True))
        styles.append(style)
    return np.concatenate(raws), np.concatenate(styles)


def pooled_style(styles: np.ndarray) -> np.ndarray:
    """The style of a tiled pass: the tiles' styles (float32 (N, S)) summed, L2-normalised."""
    style = styles.sum(axis=0)
    style /= np.sqrt((style**2).sum())
    return style.astype(np.float32)


def run_network(
    net: Any,
    image: np.ndarray,
    *,
    tile: TileMode = True,
    bsize: int = 224,
    tile_overlap: float = 0.1,
    batch_size: int = 8,
    augment: bool = False,
    vector_channels: tuple[int, int] = (0, 1),
    precision: Precision = "fp32",
    memory_budget: int | None = None,
) -> NetworkOutput:
    """Network output for one normalised, rescaled image.

    Parameters
    ----------
    net
        A backbone module in eval mode: (B, C, H, W) -> (raw (B, K, H, W), style (B, S)).
    image
        float32 (C, Y, X).
    tile
        ``True``: cut into ``bsize`` tiles overlapping by ``tile_overlap`` and blend them
        (Cellpose's way). ``False``: the whole padded image at once (faster on CPU, more
        memory, slightly different near tile seams). ``"auto"``: whole if it fits
        ``memory_budget`` (see :func:`choose_tiling`), else tiles.
    augment
        Test-time augmentation: half-overlapping tiles, alternately mirrored (implies tiles).
    vector_channels
        Raw channels holding the (Y, X) flow, sign-flipped when un-mirroring tiles.
    precision
        ``"fp32"``, ``"bf16"`` (bfloat16 autocast) or ``"auto"`` (see :func:`resolve_precision`).

    Returns
    -------
    NetworkOutput
        raw float32 (K, Y, X) at the size of ``image``, style float32 (S,).
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise CellplugError(f"network input must be (C, Y, X), got shape {image.shape}")
    precision = resolve_precision(precision, net)  # type: ignore[assignment]
    width = _first_width(net)
    tiled = augment or choose_tiling(tile, image.shape[1:], precision, width, memory_budget)
    padded, (sy, sx) = tiling.pad_image(image)
    if not tiled:
        raw, styles = forward_batches(net, padded[None], batch_size=1, precision=precision)
        return NetworkOutput(raw[0][:, sy, sx], styles[0], 1, False, precision)
    grid = tiling.tile_grid(padded.shape[1], padded.shape[2], bsize, tile_overlap, augment)
    tiles = tiling.cut_tiles(padded, grid)
    raw, styles = forward_batches(net, tiles, batch_size=batch_size, precision=precision)
    raw = tiling.unflip_outputs(raw, grid, vector_channels)
    blended = tiling.blend_tiles(raw, grid)[:, : padded.shape[1], : padded.shape[2]]
    return NetworkOutput(blended[:, sy, sx], pooled_style(styles), grid.n_tiles, True, precision)
