"""Folders of images: resuming, read-ahead, per-object measurements, summary CSV, and the
images of a batch as dask tasks (local threads, or a ``dask.distributed`` cluster).

The unit of work is :func:`segment_file`: read one image, segment it, write all its outputs
(all or none, :func:`cellplug.io.atomic_paths`) and return its summary row. It runs in the
CLI's own loop (one worker: the next image is read while the current one is segmented) or
as a dask task (``workers > 1`` or a scheduler address): each worker process builds the
segmenter once (:func:`worker_segmenter`), and a task that is run again (a worker died)
rewrites the same files atomically, so retries are safe.
"""

from __future__ import annotations

import concurrent.futures
import csv
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CellplugError

MEASURE_PROPERTIES = ("label", "area", "centroid", "bbox", "eccentricity", "solidity",
                      "intensity_mean")
# seconds: segmenting (network and masks); network_seconds: its main network pass alone
SUMMARY_FIELDS = ("image", "status", "objects", "diameter", "seconds", "network_seconds",
                  "masks", "error")

_SEGMENTERS: dict[tuple[Any, ...], Any] = {}
_LOCK = threading.Lock()


def worker_segmenter(model_ref: str | None, selector: str | None = None,
                     threads: int | None = None, **plugins: Any) -> Any:
    """The CLI's segmenter for these settings, built once per process (a dask worker loads
    the model with its first task and keeps it for the next ones)."""
    key = (model_ref, selector, threads, repr(sorted(plugins.items())))
    with _LOCK:
        seg = _SEGMENTERS.get(key)
        if seg is None:
            from .cli import _segmenter

            seg = _SEGMENTERS[key] = _segmenter(model_ref, selector, threads, **plugins)
    return seg


def outputs_complete(targets: Sequence[tuple[str, Path]]) -> bool:
    """Whether every output of an image exists (outputs are written all or none, so an
    existing set is a finished one)."""
    return all(p.exists() for _, p in targets)


def measure(labels: np.ndarray, image: np.ndarray) -> dict[str, np.ndarray]:
    """Per-object measurements of ``labels`` (Y, X) integer on ``image`` (Y, X[, C]):
    area, centroid, bounding box, eccentricity, solidity and mean intensity (per channel),
    as columns (``skimage.measure.regionprops_table``)."""
    from skimage.measure import regionprops_table

    labels = np.asarray(labels)
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    return regionprops_table(labels.astype(np.int32, copy=False), image.astype(np.float32),
                             properties=MEASURE_PROPERTIES)


def write_table(path: Path, table: dict[str, np.ndarray]) -> None:
    """Write columns as CSV (``.csv``) or Parquet (``.parquet``, needs pyarrow)."""
    if path.suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise CellplugError("--measure parquet needs pyarrow (pip install pyarrow)") from None
        pq.write_table(pa.table({k: np.asarray(v) for k, v in table.items()}), path)
        return
    names = list(table)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(names)
        n = len(table[names[0]]) if names else 0
        for i in range(n):
            w.writerow([_cell(table[k][i]) for k in names])


def _cell(v: Any) -> Any:
    return round(float(v), 4) if isinstance(v, float | np.floating) else v


def write_summary_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """One row per image (``SUMMARY_FIELDS``), atomically."""
    from .io import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, SUMMARY_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "status": r.get("status") or ("error" if "error" in r else "ok")})


@dataclass
class FileJob:
    """Everything :func:`segment_file` needs, picklable (sent to dask workers)."""

    model_ref: str | None
    selector: str | None
    threads: int | None
    opts: Any
    axes: str | None
    save: tuple[str, ...]
    measure: str | None = None
    plugins: dict[str, Any] = field(default_factory=dict)
    stack: bool = False
    stitch_threshold: float = 0.0


def read_input(job: FileJob, path: Path) -> Any:
    """The image of ``path`` (Y, X[, C]), or with ``job.stack`` a (stack, leading axes)
    pair from :func:`cellplug.stacks.read_stack`."""
    from . import io

    if job.stack:
        from .stacks import read_stack

        return read_stack(path, axes=job.axes)
    return io.read_image(path, axes=job.axes)


