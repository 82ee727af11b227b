"""End-to-end segmentation speed: cellplug against Cellpose 3.1.1.2, same weights, same run.

For images of 512², 1024² and 2048² pixels, each configuration segments the image in its own
subprocess (so peak memory is its own and nothing is shared), after a warm-up call on a small
crop (one-time costs such as numba compilation and MKL-DNN set-up are excluded):

- ``cellpose``: ``CellposeModel(pretrained_model=...).eval`` with its defaults (224 px tiles,
  float32, MKL-DNN on CPU);
- ``cellplug fp32``: ``tile=True, precision="fp32"`` (the Cellpose-identical mode);
- ``cellplug``: the defaults (the same tiles, ``precision="auto"``: bfloat16 autocast on CPUs
  with native bfloat16);
- ``cellplug whole``: ``tile="auto"`` (one whole-image pass when it fits in memory), bf16;

and at 1024² the single levers: whole image in float32, OpenMP's wait policy (cellplug sets
``OMP_WAIT_POLICY=PASSIVE`` unless set; "spinning" forces ``ACTIVE``, the OpenMP default,
and Cellpose is also run with ``PASSIVE``), and one torch thread for each.
Every run uses the same settings: channels [0, 0], diameter = the model's ``diam_mean``
(rescale 1, so no resizing), flow threshold 0.4, cell-probability threshold 0, torch's
default thread count unless stated.

Masks of every cellplug configuration are compared with Cellpose's (AP@0.5, Cellpose's as the
reference). Seconds, the network / mask split, tiles, objects and peak resident memory are
written to benchmarks/results/bench_segment.json and .md.

Weights: ``--model PATH`` (a cellplug or Cellpose ``.pth``); by default the bundled
``generalist`` model when installed, else random weights (``parity_backbone.make_weights``),
whose masks are fragile and make the AP comparison weak. Images: mosaics of 512 x 512 centre
crops of the 520 x 696 dsb2018 fluorescence images with the most nuclei: 1, 2 x 2 and 4 x 4
crops for 512², 1024² and 2048². Data: ``$CELLPLUG_DATA`` or ``../shared/data``; skipped cleanly
when absent.

Absolute seconds depend on the machine's load (say so when quoting them); ratios measured
in the same run are what this benchmark is for.

    python benchmarks/bench_segment.py [--model PATH] [--sizes 512 1024 2048] [--no-levers]
"""

from __future__ import annotations

import argparse
import datetime as dt
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
from _common import RESULTS, data_root, machine, metadata_rows  # noqa: E402

# cellplug sets OMP_WAIT_POLICY on import; workers get the environment the user started with
_USER_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")
CROP = (slice(4, 516), slice(92, 604))  # the centre 512 x 512 of a 520 x 696 image
MIN_AP = 0.98

