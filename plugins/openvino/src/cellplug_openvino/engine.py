"""The torch-free half of the OpenVINO backbone: the on-disk cache, compiled models, and the
array backbone that runs a cached model without importing torch.

A process that segments with ``--backbone openvino`` spends more time starting than
segmenting a small image: importing torch alone takes 2.5-4 s on a 2-core machine. Once a
weights file has been exported, nothing of torch is needed any more: the exported model runs
in OpenVINO, and what the core learnt from the weights when it first loaded them (the input
channels, the diameters stored in a Cellpose state dict, the feature widths) is recorded
beside the export. :func:`load_cached` finds that record by the weights *file's* sha256 and
returns an :class:`ArrayNet` (numpy in, numpy out), so the core never imports torch. A miss
(new weights, another OpenVINO, a damaged entry) returns None: the core then loads the
weights with torch, :mod:`cellplug_openvino.runtime` exports them, and the record is written
for the next process.

Cache layout, under ``cache_dir`` (default ``$CELLPLUG_CACHE/openvino`` or
``~/.cache/cellplug/openvino``):

- ``<sha256>/model.xml``, ``model.bin``, ``entry.json``: the exported model, one folder per
  weights (the key hashes every tensor of the state dict, see
  :func:`cellplug_openvino.runtime.weights_sha256`, plus the base backbone's name).
- ``<sha256>/int8-<key>/``: an int8 model quantised from it (see :func:`int8_settings`).
- ``files/<sha256>.json``: which entry a weights file (its bytes, base backbone and base
  options) loads to, and the facts the core took from it.
- ``compiled/``: OpenVINO's own cache of compiled models (``CACHE_DIR``).

Models are compiled with dynamic shapes: one compilation serves the 224 px tiles, the last
partial batch and the probe input (a static compilation per shape cost 0.3-0.6 s each).
See :class:`Engine` for how a batch is spread over threads.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ENTRY_FILES = ("model.xml", "model.bin")
PRECISIONS = ("auto", "f32", "bf16", "int8")
RUNTIME_OPTIONS = ("precision", "threads", "cache_dir", "calibration")
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
CALIBRATION_TILES = 300  # NNCF's default subset size
CALIBRATION_TILE = 224


class StaleCacheWarning(UserWarning):
    """An exported model on disk did not match its weights or files; it was rebuilt."""


def default_cache_dir() -> Path:
    """``$CELLPLUG_CACHE/openvino``, else ``~/.cache/cellplug/openvino``."""
    root = os.environ.get("CELLPLUG_CACHE") or Path.home() / ".cache" / "cellplug"
    return Path(root) / "openvino"


def default_threads() -> int:
    """The CPUs this process may run on (torch's default on a machine without SMT)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def files_sha256(folder: Path) -> dict[str, str]:
    return {name: file_sha256(folder / name) for name in ENTRY_FILES}


def files_problem(folder: Path, recorded: dict[str, str]) -> str | None:
    """Why the model files in ``folder`` do not match their ``recorded`` sha256, or None."""
    for name in ENTRY_FILES:
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if file_sha256(path) != recorded.get(name):
            return f"{name} does not match its recorded sha256"
    return None


def publish(tmp: Path, final: Path) -> None:
    """Put the finished folder ``tmp`` in place of ``final`` (rename: never half-written)."""
    old = final.parent / f".old-{final.name}-{os.getpid()}"
    if final.exists():
        final.rename(old)
    try:
        tmp.rename(final)
    except OSError:  # another process put a fresh entry there first: use that one
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def ov() -> Any:
    from .telemetry import import_openvino  # without OpenVINO's usage telemetry

    return import_openvino()


@functools.cache
def core(compiled_dir: str) -> Any:
    c = ov().Core()
    c.set_property({"CACHE_DIR": compiled_dir})
    return c


def entry_problem(folder: Path, key: str, base: str) -> str | None:
    """Why the exported entry in ``folder`` cannot be used for weights ``key`` of backbone
    ``base``, or None when it can."""
    try:
        entry = json.loads((folder / "entry.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"unreadable entry.json ({type(exc).__name__})"
    expected = {"weights_sha256": key, "base": base, "openvino": ov().__version__}
    for field, value in expected.items():
        if entry.get(field) != value:
            return f"{field} is {entry.get(field)!r}, expected {value!r}"
    return files_problem(folder, entry.get("files", {}))


# -- int8 ------------------------------------------------------------------------------------
def calibration_files(where: str | os.PathLike[str]) -> list[Path]:
    """The images of ``where`` (an image file, or a folder's images; label images such as
    ``*_masks.tif`` left out), sorted by name."""
    path = Path(where)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ValueError(f"calibration {str(path)!r}: no such file or folder")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                   and not any(t in p.stem.lower() for t in ("_mask", "_label", "_flow")))
    if not files:
        raise ValueError(f"calibration {str(path)!r}: no images in it")
    return files


def int8_settings(files: list[Path]) -> tuple[str, dict[str, Any]]:
    """The int8 entry's key and settings for calibration images ``files``: the files'
    sha256, the quantisation settings and the NNCF version (read from its metadata, so
    that finding a cached int8 model imports neither NNCF nor torch)."""
    settings = {"tiles": CALIBRATION_TILES, "tile": CALIBRATION_TILE, "preset": "mixed",
                "fast_bias_correction": True, "nncf": importlib.metadata.version("nncf"),
                "files": [[p.name, file_sha256(p)] for p in files]}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16], settings


def int8_ok(folder: Path, key: str) -> bool:
    try:
        entry = json.loads((folder / "entry.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return entry.get("key") == key and files_problem(
        folder, entry.get("files_sha256", {})) is None


def calibration_tiles(files: list[Path], n_channels: int, n: int = CALIBRATION_TILES,
                      seed: int = 0) -> np.ndarray:
    """float32 (N, C, 224, 224): network inputs as the segmenter makes them (normalised,
    Cellpose's 224 px tiles), ``n`` of them drawn evenly over ``files`` with ``seed``."""
    from cellplug import tiling
    from cellplug.io import read_image
    from cellplug.transforms import prepare_image

    tiles = []
    for path in files:
        x = prepare_image(read_image(path), (0, 0), n_channels)
        padded, _ = tiling.pad_image(x)
        grid = tiling.tile_grid(padded.shape[1], padded.shape[2], CALIBRATION_TILE, 0.1)
        cut = tiling.cut_tiles(padded, grid)
        if cut.shape[2:] == (CALIBRATION_TILE, CALIBRATION_TILE):
            tiles.append(cut)
    if not tiles:
        raise ValueError(f"calibration: no image of at least {CALIBRATION_TILE} px a side")
    every = np.concatenate(tiles)
    pick = np.random.default_rng(seed).permutation(len(every))[:n]
    return np.ascontiguousarray(every[np.sort(pick)])


# -- compiled models -------------------------------------------------------------------------
class Engine:
    """The compiled models of one exported model file.

    A batch of several images (Cellpose's tiles) runs one image per request on as many
    single-thread OpenVINO *streams* as there are threads: on 2 cores that is about 6 %
    faster per 224 px tile than one 2-thread request on the whole batch (median 0.263 s
    against 0.280 s, AVX2 Zen 3), and an image's output does not depend on its batch. A
    single image (a whole-image pass, a last lone tile) runs as one request on all threads.

    Calls are serialised (a lock): the requests and their queue are shared, and segmenter
    threads (``--workers``, block-wise dask threads) may call one engine at once; each call
    already uses every thread it was given.
    """

    def __init__(self, xml: Path, compiled_dir: Path) -> None:
        self.xml = Path(xml)
        self.compiled_dir = Path(compiled_dir)
        self._compiled: dict[tuple[str, int, bool], Any] = {}
        self._queues: dict[tuple[str, int, bool], Any] = {}
        self._lock = threading.Lock()
        self.compile_seconds = 0.0

    def compiled(self, precision: str, threads: int, streams: bool = False) -> Any:
        key = (precision, int(threads), streams)
        if key not in self._compiled:
            t0 = time.perf_counter()
            config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision,
                                      "INFERENCE_NUM_THREADS": int(threads)}
            if streams:
                config.update(PERFORMANCE_HINT="THROUGHPUT", NUM_STREAMS=int(threads))
            else:
                config.update(PERFORMANCE_HINT="LATENCY")
            # from the file: OpenVINO's cache then finds the blob without reading the model
            self._compiled[key] = core(str(self.compiled_dir)).compile_model(
                str(self.xml), "CPU", config)
            self.compile_seconds += time.perf_counter() - t0
        return self._compiled[key]

    def run(self, x: np.ndarray, precision: str, threads: int) -> tuple[np.ndarray, ...]:
        """float32 (B, C, H, W) -> the model's outputs as float32 arrays."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        with self._lock:
            if x.shape[0] > 1 and threads > 1:
                return self._run_streams(x, precision, threads)
            compiled = self.compiled(precision, threads)
            result = compiled(x)
            return tuple(np.array(result[out], np.float32) for out in compiled.outputs)

    def _run_streams(self, x: np.ndarray, precision: str, threads: int) -> tuple[np.ndarray, ...]:
        key = (precision, int(threads), True)
        compiled = self.compiled(precision, threads, streams=True)
        if key not in self._queues:
            self._queues[key] = ov().AsyncInferQueue(compiled, int(threads))
        queue = self._queues[key]
        results: list[tuple[np.ndarray, ...] | None] = [None] * x.shape[0]

        def done(request: Any, i: int) -> None:
            results[i] = tuple(np.array(request.get_output_tensor(k).data, np.float32)
                               for k in range(len(compiled.outputs)))

        queue.set_callback(done)
        for i in range(x.shape[0]):
            queue.start_async({0: x[i : i + 1]}, userdata=i)
        queue.wait_all()
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:  # a shorter batch would put the other tiles' outputs in the wrong places
            raise RuntimeError(f"OpenVINO returned no output for image(s) {missing} of a "
                               f"batch of {x.shape[0]}")
        return tuple(np.concatenate([r[k] for r in results]) for k in range(len(compiled.outputs)))


def engine_precision(option: str, requested: str) -> str:
    """OpenVINO's precision hint: the backbone option, else the segmenter's request
    (``"bf16"``/``"fp32"``); int8 models keep their float layers in float32."""
    if option == "int8":
        return "f32"
    if option != "auto":
        return option
    return "bf16" if requested == "bf16" else "f32"


# -- the weights-file index ------------------------------------------------------------------
def split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``build_openvino``'s options -> (run-time options, the base network's options)."""
    runtime = {k: v for k, v in options.items() if k in RUNTIME_OPTIONS}
    network = {k: v for k, v in options.items() if k not in RUNTIME_OPTIONS}
    return runtime, network


def index_path(cache_dir: Path, file_sha: str, base: str, network: dict[str, Any]) -> Path:
    key = json.dumps({"file": file_sha, "base": base, "options": network}, sort_keys=True,
                     default=str)
    return cache_dir / "files" / f"{hashlib.sha256(key.encode()).hexdigest()}.json"


def write_index(cache_dir: Path, weights: Path, base: str, network: dict[str, Any],
                record: dict[str, Any]) -> None:
    """Record (atomically) which entry the weights file loads to, and the core's facts."""
    file_sha = file_sha256(weights)
    path = index_path(cache_dir, file_sha, base, network)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps({**record, "file_sha256": file_sha, "file": str(weights)},
                              indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


class ArrayNet:
    """An exported model run without torch: ``net(x, precision)`` with float32 numpy
    (B, C, H, W) returns ``(raw, style)`` as numpy arrays (the backbone contract's array
    form, ``takes_arrays``). Inference only."""

    takes_arrays = True
    inference_only = True
    # images per call (the core's chunks): a call ends when its last stream finishes, so
    # Cellpose's 8 tiles per call leave a stream idle at each of the 18 ends of a 2048² image;
    # 64 tiles per call were 1.5-3 % faster at 1024² and 2048² (2-core Xeon), and cost
    # 64 x 224² x (2 + 3) float32 = 64 MB while in flight
    batch_size = 64

    def __init__(self, engine: Engine, precision: str, threads: int | None,
                 nbase: list[int] | None, stats: dict[str, Any]) -> None:
        self.engine = engine
        self.precision = precision
        self.option_threads = threads  # the backbone option wins over the segmenter's
        self.threads: int | None = None  # the segmenter sets it from its own threads option
        self.nbase = nbase  # the feature widths (the core's memory estimate reads nbase[0])
        self.stats = stats

    def __call__(self, x: np.ndarray, precision: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
        raw, style = self.engine.run(x, engine_precision(self.precision, precision),
                                     self.option_threads or self.threads
                                     or default_threads())[:2]
        self.stats["compile_seconds"] = self.engine.compile_seconds
        return raw, style


def stats_of(net: Any) -> dict[str, Any] | None:
    """What preparing ``net`` cost (export, compile, cache hit or miss, torch or not): an
    :class:`ArrayNet`'s or an accelerated torch module's runner's; None for other modules."""
    return getattr(getattr(net, "_ov_runner", net), "stats", None)


def load_cached(weights: Path, options: dict[str, Any]) -> tuple[ArrayNet, dict[str, Any]] | None:
    """The ``load_cached`` of the backbone contract: an :class:`ArrayNet` for the weights
    file ``weights`` with ``build_openvino`` options ``options``, and the facts recorded
    when it was first loaded, or None when the cache cannot serve it (the core then takes
    the torch path, which exports, quantises or rebuilds as needed)."""
    runtime, network = split_options(options)
    base = str(network.pop("base", "cellpose-unet"))
    precision = str(runtime.get("precision", "auto"))
    if precision not in PRECISIONS or (precision == "int8") != (
            runtime.get("calibration") is not None):
        return None  # the torch path raises the factory's own error
    cache_dir = Path(runtime.get("cache_dir") or default_cache_dir())
    try:
        record = json.loads(index_path(cache_dir, file_sha256(Path(weights)), base, network)
                            .read_text(encoding="utf-8"))
        folder = cache_dir / str(record["weights_sha256"])
        facts = dict(record["facts"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if entry_problem(folder, str(record["weights_sha256"]), base) is not None:
        return None
    if precision == "int8":
        try:
            key, _ = int8_settings(calibration_files(runtime["calibration"]))
        except (ValueError, OSError, importlib.metadata.PackageNotFoundError):
            return None
        folder = folder / f"int8-{key}"
        if not int8_ok(folder, key):
            return None
    threads = runtime.get("threads")
    if threads is not None and int(threads) < 1:
        return None
    stats = {"export_seconds": 0.0, "compile_seconds": 0.0, "cache": "hit", "torch": False}
    engine = Engine(folder / "model.xml", cache_dir / "compiled")
    return ArrayNet(engine, precision, None if threads is None else int(threads),
                    record.get("nbase"), stats), facts