def _segment_stack_file(job: FileJob, seg: Any, path: Path, targets: list[tuple[str, Path]],
                        stack: np.ndarray, lead: str) -> dict[str, Any]:
    from . import io
    from .selection import AutoSegmenter
    from .stacks import segment_stack

    if isinstance(seg, AutoSegmenter):
        raise CellplugError("--model auto is not available for stacks; give a model")
    if len(targets) > 1:
        raise CellplugError("--save and --measure are not available for stacks (only the "
                            "labels are written)")
    t0 = time.perf_counter()
    labels, diameter = segment_stack(seg, stack, lead, job.opts, job.stitch_threshold)
    seconds = time.perf_counter() - t0
    target = targets[0][1]
    try:
        io.write_tiff(target, labels.astype(io.labels_dtype(labels), copy=False),
                      lead + "YX")
    except OSError as exc:
        raise CellplugError(f"cannot write {target} ({exc.strerror or exc})") from None
    n = int(len(np.unique(labels)) - 1)
    return {"image": str(path), "masks": str(target), "objects": n,
            "diameter": round(diameter, 2), "seconds": round(seconds, 3), "axes": lead + "YX",
            "outputs": [str(target)]}


def segment_file(job: FileJob, path: Path, targets: list[tuple[str, Path]],
                 image: np.ndarray | None = None, segmenter: Any = None) -> dict[str, Any]:
    """Read (unless ``image`` is given), segment and write one image; the summary row
    (``error`` set when the image failed: a :class:`CellplugError`, one line).
    ``segmenter``: default, this process's :func:`worker_segmenter` for ``job``."""
    from . import cli

    try:
        seg = segmenter or worker_segmenter(job.model_ref, job.selector, job.threads,
                                            **job.plugins)
        if image is None:
            image = read_input(job, path)
        if job.stack:
            image, lead = image
            if lead:
                return _segment_stack_file(job, seg, path, targets, image, lead)
        t0 = time.perf_counter()
        result, choice = cli._segment_one(seg, image, job.opts)
        seconds = time.perf_counter() - t0
        writers = cli._source_writers(job.save)
        extra = {}
        if job.measure:
            extra["measure"] = lambda p: write_table(p, measure(result.labels, image))
        written = cli._write_outputs(targets, image, result, writers, path, job.opts, extra)
    except CellplugError as exc:
        return _error_row(path, exc)
    return {"image": str(path), "masks": str(written[0]), "objects": result.n_objects,
            "diameter": round(result.diameter, 2), "seconds": round(seconds, 3),
            "network_seconds": round(result.timings.get("network", float("nan")), 3),
            **({"choice": choice.to_dict()} if choice else {}),
            "outputs": [str(w) for w in written]}


def _error_row(path: Path, exc: BaseException) -> dict[str, Any]:
    """The summary row of a failed image: one line naming it, plus the traceback (shown by
    ``cellplug --debug``, not kept in summaries)."""
    import traceback

    from .cli import _one_line

    msg = _one_line(exc)
    return {"image": str(path), "error": msg if str(path) in msg else f"{path}: {msg}",
            "traceback": "".join(traceback.format_exception(exc))}