# name -> (engine, cellplug options, torch threads or None, extra environment)
CONFIGS = {
    "cellpose": ("cellpose", {}, None, {}),
    "cellplug fp32": ("cellplug", {"tile": True, "precision": "fp32"}, None, {}),
    "cellplug": ("cellplug", {}, None, {}),
    "cellplug whole": ("cellplug", {"tile": "auto"}, None, {}),
}
LEVERS = {
    "cellplug whole fp32": ("cellplug", {"tile": False, "precision": "fp32"}, None, {}),
    "cellplug spinning omp": ("cellplug", {}, None, {"OMP_WAIT_POLICY": "ACTIVE"}),
    "cellpose passive omp": ("cellpose", {}, None, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "cellpose 1 thread": ("cellpose", {}, 1, {}),
    "cellplug fp32 1 thread": ("cellplug", {"tile": True, "precision": "fp32"}, 1, {}),
    "cellplug 1 thread": ("cellplug", {}, 1, {}),
    "cellplug whole 1 thread": ("cellplug", {"tile": "auto"}, 1, {}),
}


def mosaic_stems(folder: Path, n: int = 16) -> list[str]:
    """The ``n`` 520 x 696 fluorescence images of dsb2018 with the most objects (ties: stem)."""
    rows = [
        r
        for r in metadata_rows(folder / "dsb2018")
        if (r["height"], r["width"], r["channels"]) == ("520", "696", "1")
        and r["modality"] == "fluorescence"
    ]
    rows.sort(key=lambda r: (-int(r["n_objects"]), r["stem"]))
    return [r["stem"] for r in rows[:n]]


def make_image(size: int, folder: Path) -> np.ndarray:
    """uint8 (size, size): a mosaic of (size / 512)^2 centre crops of fluorescence images."""
    import tifffile

    k = size // 512
    if size % 512 or k < 1:
        raise SystemExit(f"unsupported size {size} (a multiple of 512)")
    stems = mosaic_stems(folder, k * k)
    crops = [tifffile.imread(folder / "dsb2018" / f"{s}.tif")[CROP] for s in stems]
    return np.ascontiguousarray(np.block([crops[r * k : (r + 1) * k] for r in range(k)]))


# -- worker (one configuration, one image, own process) ------------------------------------
def worker(args: argparse.Namespace) -> None:
    if args.engine == "cellplug":  # as in the CLI: cellplug is imported before torch
        import cellplug.segmenter  # noqa: F401
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    image = make_image(args.size, data_root())
    warm = image[:256, :256]
    options = json.loads(args.options)
    timings: dict[str, float] = {}
    if args.engine == "cellpose":
        from cellpose import models as cp_models

        model = cp_models.CellposeModel(pretrained_model=args.model)
        diameter = float(model.diam_mean)
        _time_methods(model, timings)
        kwargs = dict(
            channels=[0, 0], diameter=diameter, flow_threshold=0.4, cellprob_threshold=0.0
        )
        model.eval(warm, **kwargs)
        timings.clear()
        rss0 = _rss_mb()
        t0 = time.perf_counter()
        masks = model.eval(image, **kwargs)[0]
        total = time.perf_counter() - t0
        n_tiles = _cellpose_tiles(image.shape)
        extra = {"mkldnn": bool(model.mkldnn)}
    else:
        from cellplug.segmenter import Segmenter, SegmentOptions

        seg = Segmenter.from_model(args.model, threads=args.threads)
        diameter = seg.model.diam_mean
        opts = SegmentOptions(
            diameter=diameter,
            channels=(0, 0),
            flow_threshold=0.4,
            cellprob_threshold=0.0,
            **options,
        )
        seg.segment(warm, opts)
        rss0 = _rss_mb()
        t0 = time.perf_counter()
        result = seg.segment(image, opts)
        total = time.perf_counter() - t0
        masks = result.labels
        timings = {"network": result.timings["network"], "masks": result.timings["masks"]}
        n_tiles = result.n_tiles
        from cellplug.inference import resolve_precision

        extra = {"precision": resolve_precision(opts.precision)}
    np.save(args.masks_out, np.asarray(masks, dtype=np.uint32))
    out = {
        "seconds": total,
        "network_seconds": timings.get("network"),
        "masks_seconds": timings.get("masks"),
        "n_tiles": n_tiles,
        "n_objects": int(np.asarray(masks).max()),
        "peak_rss_mb": _peak_mb(),
        "rss_before_mb": rss0,
        "torch_threads": torch.get_num_threads(),
        "diameter": diameter,
        **extra,
    }
    Path(args.result_out).write_text(json.dumps(out))


def _time_methods(model, timings: dict[str, float]) -> None:
    """Time Cellpose's network and mask steps by wrapping its two internal methods."""
    for attr, key in (("_run_net", "network"), ("_compute_masks", "masks")):
        fn = getattr(model, attr)

        def wrapped(*a, _fn=fn, _key=key, **k):
            t = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                timings[_key] = timings.get(_key, 0.0) + time.perf_counter() - t

        setattr(model, attr, wrapped)


def _cellpose_tiles(shape: tuple[int, ...]) -> int:
    from cellplug import tiling

    t, b, left, r = tiling.pad_amounts(shape[0], shape[1])
    return tiling.tile_grid(shape[0] + t + b, shape[1] + left + r).n_tiles


def _peak_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return float("nan")


# -- driver ----------------------------------------------------------------------------------
def run_config(name: str, spec, size: int, model: str, tmp: Path) -> dict:
    engine, options, threads, env = spec
    stem = tmp / f"{name.replace(' ', '_')}_{size}"
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--engine",
        engine,
        "--size",
        str(size),
        "--model",
        model,
        "--options",
        json.dumps(options),
        "--masks-out",
        f"{stem}.npy",
        "--result-out",
        f"{stem}.json",
    ]
    if threads:
        cmd += ["--threads", str(threads)]
    child = dict(os.environ)
    child.pop("OMP_WAIT_POLICY", None)
    if _USER_OMP_WAIT_POLICY is not None:
        child["OMP_WAIT_POLICY"] = _USER_OMP_WAIT_POLICY
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**child, **env})
    if proc.returncode != 0:
        raise SystemExit(f"{name} at {size}: worker failed\n{proc.stderr[-3000:]}")
    res = json.loads(Path(f"{stem}.json").read_text())
    res.update(config=name, size=size, engine=engine, options=options, environment=env)
    return res


