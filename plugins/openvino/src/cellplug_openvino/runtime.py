"""A torch backbone run by OpenVINO: export once per weights, compile once per precision.

:func:`accelerate` turns a torch backbone module into one whose inference passes run an
OpenVINO model. The module keeps its class (a subclass is swapped in), parameters and
state dict, so everything that loads, saves or inspects the torch network keeps working;
only ``forward`` changes, and only where no gradient is wanted: in training mode, or with
autograd on, the torch ``forward`` runs (this backbone is inference-only; it never trains
through OpenVINO).

Why OpenVINO: its float32 convolutions run the Cellpose network 3.3-3.7x faster than torch
float32 on an AVX-512 Zen 4 and 1.6-1.8x faster than cellplug's channels-last torch path on
an AVX2 Zen 3 (2 threads), with the same numbers (max abs error ~1e-4 on the raw output);
ONNX Runtime is measured beside it in ``benchmarks/bench_runtime.py``.

This is the path that exports: the first time a weights file is used (or after its cache
entry went stale). It also records the weights file in the cache's index
(:meth:`OpenVINOForward.remember_weights_file`), so later processes load the export with
:func:`cellplug_openvino.engine.load_cached`, without torch. The cache layout is described
in :mod:`cellplug_openvino.engine`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .engine import (
    CALIBRATION_TILE,
    CALIBRATION_TILES,
    PRECISIONS,
    Engine,
    StaleCacheWarning,
    calibration_files,
    calibration_tiles,
    default_cache_dir,
    entry_problem,
    files_sha256,
    int8_ok,
    int8_settings,
    ov,
    publish,
    split_options,
    write_index,
)
from .telemetry import no_telemetry

__all__ = ["CALIBRATION_TILE", "CALIBRATION_TILES", "Runner", "StaleCacheWarning",
           "accelerate", "calibration_files", "calibration_tiles", "runner_of",
           "weights_sha256"]


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


def _version(t: torch.Tensor) -> int:
    # tensors made under torch.inference_mode (a module built there) have no version counter;
    # they can change in place only inside inference mode, which no training step uses
    return -1 if t.is_inference() else t._version


class Runner:
    """The OpenVINO side of one accelerated module: its cache entry and compiled models."""

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
        self._hashed: tuple[tuple[int, ...], str] | None = None
        self._engine: Engine | None = None
        self.exporting = False
        # what the last preparation cost: the first run's compile time is reported by the
        # benchmark ("export" only when the cache had no valid entry)
        self.stats: dict[str, Any] = {"export_seconds": 0.0, "compile_seconds": 0.0,
                                      "cache": None, "torch": True}

    # -- cache entry ------------------------------------------------------------------------
    def entry_dir(self) -> Path:
        assert self.key is not None
        return self.cache_dir / self.key

    def _export(self, net: torch.nn.Module, n_channels: int) -> None:
        """Convert ``net`` (torch forward) and write the entry atomically (folder rename)."""
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
            with torch.no_grad(), no_telemetry():
                model = ov().convert_model(net, example_input=torch.zeros(1, n_channels, 64, 64))
        finally:
            self.exporting = False
            net.train(was_training)
        # float32 weights on disk: compress_to_fp16 would change the numbers
        ov().save_model(model, tmp / "model.xml", compress_to_fp16=False)
        entry = {"weights_sha256": self.key, "base": self.base, "openvino": ov().__version__,
                 "files": files_sha256(tmp),
                 "export_seconds": round(time.perf_counter() - t0, 3),
                 "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / "entry.json").write_text(json.dumps(entry, indent=2), encoding="utf-8")
        publish(tmp, final)
        self.stats["export_seconds"] = time.perf_counter() - t0

    def _load(self, net: torch.nn.Module, n_channels: int) -> None:
        """Find (or export) the model of ``net``'s current weights."""
        self.key = self._key_of(net)
        folder = self.entry_dir()
        why = entry_problem(folder, self.key, self.base) if folder.exists() else "absent"
        if why is not None:
            if why != "absent":
                warnings.warn(f"OpenVINO cache entry {folder} is stale ({why}); rebuilding",
                              StaleCacheWarning, stacklevel=4)
            self._export(net, n_channels)
            why2 = entry_problem(folder, self.key, self.base)
            if why2 is not None:
                raise RuntimeError(f"OpenVINO cache entry {folder} unusable after export: {why2}")
            self.stats["cache"] = "miss" if why == "absent" else "stale"
        else:
            self.stats["cache"] = "hit"
            self.stats["export_seconds"] = 0.0
        if self.precision == "int8":
            folder = self._int8_entry(folder, n_channels)
        self._engine = Engine(folder / "model.xml", self.cache_dir / "compiled")

    def _int8_entry(self, f32_folder: Path, n_channels: int) -> Path:
        """The int8 model quantised from the float32 one in ``f32_folder`` (made if absent
        or stale)."""
        with no_telemetry():
            import nncf

        assert self.calibration is not None
        key, settings = int8_settings(self.calibration)
        folder = f32_folder / f"int8-{key}"
        if (folder / "entry.json").exists() and int8_ok(folder, key):
            return folder
        t0 = time.perf_counter()
        tiles = calibration_tiles(self.calibration, n_channels)
        model = ov().Core().read_model(f32_folder / "model.xml")
        with no_telemetry():
            quantised = nncf.quantize(
                model, nncf.Dataset([t[None] for t in tiles]), subset_size=len(tiles),
                preset=nncf.QuantizationPreset.MIXED, fast_bias_correction=True)
        tmp = f32_folder / f".tmp-int8-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        ov().save_model(quantised, tmp / "model.xml", compress_to_fp16=False)
        entry = {"key": key, **settings, "calibration_tiles_used": len(tiles),
                 "files_sha256": files_sha256(tmp),
                 "quantise_seconds": round(time.perf_counter() - t0, 3)}
        (tmp / "entry.json").write_text(json.dumps(entry, indent=2), encoding="utf-8")
        publish(tmp, folder)
        self.stats["quantise_seconds"] = time.perf_counter() - t0
        return folder

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

    def _key_of(self, net: torch.nn.Module) -> str:
        """The cache key of ``net``'s current weights; hashed once per weights version
        (:meth:`remember` and the first pass both need it)."""
        versions = self._param_versions(net)
        if self._hashed is None or self._hashed[0] != versions:
            self._hashed = (versions, weights_sha256(net, self.base))
        return self._hashed[1]

    def engine_for(self, net: torch.nn.Module, n_channels: int) -> Engine:
        versions = self._param_versions(net)
        if self._engine is None or versions != self._versions:
            self._load(net, n_channels)
            self._versions = versions
        assert self._engine is not None
        return self._engine

    def run(self, net: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        arr = np.ascontiguousarray(x.detach().float().cpu().numpy())
        engine = self.engine_for(net, arr.shape[1])
        out = engine.run(arr, self.resolved_precision(),
                         self.threads or torch.get_num_threads())
        self.stats["compile_seconds"] = engine.compile_seconds
        return tuple(torch.from_numpy(o) for o in out)

    def remember(self, net: torch.nn.Module, weights: Path, options: dict[str, Any],
                 facts: dict[str, Any]) -> None:
        """Index the weights file ``weights`` (loaded into ``net`` with ``options``): later
        processes find its export by the file's sha256 and load it without torch."""
        _, network = split_options(options)
        network.pop("base", None)
        nbase = getattr(net, "nbase", None)
        write_index(self.cache_dir, Path(weights), self.base, network, {
            "weights_sha256": self._key_of(net), "base": self.base,
            "facts": facts, "nbase": None if nbase is None else [int(n) for n in nbase]})


class OpenVINOForward:
    """Mixed into a torch backbone's class by :func:`accelerate` (before it in the MRO)."""

    _ov_runner: Runner

    def forward(self, x: torch.Tensor) -> Any:
        runner = self._ov_runner
        if self.training or torch.is_grad_enabled() or runner.exporting:  # type: ignore[attr-defined]
            return super().forward(x)  # type: ignore[misc]
        return runner.run(self, x)  # type: ignore[arg-type]

    def remember_weights_file(self, weights: Path, options: dict[str, Any],
                              facts: dict[str, Any]) -> None:
        """The backbone contract's hook, called by the core after it loaded ``weights``."""
        try:
            self._ov_runner.remember(self, weights, options, facts)  # type: ignore[arg-type]
        except OSError as exc:  # a read-only cache: later runs take the torch path again
            warnings.warn(f"OpenVINO cache index not written ({exc})", stacklevel=2)


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


def runner_of(net: Any) -> Runner | None:
    """The :class:`Runner` of an accelerated module (None for a plain torch module)."""
    return getattr(net, "_ov_runner", None)