def read_ahead(paths: Sequence[Path], read: Callable[[Path], Any]
               ) -> Iterator[tuple[Path, Any, BaseException | None]]:
    """(path, image or None, error or None) in order, reading the next image in a thread
    while the caller works on the current one."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="read-ahead") as ex:
        futures = [ex.submit(read, p) for p in paths[:1]]
        for k, path in enumerate(paths):
            if k + 1 < len(paths):
                futures.append(ex.submit(read, paths[k + 1]))
            try:
                yield path, futures[k].result(), None
            except CellplugError as exc:
                yield path, None, exc
            futures[k] = None  # type: ignore[call-overload]  # let the image go


def run_files(job: FileJob, items: Sequence[tuple[Path, list[tuple[str, Path]]]],
              segmenter: Any, scheduler: str | None = None, workers: int = 1
              ) -> Iterator[dict[str, Any]]:
    """Summary rows of :func:`segment_file` for every (path, targets), as images finish.

    One worker and no scheduler: in this process with ``segmenter``, the next image read
    while the current one is segmented. Otherwise dask tasks (:func:`run_on_dask`), rows in
    the order images finish.
    """
    if not items:
        return
    if scheduler is None and workers <= 1:
        targets = dict(items)
        for path, image, error in read_ahead([p for p, _ in items],
                                             lambda p: read_input(job, p)):
            if error is not None:
                yield _error_row(path, error)
                continue
            yield segment_file(job, path, targets[path], image, segmenter)
        return
    import queue

    done: queue.Queue = queue.Queue()
    failure: list[BaseException] = []
    local_key = None
    if scheduler is None:  # threads of this process share the segmenter already built
        local_key = (job.model_ref, job.selector, job.threads, repr(sorted(job.plugins.items())))
        with _LOCK:
            _SEGMENTERS.setdefault(local_key, segmenter)

    def work() -> None:
        try:
            run_on_dask(job, items, scheduler, workers, done.put)
        except BaseException as exc:  # reported by the caller's thread
            failure.append(exc)
        finally:
            done.put(None)

    thread = threading.Thread(target=work, name="cellplug-dask", daemon=True)
    thread.start()
    while (row := done.get()) is not None:
        yield row
    thread.join()
    if failure:
        raise failure[0]


def run_on_dask(job: FileJob, items: Sequence[tuple[Path, list[tuple[str, Path]]]],
                scheduler: str | None, workers: int, on_done: Callable[[dict], None]) -> None:
    """Run :func:`segment_file` for every (path, targets) as dask tasks: on ``workers``
    local threads (``scheduler`` None), or on the ``dask.distributed`` scheduler at
    address ``scheduler``. ``on_done(row)`` is called as each image finishes."""
    from .blockwise import require_scale

    require_scale("dask", *(["distributed"] if scheduler else []))
    if scheduler:
        from distributed import Client, as_completed

        with Client(scheduler) as client:
            futs = [client.submit(segment_file, job, p, t, key=f"cellplug-{k}-{p.name}",
                                  pure=False)
                    for k, (p, t) in enumerate(items)]
            for fut in as_completed(futs):
                on_done(fut.result())
        return
    import dask
    from dask.callbacks import Callback

    tasks = [dask.delayed(segment_file)(job, p, t) for p, t in items]

    class _Done(Callback):
        def _posttask(self, key, result, dsk, state, worker_id):  # noqa: ANN001
            if isinstance(result, dict) and "image" in result:
                on_done(result)

    with _Done():
        dask.compute(*tasks, scheduler="threads", num_workers=workers)


def default_threads(workers: int) -> int:
    """Torch threads per worker so that ``workers`` share the machine's cores."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


LARGE_PIXELS = 4096 * 4096


def is_large_input(path: Path, block_size: int = 0) -> bool:
    """Whether ``path`` is segmented block-wise: a zarr folder, any image with
    ``block_size`` > 0, or a tiled TIFF (pyramidal and OME-TIFF included) of more than
    :data:`LARGE_PIXELS` pixels (from its header). A large TIFF in strips is read whole as
    before (within ``CELLPLUG_MAX_IMAGE_GIB``) unless ``--block-size`` is given."""
    from .lazy import is_zarr_path

    path = Path(path)
    if is_zarr_path(path) and path.is_dir():
        return True
    if path.suffix.lower() not in (".tif", ".tiff") or not path.is_file():
        return block_size > 0 and path.is_file()
    if block_size > 0:
        return True
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape, axes, tiled = series.shape, series.axes, series.keyframe.is_tiled
    except Exception:
        return False  # read_image reports it
    dims = dict(zip(axes, shape, strict=False))
    return tiled and dims.get("Y", 0) * dims.get("X", 0) > LARGE_PIXELS


