"""Block-wise segmentation of images larger than memory, with results independent of where
the blocks fall.

The image (Y, X[, C]) is cut into a grid of *cores* of ``block`` x ``block`` pixels. Each
block is segmented on its core plus a *halo* (default four object diameters) with
:meth:`~cellplug.segmenter.Segmenter.segment_window` (network, flows, masks), so
an object near a core's edge is seen whole and with its context. The network output of a
block is computed on a tile grid fixed to the image's origin (:mod:`cellplug.aligned`,
``tile="grid"``), from exactly the source pixels a whole-image run would resample, so inside
a block it equals a whole-image ``tile="grid"`` run's, whatever the block's position. Then,
in three phases:

1. **blocks** (one task per block, in parallel): labels of the extended block; objects that
   touch an inner edge of the extended block (cut by it) are dropped; the others whose
   centroid lies within one diameter of the core are *candidates*, written to a scratch
   array (one chunk per block) with, per candidate, its area, centroid and a *score*: the
   distance from its centroid to the nearest inner edge of the extended block (image edges
   do not count), i.e. how much context the network had around it.
2. **overlaps** (one task per pair of neighbouring blocks): pixel counts of every pair of
   candidates of the two blocks that overlap in the shared halo.
3. **decide** (on the driver, a few numbers per object): candidates in decreasing score
   order; a candidate is kept unless kept candidates already cover half of its area. An
   object crossing a core boundary is found by both blocks: the version with more context
   wins, the other is dropped, so nothing is cut or doubled at a boundary. Kept objects are
   numbered 1..N in raster order of their centroids.
4. **write** (one task per output chunk = core): the kept candidates of the blocks whose
   extended region meets the core, painted in priority order (higher score wins a pixel),
   written into one chunk of the output array. Each chunk is written by exactly one task
   and a re-run task writes the same bytes, so a retried task (a worker that died) is safe.

Normalisation uses the whole image's percentiles, computed on the same regular subsample
:func:`cellplug.transforms.normalize_percentile` uses for a whole image, so a block sees the
intensities a whole-image run would. The diameter (when not given) is estimated once, with
the size model, on a central crop of at most :data:`DIAMETER_CROP` pixels.

Tasks run on dask: ``scheduler="threads"`` (default), ``"processes"``, ``"sync"``, or the
address of a ``dask.distributed`` scheduler (``"tcp://host:8786"``) or a
``distributed.Client``. Tasks carry the model's *reference* (name or path), and each worker
process builds the segmenter once (:func:`cached_segmenter`). Scratch data and the output
must be on a filesystem every worker sees.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CellplugError

DEFAULT_BLOCK = 2048
HALO_DIAMETERS = 4.0
MIN_HALO = 48
DIAMETER_CROP = 1024
COVER_FRACTION = 0.5
SCRATCH_FORMAT = 2  # zarr format of the scratch arrays


def require_scale(*modules: str) -> None:
    """Raise a one-line :class:`CellplugError` when the ``scale`` extra is missing."""
    import importlib.util

    missing = [m for m in modules or ("dask", "zarr") if importlib.util.find_spec(m) is None]
    if missing:
        raise CellplugError(f"this needs {', '.join(missing)}: pip install 'cellplug[scale]'")


# -- segmenters, loaded once per worker ----------------------------------------------------
_SEGMENTERS: dict[tuple[str | None, int | None], Any] = {}
_SEGMENTERS_LOCK = threading.Lock()


def cached_segmenter(model_ref: str | None, threads: int | None = None) -> Any:
    """The :class:`~cellplug.segmenter.Segmenter` of ``model_ref``, built once per process
    (a dask worker loads the model on its first task and keeps it)."""
    key = (model_ref, threads)
    with _SEGMENTERS_LOCK:
        seg = _SEGMENTERS.get(key) or _SEGMENTERS.get((model_ref, None))
        if seg is None:
            from .segmenter import Segmenter

            seg = _SEGMENTERS[key] = Segmenter.from_model(model_ref, threads=threads)
    return seg


def register_segmenter(segmenter: Any) -> str:
    """Make an already built segmenter available to tasks in this process under a key
    (for the threaded and synchronous schedulers); returns the key to pass as model."""
    key = f"<in-process segmenter {id(segmenter):x}>"
    with _SEGMENTERS_LOCK:
        _SEGMENTERS[(key, None)] = segmenter
    return key


# -- layout --------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockLayout:
    """A grid of ``block`` x ``block`` cores over an image of ``shape`` (Y, X), each
    extended by ``halo`` pixels on every side (clipped to the image)."""

    shape: tuple[int, int]
    block: int
    halo: int

    @property
    def grid(self) -> tuple[int, int]:
        return (math.ceil(self.shape[0] / self.block), math.ceil(self.shape[1] / self.block))

    def blocks(self) -> list[tuple[int, int]]:
        ny, nx = self.grid
        return [(i, j) for i in range(ny) for j in range(nx)]

    def core(self, i: int, j: int) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1) of block (i, j)'s core."""
        b = self.block
        return (i * b, min((i + 1) * b, self.shape[0]), j * b, min((j + 1) * b, self.shape[1]))

    def extended(self, i: int, j: int) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1) of block (i, j)'s core plus halo, clipped to the image."""
        y0, y1, x0, x1 = self.core(i, j)
        h = self.halo
        return (max(0, y0 - h), min(self.shape[0], y1 + h), max(0, x0 - h),
                min(self.shape[1], x1 + h))

    def neighbours(self, i: int, j: int) -> list[tuple[int, int]]:
        """Blocks whose extended region meets block (i, j)'s extended region (incl. itself)."""
        ny, nx = self.grid
        r = 1 + (2 * self.halo) // self.block
        return [(a, b) for a in range(max(0, i - r), min(ny, i + r + 1))
                for b in range(max(0, j - r), min(nx, j + r + 1))]


