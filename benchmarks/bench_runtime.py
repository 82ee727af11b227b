"""Float32 on a CPU: Cellpose 3.1.1.2, cellplug (torch) and cellplug on OpenVINO / ONNX Runtime.

Issue 24's benchmark. The same weights (the bundled ``generalist``), the same images as
``bench_segment.py`` (mosaics of dsb2018 fluorescence crops at 512², 1024², 2048²), Cellpose's
own tiling mode (224 px tiles, 10 % overlap) and **float32 everywhere** (no bfloat16, as on a
CPU without it), each configuration in its own process:

- ``cellpose``: ``CellposeModel(pretrained_model=...).eval`` (float32, MKL-DNN);
- ``torch fp32``: ``Segmenter.from_model(...)``, ``precision="fp32"``;
- ``openvino fp32``: the same with ``backbone="openvino"`` (plugin ``cellplug-openvino``),
  ``precision="fp32"`` (OpenVINO's ``INFERENCE_PRECISION_HINT`` f32);
- ``onnxruntime fp32``: the network exported with ``torch.onnx.export`` and run by an ONNX
  Runtime CPU session (a stand-in module in this script, not a plugin: measured to choose);
- ``openvino bf16`` (only where the CPU has native bfloat16): ``precision="bf16"``.

Two times per configuration and size:

- **process**: from just before the worker process is spawned to its masks written: Python
  start, imports, model loading, reading the image, the exported model's compilation
  (OpenVINO: from its on-disk cache, warmed once before; a cold cache is measured apart),
  segmentation and writing. The issue's "end to end, whole process".
- **segment**: a second ``segment`` call on the same image in the same process (warm).

Also: peak RSS of each worker; OpenVINO's first run with an empty cache (export + compile
seconds); masks against Cellpose's (AP@0.5); and, unless ``--no-val``, AP@0.5 on the
generalist's validation split (``training/generalist/val_stems.txt``, no diameter given) of
torch fp32, OpenVINO fp32 (and int8, and where the CPU has bfloat16, OpenVINO bf16 and
torch's bf16 autocast). Results: benchmarks/results/bench_runtime.{json,md}.

    python benchmarks/bench_runtime.py [--sizes 512 1024 2048] [--no-val] [--no-onnx]
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RESULTS,
    data_root,
    machine,
    metadata_rows,
    training_stems,
    validation_images,
)
from bench_segment import make_image, mosaic_stems  # noqa: E402

MIN_AP = 0.98
CONFIGS: dict[str, dict] = {
    "cellpose": {"engine": "cellpose"},
    "torch fp32": {"engine": "cellplug", "precision": "fp32"},
    "openvino fp32": {"engine": "cellplug", "precision": "fp32", "backbone": "openvino"},
    "onnxruntime fp32": {"engine": "ort", "precision": "fp32"},
    "openvino bf16": {"engine": "cellplug", "precision": "bf16", "backbone": "openvino"},
    # int8 convolutions (NNCF post-training quantisation), the rest float32: see --calibration
    "openvino int8": {"engine": "cellplug", "precision": "fp32", "backbone": "openvino",
                      "int8": True},
}
CALIBRATION_IMAGES = 24


# -- the ONNX Runtime stand-in ----------------------------------------------------------------
class OrtNet:
    """A backbone-like callable running an ONNX export of ``net`` with ONNX Runtime."""

    def __init__(self, net, path: Path, threads: int) -> None:
        import onnxruntime as ort
        import torch

        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.onnx.export(net.float().eval(), torch.zeros(1, 2, 64, 64), path, dynamo=False,
                              input_names=["x"], output_names=["raw", "style"],
                              dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}})
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.nbase = net.nbase  # inference.run_network reads the first width

    def __call__(self, x):
        import torch

        raw, style = self.session.run(None, {"x": np.ascontiguousarray(x.float().numpy())})
        return torch.from_numpy(raw), torch.from_numpy(style)

    def to(self, *a, **k):  # Segmenter moves its net to channels-last
        return self


# -- worker ------------------------------------------------------------------------------------
def worker(args: argparse.Namespace) -> None:
    import tifffile

    spec = CONFIGS[args.config]
    if spec["engine"] != "cellpose":  # as in the CLI: cellplug is imported before torch
        import cellplug.segmenter  # noqa: F401
    if spec.get("backbone") == "openvino":  # a warm cache needs no torch: don't import it
        from cellplug_openvino.engine import default_threads

        threads = default_threads()
    else:
        import torch

        threads = torch.get_num_threads()
    image = tifffile.imread(args.image)
    extra: dict = {}
    if spec["engine"] == "cellpose":
        from cellpose import models as cp_models

        model = cp_models.CellposeModel(pretrained_model=args.model)
        kwargs = dict(channels=[0, 0], diameter=float(model.diam_mean), flow_threshold=0.4,
                      cellprob_threshold=0.0)

        def run():
            return model.eval(image, **kwargs)[0]
    else:
        from cellplug.segmenter import Segmenter, SegmentOptions

        options = {"cache_dir": args.cache} if spec.get("backbone") == "openvino" else {}
        if spec.get("int8"):
            options.update(precision="int8", calibration=args.calibration)
        seg = Segmenter.from_model(args.model, backbone=spec.get("backbone"),
                                   backbone_options=options or None)
        if spec["engine"] == "ort":
            seg.net = OrtNet(seg.net, Path(args.cache) / "model.onnx", threads)
        opts = SegmentOptions(diameter=seg.model.diam_mean, channels=(0, 0), tile=True,
                              precision=spec["precision"], flow_threshold=0.4,
                              cellprob_threshold=0.0)

        def run():
            return seg.segment(image, opts).labels
    masks = np.asarray(run(), np.uint32)
    tifffile.imwrite(args.masks_out + ".tif", masks)
    # from the parent's clock just before it spawned this process: psutil's create_time()
    # counts from /proc/stat's boot time, which Linux gives in whole seconds (up to 1 s off)
    process_seconds = time.time() - args.spawned_at
    if spec.get("backbone") == "openvino":
        from cellplug_openvino.engine import stats_of

        extra["openvino_first_run"] = dict(stats_of(seg.net) or {})
        extra["torch_imported"] = "torch" in sys.modules
    network = {"seconds": 0.0, "images": 0}
    if spec["engine"] != "cellpose":  # the warm call's network passes, timed apart
        from cellplug import inference

        real_forward = inference.forward_batches

        def timed_forward(net, batch, *a, **k):
            t = time.perf_counter()
            try:
                return real_forward(net, batch, *a, **k)
            finally:
                network["seconds"] += time.perf_counter() - t
                network["images"] += int(batch.shape[0])

        inference.forward_batches = timed_forward
    t0 = time.perf_counter()
    run()
    segment_seconds = time.perf_counter() - t0
    np.save(args.masks_out, masks)
    if network["images"]:
        extra.update(network_seconds=network["seconds"], network_images=network["images"])
    out = {"process_seconds": process_seconds, "segment_seconds": segment_seconds,
           "n_objects": int(masks.max()),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "threads": threads, **extra}
    Path(args.result_out).write_text(json.dumps(out))


def _run(config: str, image: Path, model: str, cache: Path, stem: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--config", config, "--image", str(image),
           "--model", model, "--cache", str(cache), "--masks-out", f"{stem}.npy",
           "--result-out", f"{stem}.json", "--calibration", str(cache.parent / "calibration")]
    proc = subprocess.run([*cmd, "--spawned-at", repr(time.time())], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{config} on {image.name}: worker failed\n{proc.stderr[-3000:]}")
    return json.loads(Path(f"{stem}.json").read_text())


def calibration_folder(folder: Path, n: int = CALIBRATION_IMAGES, seed: int = 0,
                       modality: str | None = None) -> Path:
    """``n`` dsb2018 training images (never the validation split, never an image of the
    benchmark's mosaics), of ``modality`` or all: what the int8 configuration is calibrated
    on."""
    import shutil

    root = data_root() / "dsb2018"
    kind = {r["stem"]: r["modality"] for r in metadata_rows(root)}
    mosaic = set(mosaic_stems(data_root(), 16))  # every crop of the 2048² mosaic
    pool = [s for s in training_stems("dsb2018") if s not in mosaic
            and (modality is None or kind.get(s) == modality)]
    folder.mkdir(parents=True, exist_ok=True)
    for i in np.random.default_rng(seed).permutation(len(pool))[:n]:
        shutil.copy(root / f"{pool[i]}.tif", folder / f"{pool[i]}.tif")
    return folder


def cold_runs(image: Path, model: str, cache: Path, tmp: Path, onnx: bool,
              int8: bool = False) -> dict:
    """First runs with an empty cache (OpenVINO: export + compile seconds; ONNX Runtime:
    export; int8: quantisation), which leave ``cache`` warm for the timed runs."""
    res = _run("openvino fp32", image, model, cache, tmp / "ov_cold")
    out = {"process_seconds": res["process_seconds"], **res["openvino_first_run"],
           "image": image.name}
    if int8:
        res8 = _run("openvino int8", image, model, cache, tmp / "ov_int8_cold")
        out["int8_process_seconds"] = res8["process_seconds"]
        out["int8_quantise_seconds"] = res8["openvino_first_run"].get("quantise_seconds")
    if onnx:
        out["onnxruntime_process_seconds"] = _run(
            "onnxruntime fp32", image, model, cache, tmp / "ort_cold")["process_seconds"]
    return out


def validation_ap(model: str, limit: int | None, int8_options: dict | None = None,
                  bf16: bool = False) -> dict:
    """AP@0.5 on the validation split (size model, no diameter): torch fp32 and OpenVINO fp32,
    OpenVINO int8 with ``int8_options``, and with ``bf16`` OpenVINO bf16 (and torch's bf16
    autocast, cellplug's default on such a CPU)."""
    from cellplug.io import read_image, read_labels
    from cellplug.metrics import average_precision
    from cellplug.segmenter import Segmenter

    items = validation_images(limit)
    out = {}
    runs = [("torch fp32", None, None, "fp32"), ("openvino fp32", "openvino", None, "fp32")]
    if int8_options:
        runs.append(("openvino int8", "openvino", int8_options, "fp32"))
    if bf16:
        runs += [("openvino bf16", "openvino", None, "bf16"), ("torch bf16", None, None, "bf16")]
    for name, backbone, options, precision in runs:
        seg = Segmenter.from_model(model, backbone=backbone, backbone_options=options)
        aps, by = [], {}
        t0 = time.perf_counter()
        for img, lab, modality in items:
            pred = seg.segment(read_image(img), diameter=0, precision=precision).labels
            ap = float(average_precision(read_labels(lab), pred, [0.5])[0])
            aps.append(ap)
            by.setdefault(modality, []).append(ap)
        out[name] = {"n_images": len(aps), "mean_ap50": float(np.mean(aps)),
                     "by_modality": {k: float(np.mean(v)) for k, v in sorted(by.items())},
                     "seconds": round(time.perf_counter() - t0, 1), "per_image": aps}
    # each configuration against torch float32, the reference path
    out["differences"] = {name: out[name]["mean_ap50"] - out["torch fp32"]["mean_ap50"]
                          for name, *_ in runs[1:]}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="weights (default: the bundled generalist)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--no-val", action="store_true", help="skip the validation-split AP")
    ap.add_argument("--val-limit", type=int, default=None)
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--no-int8", action="store_true",
                    help="skip int8 (skipped anyway without cellplug-openvino[int8])")
    ap.add_argument("--calibration-modality", default=None, metavar="MODALITY",
                    help="int8: calibrate on dsb2018 training images of this modality only "
                         "(e.g. fluorescence, the mosaics' type; default: all)")
    ap.add_argument("--render", metavar="JSON", help="only rewrite the .md from a results .json")
    for hidden in ("--config", "--image", "--cache", "--masks-out", "--result-out",
                   "--calibration"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    ap.add_argument("--spawned-at", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0
    if args.render:
        doc = json.loads(Path(args.render).read_text())
        (RESULTS / "bench_runtime.md").write_text(_markdown(doc))
        return 0
    if not (data_root() / "dsb2018").is_dir():
        print(f"bench_runtime: skipped, no dsb2018 data under {data_root()}")
        return 0
    try:
        import cellpose
        from cellplug_openvino.telemetry import import_openvino

        openvino = import_openvino()  # as the plugin does: no usage telemetry
    except ImportError as exc:
        print(f"bench_runtime: skipped ({exc}); needs Cellpose 3.1.1.2 and cellplug-openvino")
        return 0
    import torch

    from cellplug.inference import bf16_supported
    from cellplug.metrics import average_precision
    from cellplug.models import resolve_model

    int8 = importlib.util.find_spec("nncf") is not None and not args.no_int8
    configs = [c for c in CONFIGS if not (c.startswith("onnx") and args.no_onnx)
               and not (c.endswith("bf16") and not bf16_supported())
               and not (c.endswith("int8") and not int8)]
    model = args.model or str(resolve_model(None).weights)
    started, load_start = time.time(), os.getloadavg()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        import tifffile

        images = {}
        for size in args.sizes:
            images[size] = tmp / f"mosaic_{size}.tif"
            tifffile.imwrite(images[size], make_image(size, data_root()))
        cache = tmp / "cache"
        calibration_folder(tmp / "calibration", modality=args.calibration_modality)
        cold = cold_runs(images[args.sizes[0]], model, cache, tmp, not args.no_onnx, int8)
        print(f"empty cache: {cold}", flush=True)
        for size in args.sizes:
            for config in configs:
                stem = tmp / f"{config.replace(' ', '_')}_{size}"
                res = _run(config, images[size], model, cache, stem)
                res.update(config=config, size=size)
                rows.append(res)
                print(f"{size:>5}  {config:<18} process {res['process_seconds']:7.2f} s  "
                      f"segment {res['segment_seconds']:7.2f} s  objects {res['n_objects']:>5}  "
                      f"peak {res['peak_rss_mb']:7.0f} MB", flush=True)
            ref = np.load(tmp / f"cellpose_{size}.npy")
            for r in rows:
                if r["size"] == size:
                    masks = np.load(tmp / f"{r['config'].replace(' ', '_')}_{size}.npy")
                    r["ap50_vs_cellpose"] = float(average_precision(ref, masks, [0.5])[0])
        val = None if args.no_val else validation_ap(
            model, args.val_limit, {"precision": "int8", "calibration": str(
                tmp / "calibration"), "cache_dir": str(cache)} if int8 else None,
            bf16=bf16_supported())
    for r in rows:
        base = next(b for b in rows if b["size"] == r["size"] and b["config"] == "cellpose")
        r["process_speedup"] = base["process_seconds"] / r["process_seconds"]
        r["segment_speedup"] = base["segment_seconds"] / r["segment_seconds"]
    doc = {
        "benchmark": "bench_runtime",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "wall_seconds": round(time.time() - started, 1),
        "versions": {"cellpose": cellpose.version, "torch": torch.__version__,
                     "openvino": openvino.__version__, "onnxruntime": _version("onnxruntime"),
                     "numpy": np.__version__, "python": platform.python_version()},
        "weights": model,
        "settings": {"tiles": "224 px, 10 % overlap (Cellpose's mode)",
                     "precision": "float32, except the bf16 rows",
                     "channels": [0, 0], "diameter": "model diam_mean (rescale 1)",
                     "flow_threshold": 0.4, "cellprob_threshold": 0.0,
                     "threads": "torch's default; OpenVINO without torch: the CPUs the process "
                                "may use (the threads column of the json has each row's)",
                     "int8_calibration": f"{CALIBRATION_IMAGES} dsb2018 training images, "
                                         f"{args.calibration_modality or 'all modalities'}, "
                                         "none from the mosaics or the validation split"},
        "openvino_cold_cache": cold,
        "results": rows,
        "validation": val,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_runtime.json").write_text(json.dumps(doc, indent=2) + "\n")
    (RESULTS / "bench_runtime.md").write_text(_markdown(doc))
    print(_markdown(doc))
    return 0


def _version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _rounded(by: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in by.items())


def _markdown(doc: dict) -> str:
    m = doc["machine"]
    cold = doc["openvino_cold_cache"]
    lines = [
        "# CPU runtimes: Cellpose 3.1.1.2 vs cellplug on torch, OpenVINO, ONNX Runtime",
        "",
        f"- date: {doc['date']}; machine: {m.get('cpu_model') or m.get('cpu')}, "
        f"{m['logical_cpus']} logical CPUs; load average {doc['load_average_start']} at "
        f"start, {doc['load_average_end']} at end (seconds are only meaningful on an "
        f"otherwise idle machine: run it under the shared benchmark lock)",
        f"- versions: {doc['versions']}",
        f"- settings: {doc['settings']}",
        "- process: from just before the worker process is spawned to its masks written "
        "(imports, model load, image read, compile from the warm cache, segmentation, "
        "write); segment: a second, warm call in the same process",
        "- OpenVINO rows with a warm cache: torch imported "
        + ", ".join(f"{r['size']}² {r['config']}: {r['torch_imported']}"
                    for r in doc["results"] if "torch_imported" in r),
        f"- OpenVINO's first run with an empty cache ({cold['image']}): export "
        f"{cold['export_seconds']:.1f} s, compile {cold['compile_seconds']:.1f} s, whole "
        f"process {cold['process_seconds']:.1f} s (ONNX Runtime, export included: "
        f"{cold.get('onnxruntime_process_seconds', float('nan')):.1f} s)",
        *([f"- int8: quantised once per weights and calibration images ("
           f"{doc['settings'].get('int8_calibration', 'dsb2018 training images')}; NNCF "
           f"post-training "
           f"quantisation, up to 300 tiles): {cold['int8_quantise_seconds']:.1f} s, whole first "
           f"process {cold['int8_process_seconds']:.1f} s"] if "int8_process_seconds" in cold
          else []),
        "",
        "| size | configuration | process s | speed-up | segment s | speed-up | objects | "
        "AP@0.5 vs Cellpose | peak RSS MB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in doc["results"]:
        lines.append(
            f"| {r['size']}² | {r['config']} | {r['process_seconds']:.2f} | "
            f"{r['process_speedup']:.2f}x | {r['segment_seconds']:.2f} | "
            f"{r['segment_speedup']:.2f}x | {r['n_objects']} | {r['ap50_vs_cellpose']:.4f} | "
            f"{r['peak_rss_mb']:.0f} |")
    floor = [r for r in doc["results"] if r["config"] == "openvino fp32"
             and r.get("network_seconds")]
    if floor:
        lines += ["", "## The float32 network floor", "",
                  "OpenVINO float32's network passes alone, timed inside the warm call: the "
                  "whole-process speed-up cannot exceed Cellpose's whole process over this, "
                  "even with every other cost (Python, imports, model load, numba's compiled "
                  "code, flows to masks, I/O) at zero.", ""]
        for r in floor:
            cellpose = next(b for b in doc["results"]
                            if b["size"] == r["size"] and b["config"] == "cellpose")
            lines.append(
                f"- {r['size']}²: {r['network_images']} tiles in {r['network_seconds']:.2f} s "
                f"({1000 * r['network_seconds'] / r['network_images']:.0f} ms per tile); "
                f"Cellpose's process {cellpose['process_seconds']:.2f} s: at most "
                f"{cellpose['process_seconds'] / r['network_seconds']:.2f}x")
    val = doc.get("validation")
    if val:
        lines += ["", "## Validation split (AP@0.5, no diameter given)", ""]
        # results written before "differences" have one key per difference instead
        diffs = val.get("differences") or {"openvino fp32": val["difference"],
                                           **({"openvino int8": val["difference_int8"]}
                                              if "difference_int8" in val else {})}
        for name in ("torch fp32", "openvino fp32", "openvino int8", "openvino bf16",
                     "torch bf16"):
            if name not in val:
                continue
            v = val[name]
            diff = f", {diffs[name]:+.4f} vs torch fp32" if name in diffs else ""
            lines.append(f"- {name}: {v['mean_ap50']:.4f} over {v['n_images']} images"
                         f"{diff} ({_rounded(v['by_modality'])}), {v['seconds']} s")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