def large_targets(path: Path, out_dir: Path | None, labels_format: str | None
                  ) -> tuple[str, Path]:
    """(format, target) of a block-wise image's labels: ``("tiff", <stem>_masks.tif)`` or
    ``("ome-zarr", container)`` (the input OME-Zarr itself when no ``out_dir``)."""
    from .lazy import is_zarr_path

    zarr_in = is_zarr_path(path)
    fmt = labels_format or ("ome-zarr" if zarr_in else "tiff")
    stem = path.name
    for suffix in (".ome.zarr", ".zarr", ".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    folder = out_dir or path.parent
    if fmt == "tiff":
        return fmt, folder / f"{stem}_masks.tif"
    if zarr_in and out_dir is None:
        return fmt, path
    return fmt, folder / f"{stem}.ome.zarr"


def large_done(fmt: str, target: Path) -> bool:
    if fmt == "tiff":
        return target.is_file()
    return (target / "labels" / "masks" / "0").exists()


def segment_large(job: FileJob, path: Path, out_dir: Path | None, segmenter: Any,
                  scale: dict[str, Any]) -> dict[str, Any]:
    """Segment one image block-wise (:func:`cellplug.blockwise.segment_blockwise`) and write
    its labels (tiled TIFF or OME-Zarr, all or none); the summary row."""
    from . import blockwise, lazy, ome_zarr

    fmt, target = large_targets(path, out_dir, scale.get("labels_format"))
    if scale.get("resume") and large_done(fmt, target):
        return {"image": str(path), "status": "skipped", "masks": str(target)}
    t0 = time.perf_counter()
    try:
        from .selection import AutoSegmenter

        if isinstance(segmenter, AutoSegmenter):
            raise CellplugError("--model auto is not available for block-wise segmentation; "
                                "give a model")
        if job.save or job.measure:
            raise CellplugError("--save and --measure are not available for block-wise "
                                "segmentation (only the labels are written)")
        image = lazy.open_image(path, axes=job.axes)
        block = scale.get("block_size") or blockwise.DEFAULT_BLOCK
        address = scale.get("dask_scheduler")
        model = job.model_ref if address else segmenter
        kwargs = {"block": block, "halo": scale.get("halo"),
                  "scheduler": address or "threads", "threads": job.threads,
                  "scratch_dir": target.parent if address else None}
        target.parent.mkdir(parents=True, exist_ok=True)
        result: list[Any] = []
        if fmt == "tiff":
            import tempfile

            with tempfile.TemporaryDirectory(prefix=".cellplug-", dir=target.parent) as tmp:
                res = blockwise.segment_blockwise(image, model, job.opts,
                                                  out=Path(tmp) / "labels.zarr", **kwargs)
                ome_zarr.write_tiled_tiff(target, res.labels, res.n_objects)
                result.append(res)
        else:
            def fill(arr: Any) -> None:
                result.append(blockwise.segment_blockwise(image, model, job.opts, out=arr,
                                                          **kwargs))

            ome_zarr.labels_into(target, image.shape[:2], block, fill, image=image)
    except CellplugError as exc:
        return _error_row(path, exc)
    except OSError as exc:
        return {"image": str(path), "error": f"{path}: cannot write {target} "
                                             f"({exc.strerror or exc})"}
    res = result[0]
    return {"image": str(path), "masks": str(target), "objects": res.n_objects,
            "diameter": round(res.diameter, 2), "seconds": round(time.perf_counter() - t0, 3),
            "blocks": len(res.layout.blocks()), "outputs": [str(target)]}


def run_large(job: FileJob, paths: Sequence[Path], out_dir: Path | None, segmenter: Any,
              scale: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Summary rows of :func:`segment_large` for ``paths``, one image after the other (the
    blocks of each run in parallel)."""
    for path in paths:
        yield segment_large(job, Path(path), out_dir, segmenter, scale)