def _intersect(a: Sequence[int], b: Sequence[int]) -> tuple[int, int, int, int] | None:
    y0, y1 = max(a[0], b[0]), min(a[1], b[1])
    x0, x1 = max(a[2], b[2]), min(a[3], b[3])
    return (y0, y1, x0, x1) if y0 < y1 and x0 < x1 else None


# -- normalisation shared by all blocks ----------------------------------------------------
@dataclass(frozen=True)
class Normalisation:
    """Per network channel (lo, hi, constant) from the whole image, and ``invert``."""

    lo: tuple[float, ...]
    hi: tuple[float, ...]
    constant: tuple[bool, ...]
    invert: bool = False

    def apply(self, x: np.ndarray) -> np.ndarray:
        """float32 (C, Y, X) from :func:`~cellplug.transforms.select_channels` -> normalised,
        in place, exactly as :func:`~cellplug.transforms.normalize_percentile` does."""
        for c in range(x.shape[0]):
            if self.constant[c]:
                continue
            lo, hi = self.lo[c], self.hi[c]
            if hi - lo > 1e-3:
                x[c] -= np.float32(lo)
                x[c] /= np.float32(hi - lo)
            else:
                x[c] = 0
            if self.invert:
                x[c] = 1 - x[c]
        return x


def global_normalisation(
    image: Any, channels: Sequence[int], n_channels: int,
    percentiles: tuple[float, float] = (1.0, 99.0), invert: bool = False,
) -> Normalisation:
    """Percentiles of ``image`` (Y, X[, C], numpy / zarr / dask) on the regular subsample
    :func:`~cellplug.transforms.normalize_percentile` uses (every pixel up to 224³ pixels,
    else a step of size // 224 per axis); only the subsample is read."""
    from .transforms import select_channels

    ly, lx = int(image.shape[0]), int(image.shape[1])
    sy, sx = (1, 1) if ly * lx <= 224**3 else (max(1, ly // 224), max(1, lx // 224))
    sample = np.asarray(image[::sy, ::sx])
    x = select_channels(sample, channels, n_channels)
    lo, hi, const = [], [], []
    for c in range(x.shape[0]):
        const.append(bool(np.ptp(x[c]) == 0))
        p = np.percentile(x[c], list(percentiles))
        lo.append(float(p[0]))
        hi.append(float(p[1]))
    return Normalisation(tuple(lo), tuple(hi), tuple(const), invert)


# -- the job description sent to every task ------------------------------------------------
@dataclass
class BlockJob:
    """What every task needs: the image (picklable: numpy, zarr, dask or a
    :class:`cellplug.lazy.LazyImage`), the model reference, options and layout."""

    image: Any
    model: str | None
    threads: int | None
    opts: Any
    diameter: float
    layout: BlockLayout
    norm: Normalisation
    scratch: str
    margin: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Candidates:
    """Candidates of one block: local ids 1..n (in the scratch array); per candidate area
    (pixels), centroid (global y, x) and score (pixels of context)."""

    block: tuple[int, int]
    area: np.ndarray
    cy: np.ndarray
    cx: np.ndarray
    score: np.ndarray


def _scratch_array(job: BlockJob, i: int, j: int, create: bool = False) -> Any:
    import zarr

    path = os.path.join(job.scratch, f"b{i}_{j}")
    if create:
        y0, y1, x0, x1 = job.layout.extended(i, j)
        return zarr.open_array(path, mode="w", shape=(y1 - y0, x1 - x0),
                               chunks=(y1 - y0, x1 - x0), dtype=np.uint32,
                               zarr_format=SCRATCH_FORMAT)
    return zarr.open_array(path, mode="r")


def segment_block(job: BlockJob, i: int, j: int) -> Candidates:
    """Phase 1 for block (i, j): labels of the extended block, candidates written to the
    scratch array ``b{i}_{j}`` (uint32 (Ey, Ex), 0 elsewhere); returns their table."""
    from .transforms import select_channels

    seg = cached_segmenter(job.model, job.threads)
    lay = job.layout
    ey0, ey1, ex0, ex1 = lay.extended(i, j)
    cy0, cy1, cx0, cx1 = lay.core(i, j)

    def read(ys: slice, xs: slice) -> np.ndarray:  # normalised network input, as a whole run
        pixels = np.asarray(job.image[ys, xs])
        return job.norm.apply(select_channels(pixels, job.opts.channels, seg.model.n_channels))

    # the network output of a whole-image tile="grid" run, wherever the block falls
    labels = seg.segment_window(read, lay.shape, (ey0, ey1, ex0, ex1), job.opts,
                                job.diameter).labels
    n = int(labels.max()) if labels.size else 0
    # objects cut by an inner edge of the extended block are some other block's business
    cut = np.zeros(n + 1, bool)
    if ey0 > 0:
        cut[labels[0]] = True
    if ey1 < lay.shape[0]:
        cut[labels[-1]] = True
    if ex0 > 0:
        cut[labels[:, 0]] = True
    if ex1 < lay.shape[1]:
        cut[labels[:, -1]] = True
    flat = labels.ravel()
    area = np.bincount(flat, minlength=n + 1).astype(np.float64)
    yy, xx = np.divmod(np.arange(flat.size, dtype=np.int64), labels.shape[1])
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = np.bincount(flat, weights=yy, minlength=n + 1) / area + ey0
        cx = np.bincount(flat, weights=xx, minlength=n + 1) / area + ex0
    del yy, xx
    m = job.margin
    inside = ((cy >= cy0 - m) & (cy < cy1 + m) & (cx >= cx0 - m) & (cx < cx1 + m)
              & (area > 0) & ~cut)
    inside[0] = False
    inf = float("inf")
    score = np.minimum.reduce([
        cy - ey0 if ey0 > 0 else np.full_like(cy, inf),
        ey1 - cy if ey1 < lay.shape[0] else np.full_like(cy, inf),
        cx - ex0 if ex0 > 0 else np.full_like(cx, inf),
        ex1 - cx if ex1 < lay.shape[1] else np.full_like(cx, inf),
    ])
    ids = np.flatnonzero(inside)
    lut = np.zeros(n + 1, np.uint32)
    lut[ids] = np.arange(1, ids.size + 1, dtype=np.uint32)
    _scratch_array(job, i, j, create=True)[...] = lut[labels]
    return Candidates((i, j), area[ids], cy[ids], cx[ids], score[ids])


def block_overlaps(job: BlockJob, a: tuple[int, int], b: tuple[int, int]) -> np.ndarray:
    """Phase 2: int64 (P, 3) rows (local id in ``a``, local id in ``b``, shared pixels) for
    the candidates of blocks ``a`` and ``b`` that overlap."""
    lay = job.layout
    ea, eb = lay.extended(*a), lay.extended(*b)
    box = _intersect(ea, eb)
    if box is None:
        return np.zeros((0, 3), np.int64)
    y0, y1, x0, x1 = box
    la = np.asarray(_scratch_array(job, *a)[y0 - ea[0]:y1 - ea[0], x0 - ea[2]:x1 - ea[2]])
    lb = np.asarray(_scratch_array(job, *b)[y0 - eb[0]:y1 - eb[0], x0 - eb[2]:x1 - eb[2]])
    both = (la > 0) & (lb > 0)
    if not both.any():
        return np.zeros((0, 3), np.int64)
    key = la[both].astype(np.int64) << 32 | lb[both].astype(np.int64)
    keys, counts = np.unique(key, return_counts=True)
    return np.stack([keys >> 32, keys & 0xFFFFFFFF, counts], axis=1)


def decide(
    cands: list[Candidates], pairs: dict[tuple[int, int], np.ndarray],
    cover: float = COVER_FRACTION,
) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """Phase 3: which candidates stay, their global ids and painting priority.

    ``cands``: one :class:`Candidates` per block, in layout order; ``pairs``: (index of block
    a, index of block b) -> rows of :func:`block_overlaps`. Returns, per block, uint32 (n+1,)
    local id -> global id (0: dropped) and uint32 (n+1,) local id -> priority (0 is best;
    ``0xFFFFFFFF`` for dropped), and the number of objects kept.
    """
    offsets = np.cumsum([0] + [c.area.size for c in cands])
    total = int(offsets[-1])
    area = np.concatenate([c.area for c in cands]) if total else np.zeros(0)
    score = np.concatenate([c.score for c in cands]) if total else np.zeros(0)
    cy = np.concatenate([c.cy for c in cands]) if total else np.zeros(0)
    cx = np.concatenate([c.cx for c in cands]) if total else np.zeros(0)
    # neighbours in the overlap graph (global candidate index 0..total-1)
    src, dst, cnt = [], [], []
    for (ia, ib), rows in pairs.items():
        if rows.size:
            ga = offsets[ia] + rows[:, 0] - 1
            gb = offsets[ib] + rows[:, 1] - 1
            src += [ga, gb]
            dst += [gb, ga]
            cnt += [rows[:, 2], rows[:, 2]]
    if src:
        s, d, w = np.concatenate(src), np.concatenate(dst), np.concatenate(cnt)
        order_e = np.argsort(s, kind="stable")
        s, d, w = s[order_e], d[order_e], w[order_e]
        starts = np.searchsorted(s, np.arange(total + 1))
    else:
        d = w = np.zeros(0, np.int64)
        starts = np.zeros(total + 1, np.int64)
    # more context first; ties by position (independent of the block grid)
    order = np.lexsort((cx, cy, -score))
    kept = np.zeros(total, bool)
    for g in order:
        nb = d[starts[g]:starts[g + 1]]
        covered = w[starts[g]:starts[g + 1]][kept[nb]].sum() if nb.size else 0
        if covered < cover * area[g]:
            kept[g] = True
    rank = np.full(total, 0xFFFFFFFF, np.uint32)
    rank[order] = np.arange(total, dtype=np.uint32)
    gid = np.zeros(total, np.uint32)
    keep_idx = np.flatnonzero(kept)
    raster = keep_idx[np.lexsort((cx[keep_idx], cy[keep_idx]))]
    gid[raster] = np.arange(1, raster.size + 1, dtype=np.uint32)
    rank[~kept] = 0xFFFFFFFF
    luts, prios = [], []
    for k in range(len(cands)):
        sl = slice(offsets[k], offsets[k + 1])
        luts.append(np.concatenate([[0], gid[sl]]).astype(np.uint32))
        prios.append(np.concatenate([[0xFFFFFFFF], rank[sl]]).astype(np.uint32))
    return luts, prios, int(raster.size)


def paint_core(
    job: BlockJob, i: int, j: int, luts: dict[tuple[int, int], np.ndarray],
    prios: dict[tuple[int, int], np.ndarray],
) -> np.ndarray:
    """Phase 4: uint32 labels of block (i, j)'s core from the kept candidates around it."""
    lay = job.layout
    core = lay.core(i, j)
    out = np.zeros((core[1] - core[0], core[3] - core[2]), np.uint32)
    best = np.full(out.shape, 0xFFFFFFFF, np.uint32)
    for nb in lay.neighbours(i, j):
        ext = lay.extended(*nb)
        box = _intersect(core, ext)
        if box is None or luts[nb].size <= 1:
            continue
        y0, y1, x0, x1 = box
        local = np.asarray(_scratch_array(job, *nb)[y0 - ext[0]:y1 - ext[0],
                                                    x0 - ext[2]:x1 - ext[2]])
        ids, pr = luts[nb][local], prios[nb][local]
        win = (slice(y0 - core[0], y1 - core[0]), slice(x0 - core[2], x1 - core[2]))
        take = (ids > 0) & (pr < best[win])
        out[win][take] = ids[take]
        best[win][take] = pr[take]
    return out


def write_core(job: BlockJob, i: int, j: int, luts: dict, prios: dict, target: Any) -> int:
    """Paint block (i, j)'s core and write it into ``target`` (a zarr array (Y, X) uint32
    chunked by the block size, or a path to one); returns the core's pixel count."""
    if isinstance(target, str | os.PathLike):
        import zarr

        target = zarr.open_array(str(target), mode="r+")
    labels = paint_core(job, i, j, luts, prios)
    y0, y1, x0, x1 = job.layout.core(i, j)
    target[y0:y1, x0:x1] = labels
    return labels.size


# -- running it ----------------------------------------------------------------------------
@dataclass
class BlockwiseResult:
    """labels: the output (zarr array, or numpy (Y, X) uint32 when no output was given);
    n_objects; diameter (pixels); layout; n_candidates (objects seen by the blocks, counting
    each crossing object once per block that saw it)."""

    labels: Any
    n_objects: int
    diameter: float
    layout: BlockLayout
    n_candidates: int


def _is_local(scheduler: Any) -> bool:
    """Whether ``scheduler`` runs tasks in this process (threads or synchronously)."""
    return scheduler is None or scheduler in ("threads", "sync", "synchronous",
                                              "single-threaded")


def _compute(tasks: list[Any], scheduler: Any) -> list[Any]:
    import dask

    if not tasks:
        return []
    if scheduler is None or isinstance(scheduler, str) and scheduler in (
            "threads", "processes", "sync", "synchronous", "single-threaded"):
        return list(dask.compute(*tasks, scheduler=scheduler or "threads"))
    from distributed import Client

    if isinstance(scheduler, Client):
        return list(scheduler.gather(scheduler.compute(tasks)))
    with Client(scheduler) as client:
        return list(client.gather(client.compute(tasks)))


def estimate_diameter(segmenter: Any, image: Any, opts: Any, norm: Normalisation,
                      crop: int = DIAMETER_CROP) -> float:
    """The size model's diameter on the central ``crop`` x ``crop`` pixels of ``image``."""
    from .transforms import select_channels

    ly, lx = int(image.shape[0]), int(image.shape[1])
    y0, x0 = max(0, (ly - crop) // 2), max(0, (lx - crop) // 2)
    pixels = np.asarray(image[y0:y0 + crop, x0:x0 + crop])
    x = norm.apply(select_channels(pixels, opts.channels, segmenter.model.n_channels))
    diameter, _ = segmenter.size_and_style(x, opts)
    return float(diameter)


def segment_blockwise(
    image: Any,
    model: Any = None,
    opts: Any = None,
    *,
    block: int = DEFAULT_BLOCK,
    halo: int | None = None,
    out: Any = None,
    scheduler: Any = "threads",
    threads: int | None = None,
    scratch_dir: str | os.PathLike[str] | None = None,
) -> BlockwiseResult:
    """Segment ``image`` (Y, X) or (Y, X, C): numpy, zarr, dask or
    :class:`~cellplug.lazy.LazyImage`, read block by block) in blocks of ``block`` pixels.

    ``model``: a model name or path (each worker loads it once), or a built
    :class:`~cellplug.segmenter.Segmenter` (threaded / synchronous schedulers only).
    ``opts``: :class:`~cellplug.segmenter.SegmentOptions` (``diameter`` 0: estimated once on a
    central crop). ``halo``: pixels around each core (default ``HALO_DIAMETERS`` diameters,
    at least ``MIN_HALO``). ``out``: a zarr array (Y, X) uint32 whose chunks are multiples
    of the block... or a path where one is created; ``None`` returns a numpy array.
    ``scheduler``: ``"threads"``, ``"processes"``, ``"sync"``, a ``distributed`` scheduler
    address or ``Client``. Peak memory is a few extended blocks per worker, whatever the
    image's size.
    """
    from dataclasses import replace

    from .segmenter import Segmenter, SegmentOptions

    require_scale()
    # blocks always run the grid tiling (module doc): other tilings depend on the block
    opts = replace(opts or SegmentOptions(), tile="grid")
    if isinstance(model, Segmenter):
        if not _is_local(scheduler):
            raise CellplugError("a built Segmenter runs only on the threaded or synchronous "
                                "scheduler; pass the model's name or path for other workers")
        seg = model
        model_ref: str | None = register_segmenter(model)
    else:
        model_ref = None if model is None else str(model)
        seg = cached_segmenter(model_ref, threads)
    shape = (int(image.shape[0]), int(image.shape[1]))
    if len(image.shape) not in (2, 3) or min(shape) == 0:
        raise CellplugError(f"expected a non-empty image (Y, X) or (Y, X, C), got shape "
                            f"{tuple(image.shape)}")
    if block < 64:
        raise CellplugError(f"block size {block} is too small (at least 64 pixels)")
    norm = global_normalisation(image, opts.channels, seg.model.n_channels, opts.percentiles,
                                opts.invert)
    diameter = float(opts.diameter or 0)
    if diameter <= 0:
        diameter = estimate_diameter(seg, image, opts, norm)
    if halo is None:
        halo = max(MIN_HALO, int(math.ceil(HALO_DIAMETERS * diameter)))
    layout = BlockLayout(shape, int(block), int(halo))
    own_scratch = scratch_dir is None
    scratch = tempfile.mkdtemp(prefix="cellplug-blocks-", dir=None if own_scratch else
                               str(scratch_dir))
    try:
        job = BlockJob(image, model_ref, threads, opts, diameter, layout, norm, scratch,
                       margin=int(math.ceil(diameter)))
        return _run(job, out, scheduler)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run(job: BlockJob, out: Any, scheduler: Any) -> BlockwiseResult:
    import dask

    lay = job.layout
    blocks = lay.blocks()
    index = {b: k for k, b in enumerate(blocks)}
    local = _is_local(scheduler)
    # shared arguments as one graph key each (sent once per worker, not once per task)
    jd = job if local else dask.delayed(job, traverse=False)
    cands = _compute([dask.delayed(segment_block)(jd, *b) for b in blocks], scheduler)
    pair_keys = sorted({(index[a], index[b]) for a in blocks for b in lay.neighbours(*a)
                        if index[a] < index[b] and cands[index[a]].area.size
                        and cands[index[b]].area.size})
    rows = _compute([dask.delayed(block_overlaps)(jd, blocks[a], blocks[b])
                     for a, b in pair_keys], scheduler)
    luts_l, prios_l, n = decide(cands, dict(zip(pair_keys, rows, strict=True)))
    luts = {b: luts_l[k] for b, k in index.items()}
    prios = {b: prios_l[k] for b, k in index.items()}
    if out is None:
        labels = np.zeros(lay.shape, np.uint32)
        for b in blocks:
            y0, y1, x0, x1 = lay.core(*b)
            labels[y0:y1, x0:x1] = paint_core(job, *b, luts, prios)
        result: Any = labels
    else:
        target = out
        if isinstance(out, str | os.PathLike):
            target = create_labels_array(out, lay.shape, lay.block)
        where = str(target.store.root / target.path) if _is_local_zarr(target) else target
        ld, pd = ((luts, prios) if local else
                  (dask.delayed(luts, traverse=False), dask.delayed(prios, traverse=False)))
        _compute([dask.delayed(write_core)(jd, *b, ld, pd, where) for b in blocks], scheduler)
        result = target
    return BlockwiseResult(result, n, job.diameter, lay, sum(c.area.size for c in cands))


def _is_local_zarr(arr: Any) -> bool:
    root = getattr(getattr(arr, "store", None), "root", None)
    return isinstance(root, Path)


def create_labels_array(path: str | os.PathLike[str], shape: tuple[int, int], chunk: int,
                        zarr_format: int = 2) -> Any:
    """A new zarr array (Y, X) uint32 at ``path`` chunked ``chunk`` x ``chunk`` (replaced
    if it exists), with the NGFF label fill value 0."""
    import zarr

    return zarr.open_array(str(path), mode="w", shape=shape, chunks=(chunk, chunk),
                           dtype=np.uint32, fill_value=0, zarr_format=zarr_format,
                           **({"dimension_separator": "/"} if zarr_format == 2 else {}))
