"""A torch backbone run by OpenVINO: export once per weights, compile once per input shape.

:func:`accelerate` turns a torch backbone module into one whose inference passes run an
OpenVINO model. The module keeps its class (a subclass is swapped in), parameters and
state dict, so everything that loads, saves or inspects the torch network keeps working;
only ``forward`` changes, and only where no gradient is wanted: in training mode, or with
autograd on, the torch ``forward`` runs (this backbone is inference-only; it never trains
through OpenVINO).

Why OpenVINO: on this project's CPU (2 threads, AVX-512) its float32 convolutions (oneDNN,
Winograd) run the Cellpose network 3.3-3.7x faster than torch float32 with the same numbers
(max abs error ~1e-4 on the raw output); ONNX Runtime is measured beside it in
``benchmarks/bench_runtime.py``.

The cache, under ``cache_dir`` (default ``$CELLPLUG_CACHE/openvino`` or
``~/.cache/cellplug/openvino``):

- ``<sha256>/model.xml``, ``model.bin``, ``entry.json``: the exported model, one folder per
  weights. The key is the sha256 of the weights (every tensor's name, dtype, shape and
  bytes, plus the base backbone's name), so changed weights get a new entry. An entry is
  used only when ``entry.json`` names the same key, base and OpenVINO version and the files'
  own sha256 match; otherwise it is stale: it is exported again and replaced.
- ``<sha256>/int8-<key>/``: the int8 model quantised from it (precision ``"int8"``): NNCF's
  post-training quantisation, calibrated on tiles of the images given as ``calibration``;
  the key covers the calibration files' sha256, the settings and the NNCF version.
- ``compiled/``: OpenVINO's own cache of compiled models (``CACHE_DIR``), one blob per input
  shape and precision, keyed by OpenVINO on the model's content.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

ENTRY_FILES = ("model.xml", "model.bin")
PRECISIONS = ("auto", "f32", "bf16", "int8")
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
CALIBRATION_TILES = 300  # NNCF's default subset size
CALIBRATION_TILE = 224
MAX_COMPILED = 8  # input shapes kept compiled in memory (tiles, the last partial batch, ...)


class StaleCacheWarning(UserWarning):
    """An exported model on disk did not match its weights or files; it was rebuilt."""


def default_cache_dir() -> Path:
    """``$CELLPLUG_CACHE/openvino``, else ``~/.cache/cellplug/openvino``."""
    root = os.environ.get("CELLPLUG_CACHE") or Path.home() / ".cache" / "cellplug"
    return Path(root) / "openvino"


def weights_sha256(net: torch.nn.Module, base: str = "") -> str:
    """sha256 over ``base`` and every tensor of ``net``'s state dict (name, dtype, shape,
    bytes, in name order): the cache key. Equal weights give equal keys whatever file or
    memory format they came from."""
    h = hashlib.sha256(base.encode())
    for name, tensor in sorted(net.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files_sha256(folder: Path) -> dict[str, str]:
    return {name: _file_sha256(folder / name) for name in ENTRY_FILES}


def _files_problem(folder: Path, recorded: dict[str, str]) -> str | None:
    """Why the model files in ``folder`` do not match their ``recorded`` sha256, or None."""
    for name in ENTRY_FILES:
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if _file_sha256(path) != recorded.get(name):
            return f"{name} does not match its recorded sha256"
    return None


def _publish(tmp: Path, final: Path) -> None:
    """Put the finished folder ``tmp`` in place of ``final`` (rename: never half-written)."""
    old = final.parent / f".old-{final.name}-{os.getpid()}"
    if final.exists():
        final.rename(old)
    try:
        tmp.rename(final)
    except OSError:  # another process put a fresh entry there first: use that one
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def _version(t: torch.Tensor) -> int:
    # tensors made under torch.inference_mode (a module built there) have no version counter;
    # they can change in place only inside inference mode, which no training step uses
    return -1 if t.is_inference() else t._version


def _ov() -> Any:
    import openvino

    return openvino


@functools.cache
def _core(compiled_dir: str) -> Any:
    core = _ov().Core()
    core.set_property({"CACHE_DIR": compiled_dir})
    return core


class Runner:
    """The OpenVINO side of one accelerated module: its cache entry and compiled shapes."""

    def __init__(self, base: str, precision: str, threads: int | None,
                 cache_dir: str | os.PathLike[str] | None,
                 calibration: str | os.PathLike[str] | None = None) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, "
                             f"got {precision!r}")
        if (precision == "int8") != (calibration is not None):
            raise ValueError("precision 'int8' needs calibration=<images: a folder or a file> "
                             "(and calibration is only used by int8)")
        self.calibration = None if calibration is None else calibration_files(calibration)
        if threads is not None and int(threads) < 1:
            raise ValueError(f"threads must be at least 1, got {threads!r}")
        self.base = base
        self.precision = precision
        self.threads = None if threads is None else int(threads)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.key: str | None = None
        self._versions: tuple[int, ...] | None = None
        self._model: Any = None
        self._compiled: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self.exporting = False
        # what the last preparation cost: the first run's compile time is reported by the
        # benchmark ("export" only when the cache had no valid entry)
        self.stats: dict[str, Any] = {"export_seconds": 0.0, "compile_seconds": 0.0,
                                      "cache": None}

    # -- cache entry ------------------------------------------------------------------------
    def entry_dir(self) -> Path:
        assert self.key is not None
        return self.cache_dir / self.key

    def _check_entry(self, folder: Path) -> str | None:
        """Why the entry in ``folder`` cannot be used, or None when it can."""
        try:
            entry = json.loads((folder / "entry.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return f"unreadable entry.json ({type(exc).__name__})"
        expected = {"weights_sha256": self.key, "base": self.base,
                    "openvino": _ov().__version__}
        for field, value in expected.items():
            if entry.get(field) != value:
                return f"{field} is {entry.get(field)!r}, expected {value!r}"
        return _files_problem(folder, entry.get("files", {}))

    def _export(self, net: torch.nn.Module, n_channels: int) -> None:
        """Convert ``net`` (torch forward) and write the entry atomically (folder rename)."""
        ov = _ov()
        final = self.entry_dir()
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{self.key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        t0 = time.perf_counter()
        was_training = net.training
        net.eval()
        self.exporting = True  # the trace must see torch's forward, not this runner
        try:
            with torch.no_grad():
                model = ov.convert_model(net, example_input=torch.zeros(1, n_channels, 64, 64))
        finally:
            self.exporting = False
            net.train(was_training)
        # float32 weights on disk: compress_to_fp16 would change the numbers
        ov.save_model(model, tmp / "model.xml", compress_to_fp16=False)
        entry = {"weights_sha256": self.key, "base": self.base, "openvino": ov.__version__,
                 "files": _files_sha256(tmp),
                 "export_seconds": round(time.perf_counter() - t0, 3),
                 "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / "entry.json").write_text(json.dumps(entry, indent=2), encoding="utf-8")
        _publish(tmp, final)
        self.stats["export_seconds"] = time.perf_counter() - t0

    def _load(self, net: torch.nn.Module, n_channels: int) -> None:
        """Find (or export) the model of ``net``'s current weights."""
        self.key = weights_sha256(net, self.base)
        folder = self.entry_dir()
        why = self._check_entry(folder) if folder.exists() else "absent"
        if why is not None:
            if why != "absent":
                warnings.warn(f"OpenVINO cache entry {folder} is stale ({why}); rebuilding",
                              StaleCacheWarning, stacklevel=4)
            self._export(net, n_channels)
            why2 = self._check_entry(folder)
            if why2 is not None:
                raise RuntimeError(f"OpenVINO cache entry {folder} unusable after export: {why2}")
            self.stats["cache"] = "miss" if why == "absent" else "stale"
        else:
            self.stats["cache"] = "hit"
            self.stats["export_seconds"] = 0.0
        if self.precision == "int8":
            folder = self._int8_entry(folder, n_channels)
        self._model = _core(str(self.cache_dir / "compiled")).read_model(folder / "model.xml")
        self._compiled.clear()

    def _int8_entry(self, f32_folder: Path, n_channels: int) -> Path:
        """The int8 model quantised from the float32 one in ``f32_folder`` (made if absent
        or stale)."""
        import nncf

        assert self.calibration is not None
        settings = {"tiles": CALIBRATION_TILES, "tile": CALIBRATION_TILE, "preset": "mixed",
                    "fast_bias_correction": True, "nncf": nncf.__version__,
                    "files": [[p.name, _file_sha256(p)] for p in self.calibration]}
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        folder = f32_folder / f"int8-{key}"
        if (folder / "entry.json").exists() and self._int8_ok(folder, key):
            return folder
        t0 = time.perf_counter()
        tiles = calibration_tiles(self.calibration, n_channels)
        model = _ov().Core().read_model(f32_folder / "model.xml")
        quantised = nncf.quantize(
            model, nncf.Dataset([t[None] for t in tiles]), subset_size=len(tiles),
            preset=nncf.QuantizationPreset.MIXED, fast_bias_correction=True)
        tmp = f32_folder / f".tmp-int8-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _ov().save_model(quantised, tmp / "model.xml", compress_to_fp16=False)
        entry = {"key": key, **settings, "calibration_tiles_used": len(tiles),
                 "files_sha256": _files_sha256(tmp),
                 "quantise_seconds": round(time.perf_counter() - t0, 3)}
        (tmp / "entry.json").write_text(json.dumps(entry, indent=2), encoding="utf-8")
        _publish(tmp, folder)
        self.stats["quantise_seconds"] = time.perf_counter() - t0
        return folder

    @staticmethod
    def _int8_ok(folder: Path, key: str) -> bool:
        try:
            entry = json.loads((folder / "entry.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return entry.get("key") == key and _files_problem(
            folder, entry.get("files_sha256", {})) is None

    @staticmethod
    def _param_versions(net: torch.nn.Module) -> tuple[int, ...]:
        # in-place changes (load_state_dict, an optimiser step) bump a tensor's version
        # counter: checking them is free, hashing 26 MB of weights on every pass is not
        return tuple(_version(t) for t in (*net.parameters(), *net.buffers()))

    # -- running ----------------------------------------------------------------------------
    def resolved_precision(self) -> str:
        if self.precision == "int8":  # layers left in float run in float32
            return "f32"
        if self.precision != "auto":
            return self.precision
        autocast = torch.is_autocast_enabled("cpu") and (
            torch.get_autocast_dtype("cpu") == torch.bfloat16
        )
        return "bf16" if autocast else "f32"

    def compiled_for(self, net: torch.nn.Module, shape: tuple[int, ...]) -> Any:
        versions = self._param_versions(net)
        if self._model is None or versions != self._versions:
            self._load(net, shape[1])
            self._versions = versions
        precision = self.resolved_precision()
        threads = self.threads or torch.get_num_threads()
        key = (shape, precision, threads)
        if key in self._compiled:
            self._compiled.move_to_end(key)
            return self._compiled[key]
        t0 = time.perf_counter()
        model = self._model.clone()
        model.reshape({model.inputs[0]: list(shape)})
        config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads,
                  "PERFORMANCE_HINT": "LATENCY"}
        compiled = _core(str(self.cache_dir / "compiled")).compile_model(model, "CPU", config)
        self.stats["compile_seconds"] += time.perf_counter() - t0
        self._compiled[key] = compiled
        while len(self._compiled) > MAX_COMPILED:
            self._compiled.popitem(last=False)
        return compiled

    def run(self, net: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        arr = np.ascontiguousarray(x.detach().float().cpu().numpy())
        compiled = self.compiled_for(net, tuple(arr.shape))
        result = compiled(arr)
        return tuple(torch.from_numpy(np.array(result[out], np.float32))
                     for out in compiled.outputs)


class OpenVINOForward:
    """Mixed into a torch backbone's class by :func:`accelerate` (before it in the MRO)."""

    _ov_runner: Runner

    def forward(self, x: torch.Tensor) -> Any:
        runner = self._ov_runner
        if self.training or torch.is_grad_enabled() or runner.exporting:  # type: ignore[attr-defined]
            return super().forward(x)  # type: ignore[misc]
        return runner.run(self, x)  # type: ignore[arg-type]


@functools.cache
def _accelerated_class(cls: type) -> type:
    # one subclass per backbone class, so isinstance() and repr keep working
    return type(f"OpenVINO{cls.__name__}", (OpenVINOForward, cls), {})


def accelerate(net: torch.nn.Module, *, base: str = "", precision: str = "auto",
               threads: int | None = None,
               cache_dir: str | os.PathLike[str] | None = None,
               calibration: str | os.PathLike[str] | None = None) -> torch.nn.Module:
    """Make ``net`` (a torch backbone module) run its inference passes with OpenVINO.

    Returns the same object, its class swapped for a subclass whose ``forward`` runs
    OpenVINO when no gradient is wanted. ``base`` names the backbone (part of the cache key).
    ``calibration`` (images) is needed by, and only by, ``precision="int8"``.
    """
    runner = Runner(base, precision, threads, cache_dir, calibration)
    net.__class__ = _accelerated_class(type(net))
    net._ov_runner = runner  # a plain attribute: not a parameter, not in the state dict
    return net


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


def runner_of(net: torch.nn.Module) -> Runner | None:
    """The :class:`Runner` of an accelerated module (None for a plain torch module)."""
    return getattr(net, "_ov_runner", None)