def resolve_weights(arg: str | None, tmp: Path) -> tuple[str, str]:
    """(path, description) of the weights to benchmark."""
    if arg:
        return arg, f"given: {arg}"
    from cellplug.errors import CellplugError
    from cellplug.models import resolve_model

    try:
        info = resolve_model(None)
        return str(info.weights), f"bundled model {info.name!r}"
    except CellplugError:
        pass
    import parity_backbone

    calib = make_image(512, data_root())
    path = parity_backbone.make_weights(tmp / "random", calib)
    return str(path), "random weights (parity_backbone.make_weights): masks are fragile"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--weights-note", default="", help="how the given weights were made")
    ap.add_argument("--render", metavar="JSON", help="only rewrite the .md from a results .json")
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--no-levers", action="store_true", help="skip the single-lever runs")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--masks-out", help=argparse.SUPPRESS)
    ap.add_argument("--result-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0
    if args.render:
        doc = json.loads(Path(args.render).read_text())
        (RESULTS / "bench_segment.md").write_text(_markdown(doc))
        return 0
    if not (data_root() / "dsb2018").is_dir():
        print(f"bench_segment: skipped, no dsb2018 data under {data_root()}")
        return 0
    try:
        import cellpose
    except ImportError:
        print("bench_segment: skipped, Cellpose 3.1.1.2 is not installed")
        return 0
    import torch

    from cellplug.metrics import average_precision

    started = time.time()
    load_start = os.getloadavg()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        model, model_desc = resolve_weights(args.model, tmp)
        plan = [(size, CONFIGS) for size in args.sizes]
        if not args.no_levers and 1024 in args.sizes:
            plan.append((1024, LEVERS))
        for size, configs in plan:
            for name, spec in configs.items():
                res = run_config(name, spec, size, model, tmp)
                rows.append(res)
                print(
                    f"{size:>5}  {name:<24} {res['seconds']:7.2f} s  network "
                    f"{_fmt(res['network_seconds'])}  masks {_fmt(res['masks_seconds'])}  "
                    f"tiles {res['n_tiles']:>3}  objects {res['n_objects']:>5}  "
                    f"peak {res['peak_rss_mb']:7.0f} MB",
                    flush=True,
                )
        # masks against Cellpose's (the reference at each size)
        ref = {
            r["size"]: np.load(tmp / f"cellpose_{r['size']}.npy")
            for r in rows
            if r["config"] == "cellpose"
        }
        for r in rows:
            masks = np.load(tmp / f"{r['config'].replace(' ', '_')}_{r['size']}.npy")
            r["ap50_vs_cellpose"] = float(average_precision(ref[r["size"]], masks, [0.5])[0])
    for r in rows:
        base = next(b for b in rows if b["size"] == r["size"] and b["config"] == "cellpose")
        r["speedup_vs_cellpose"] = base["seconds"] / r["seconds"]
    doc = {
        "benchmark": "bench_segment",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "wall_seconds": round(time.time() - started, 1),
        "versions": {
            "cellpose": cellpose.version,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "weights": model_desc + (f"; {args.weights_note}" if args.weights_note else ""),
        "settings": {
            "channels": [0, 0],
            "diameter": "model diam_mean (rescale 1)",
            "flow_threshold": 0.4,
            "cellprob_threshold": 0.0,
            "warm_up": "one call on a 256x256 crop before the timed call",
            "threads": "torch default unless the configuration says 1 thread",
        },
        "images": {
            "kind": "mosaics of 512x512 centre crops (rows 4-515, cols 92-603) of "
            "the 520x696 dsb2018 fluorescence images with the most objects, "
            "row-major",
            "stems": mosaic_stems(data_root(), (max(args.sizes) // 512) ** 2),
        },
        "results": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_segment.json").write_text(json.dumps(doc, indent=2) + "\n")
    (RESULTS / "bench_segment.md").write_text(_markdown(doc))
    print(_markdown(doc))
    bad = [
        r
        for r in rows
        if r["config"] in ("cellplug", "cellplug fp32") and r["ap50_vs_cellpose"] < MIN_AP
    ]
    if bad:
        print(
            f"bench_segment: default masks differ from Cellpose's (AP@0.5 < {MIN_AP}) at "
            + ", ".join(str(r["size"]) for r in bad)
        )
    return 0


def _fmt(x) -> str:
    return "   -  " if x is None else f"{x:6.2f}"


def _markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [
        "# Segmentation speed: cellplug vs Cellpose 3.1.1.2",
        "",
        f"- date: {doc['date']}; machine: {m.get('cpu_model') or m.get('cpu')}, "
        f"{m.get('cores') or m.get('cores_per_socket', 0) * m.get('sockets', 1) or '?'} cores "
        f"({m['logical_cpus']} logical CPUs), {m['memory_gb']} GB; load average "
        f"{doc['load_average_start']} at start, {doc['load_average_end']} at end",
        f"- versions: {doc['versions']}",
        f"- weights: {doc['weights']}",
        f"- settings: {doc['settings']}",
        f"- images: {doc['images']}",
        "- absolute seconds depend on the machine's load; ratios within one run are the "
        "result. Each configuration ran once, in its own process.",
        "",
        "| size | configuration | seconds | network s | masks s | tiles | objects | "
        "AP@0.5 vs Cellpose | speed-up | peak RSS MB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in doc["results"]:
        lines.append(
            f"| {r['size']}² | {r['config']} | {r['seconds']:.2f} | "
            f"{_fmt(r['network_seconds']).strip()} | {_fmt(r['masks_seconds']).strip()} | "
            f"{r['n_tiles']} | {r['n_objects']} | {r['ap50_vs_cellpose']:.4f} | "
            f"{r['speedup_vs_cellpose']:.2f}x | {r['peak_rss_mb']:.0f} |"
        )
    lines += ["", "## Summary (computed from the table)", ""]
    by = {(r["size"], r["config"]): r for r in doc["results"]}
    for size in sorted({r["size"] for r in doc["results"]}):
        equal = [
            r
            for r in doc["results"]
            if r["size"] == size
            and r["engine"] == "cellplug"
            and "thread" not in r["config"]
            and r["ap50_vs_cellpose"] >= MIN_AP
        ]
        if equal:
            best = max(equal, key=lambda r: r["speedup_vs_cellpose"])
            lines.append(
                f"- {size}²: fastest cellplug setting with equal masks (AP@0.5 >= "
                f"{MIN_AP}) at default threads: {best['config']}, "
                f"{best['speedup_vs_cellpose']:.2f}x Cellpose"
            )
    one_cp, one_us = by.get((1024, "cellpose 1 thread")), by.get((1024, "cellplug 1 thread"))
    if one_cp and one_us:
        lines.append(
            f"- 1024², both with one torch thread: cellplug {one_us['seconds']:.2f} s "
            f"vs Cellpose {one_cp['seconds']:.2f} s = "
            f"{one_cp['seconds'] / one_us['seconds']:.2f}x (AP@0.5 "
            f"{one_us['ap50_vs_cellpose']:.4f})"
        )
    passive, ours = by.get((1024, "cellpose passive omp")), by.get((1024, "cellplug"))
    if passive and ours:
        lines.append(
            f"- 1024², both with passive OpenMP threads: cellplug {ours['seconds']:.2f} s "
            f"vs Cellpose {passive['seconds']:.2f} s = "
            f"{passive['seconds'] / ours['seconds']:.2f}x"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
