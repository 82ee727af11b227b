"""Large images and many images (issue 23): seams, memory, throughput.

    python benchmarks/scale.py seams       [--size 8192] [--block 2048]
    python benchmarks/scale.py memory      [--sizes 2048,4096,8192,16384] [--block 2048]
    python benchmarks/scale.py throughput  [--n 200]

Inputs are built from ../shared/data ($CELLPLUG_DATA): mosaics of Usiigaci phase-contrast
images (1022 x 1024, crowded touching cells of 40-70 px; each slot a randomly flipped
image, last two rows reflected) for seams and memory, and 512² images each made of four
dsb2018 fluorescence images (256², nuclei of ~14 px) for throughput. Results go to
benchmarks/results/scale_<part>.{json,md}. Run heavy parts under the shared lock:
``flock /tmp/cellplug-heavy.lock python benchmarks/scale.py seams``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    REPO,
    RESULTS,
    data_root,
    machine,
    metadata_rows,
    versions,
    write_json,
)

RUNS = REPO / "runs" / "scale"
SLOT = 1024


# -- inputs ----------------------------------------------------------------------------------
def usiigaci_paths() -> list[Path]:
    folder = data_root() / "usiigaci_phc"
    return [folder / f"{r['stem']}.tif" for r in metadata_rows(folder)]


def mosaic_zarr(path: Path, size: int, seed: int = 0) -> Path:
    """A size x size uint8 zarr (chunks 1024²) of randomly flipped Usiigaci images, written
    slot by slot (never whole in memory). Reused when it exists."""
    import tifffile
    import zarr

    if (path / ".zarray").exists():
        return path
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    arr = zarr.open_array(str(tmp), mode="w", shape=(size, size), chunks=(SLOT, SLOT),
                          dtype=np.uint8, zarr_format=2)
    paths = usiigaci_paths()
    rng = np.random.default_rng(seed)
    for y in range(0, size, SLOT):
        for x in range(0, size, SLOT):
            img = tifffile.imread(paths[rng.integers(len(paths))])
            img = np.pad(img, ((0, SLOT - img.shape[0]), (0, SLOT - img.shape[1])),
                         mode="reflect")
            if rng.integers(2):
                img = img[::-1]
            if rng.integers(2):
                img = img[:, ::-1]
            arr[y:y + SLOT, x:x + SLOT] = img[: size - y, : size - x]
    os.replace(tmp, path)
    return path


def fluo_folder(folder: Path, n: int, seed: int = 0) -> Path:
    """n images of 512² uint8, each four dsb2018 fluorescence 256² images side by side."""
    import tifffile

    if folder.exists() and len(list(folder.glob("*.tif"))) == n:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    src = data_root() / "dsb2018"
    stems = [r["stem"] for r in metadata_rows(src) if r["modality"] == "fluorescence"
             and r["height"] == "256" and r["width"] == "256" and r["channels"] == "1"]
    rng = np.random.default_rng(seed)
    for k in range(n):
        tiles = []
        for _ in range(4):
            t = tifffile.imread(src / f"{stems[rng.integers(len(stems))]}.tif")
            t = t if t.ndim == 2 else t[..., 0]
            tiles.append(np.asarray(t, np.uint8))
        img = np.block([[tiles[0], tiles[1]], [tiles[2], tiles[3]]])
        tifffile.imwrite(folder / f"img{k:03d}.tif", img, metadata={"axes": "YX"})
    return folder


# -- metrics on large label images -------------------------------------------------------------
def match(a: np.ndarray, b: np.ndarray) -> dict:
    """One-to-one matches at IoU >= 0.5 between label images a and b (sparse: unique pairs of
    overlapping ids), with AP@0.5 = TP / (TP + FP + FN)."""
    a = np.asarray(a, np.int64).ravel()
    b = np.asarray(b, np.int64).ravel()
    area_a = np.bincount(a)
    area_b = np.bincount(b)
    both = (a > 0) & (b > 0)
    keys, inter = np.unique(a[both] << 32 | b[both], return_counts=True)
    ia, ib = keys >> 32, keys & 0xFFFFFFFF
    iou = inter / (area_a[ia] + area_b[ib] - inter)
    ok = iou >= 0.5  # at most one match per object above 0.5
    na, nb = int(np.count_nonzero(area_a[1:])), int(np.count_nonzero(area_b[1:]))
    tp = int(ok.sum())
    pairs = dict(zip(ia[ok].tolist(), ib[ok].tolist(), strict=True))
    return {"n_a": na, "n_b": nb, "tp": tp, "ap50": tp / (na + nb - tp) if na + nb else 1.0,
            "pairs": pairs}


def boundary_status(labels: np.ndarray, block: int, offset: int = 0) -> tuple[set, set]:
    """(ids crossing a block boundary line, ids touching one): a line lies between pixel
    rows (columns) k*block-1 and k*block; an object crosses it when it has pixels on both
    sides there, and touches it when it has a pixel on either side."""
    cross, touch = set(), set()
    for axis in (0, 1):
        for k in range(block - offset, labels.shape[axis], block):
            if k < 1:
                continue
            before = np.take(labels, k - 1, axis=axis)
            after = np.take(labels, k, axis=axis)
            cross.update(np.unique(before[(before == after) & (before > 0)]).tolist())
            touch.update(np.unique(before[before > 0]).tolist())
            touch.update(np.unique(after[after > 0]).tolist())
    return cross, touch


def cut_counts(whole: np.ndarray, blocks: np.ndarray, block: int, m: dict,
               offset: int = 0) -> dict:
    """Objects cut at a block boundary: the issue's count (objects touching a boundary line
    in one result and not in the other, over matched pairs, plus unmatched objects touching
    a line), and the strict one (a whole-image object crossing a line whose block-wise match
    only touches it, i.e. ends there)."""
    cw, tw = boundary_status(whole, block, offset)
    cb, tb = boundary_status(blocks, block, offset)
    pairs = m["pairs"]
    touch_differs = sum((a in tw) != (b in tb) for a, b in pairs.items())
    unmatched_w = len(tw - set(pairs))
    unmatched_b = len(tb - set(pairs.values()))
    strict = sum(a in cw and b not in cb and b in tb for a, b in pairs.items())
    return {"crossing_whole": len(cw), "crossing_blockwise": len(cb),
            "touch_status_differs": touch_differs, "unmatched_touching_whole": unmatched_w,
            "unmatched_touching_blockwise": unmatched_b,
            "cut_at_boundary": strict}


# -- parts ---------------------------------------------------------------------------------------
def seams(args: argparse.Namespace) -> dict:
    import zarr

    from cellplug.blockwise import estimate_diameter, global_normalisation, segment_blockwise
    from cellplug.segmenter import Segmenter, SegmentOptions

    os.environ.setdefault("CELLPLUG_MAX_IMAGE_GIB", "16")
    src = mosaic_zarr(RUNS / f"mosaic_{args.size}.zarr", args.size)
    image = zarr.open_array(str(src), mode="r")
    seg = Segmenter.from_model(None, threads=args.threads)
    tile = {"on": True, "off": False, "grid": "grid"}[args.tile]
    opts = SegmentOptions(precision=args.precision, tile=tile)
    norm = global_normalisation(image, opts.channels, 2)
    t0 = time.perf_counter()
    d = estimate_diameter(seg, image, opts, norm)
    t_diam = time.perf_counter() - t0
    # block-wise always runs the grid tiling; the whole image runs --tile (grid: the same
    # computation in one piece, the issue's comparison; on / off: other whole-image methods)
    opts = SegmentOptions(diameter=d, precision=args.precision, tile=tile)
    t0 = time.perf_counter()
    res = segment_blockwise(image, seg, opts, block=args.block, scheduler="sync",
                            scratch_dir=RUNS)
    t_block = time.perf_counter() - t0
    blocks = res.labels
    t0 = time.perf_counter()
    whole = seg.segment(np.asarray(image[:]), opts).labels
    t_whole = time.perf_counter() - t0
    m = match(whole, blocks)
    cuts = cut_counts(whole, blocks, args.block, m)
    m.pop("pairs")
    extra = {"ap50_away_from_lines": away_from_lines(whole, blocks, args.block, d)}
    if not args.no_floor:
        # Cellpose's tiling against itself with its tiles shifted half a tile: how much any
        # tiled result depends on where the tiles fall; and the grid tiling against it
        t0 = time.perf_counter()
        cp_opts = SegmentOptions(diameter=d, precision=args.precision, tile=True)
        cellpose_tiles = (whole if tile is True else
                          seg.segment(np.asarray(image[:]), cp_opts).labels)
        extra.update(tiling_floor(seg, image, cellpose_tiles, cp_opts, d, args.block))
        if tile is not True:
            extra[f"ap50_whole_{args.tile}_vs_whole_cellpose_tiles"] = match(
                whole, cellpose_tiles)["ap50"]
        extra["floor_seconds"] = time.perf_counter() - t0
    return {**extra, "size": args.size, "block": args.block, "halo": res.layout.halo,
            "diameter": d, "diameter_seconds": t_diam, "precision": args.precision,
            "tile": args.tile,
            "threads": args.threads, "blockwise_seconds": t_block, "whole_seconds": t_whole,
            "objects_whole": int(m["n_a"]), "objects_blockwise": int(m["n_b"]),
            "candidates": res.n_candidates, "ap50_block_vs_whole": m["ap50"],
            "matched": m["tp"], **cuts}


def _drop(labels: np.ndarray, where: np.ndarray) -> np.ndarray:
    """``labels`` without the objects that have a pixel in ``where``."""
    lut = np.arange(int(labels.max()) + 1, dtype=labels.dtype)
    lut[np.unique(labels[where])] = 0
    return lut[labels]


def away_from_lines(whole: np.ndarray, blocks: np.ndarray, block: int, d: float) -> float:
    """AP@0.5 between the two results over objects more than one diameter from every block
    boundary line (in either result): their differences are not seams."""
    near = np.zeros(whole.shape, bool)
    r = int(math.ceil(d))
    for k in range(block, whole.shape[0], block):
        near[k - r:k + r] = True
    for k in range(block, whole.shape[1], block):
        near[:, k - r:k + r] = True
    m = match(_drop(whole, near), _drop(blocks, near))
    return m["ap50"]


def tiling_floor(seg, image, whole: np.ndarray, opts, d: float, block: int) -> dict:
    """The noise floor of the comparison: the whole image segmented again with its origin
    moved by half a network tile (so every 224 px tile falls elsewhere), against the first
    whole-image result, over the region both see with two diameters of context."""
    rescale = seg.model.diam_mean / d
    s = int(round(112 / rescale))
    again = seg.segment(np.asarray(image[s:, s:]), opts).labels
    edge = np.zeros(again.shape, bool)
    r = int(math.ceil(2 * d))
    edge[:r] = True
    edge[:, :r] = True
    m = match(_drop(whole[s:, s:], edge), _drop(again, edge))
    # the same "cut" counts at the block lines, between two whole-image results: what the
    # metric finds where there is no block boundary at all
    cuts = cut_counts(_drop(whole[s:, s:], edge), _drop(again, edge), block, m, offset=s)
    return {"floor_shift_px": s, "ap50_whole_vs_shifted_whole": m["ap50"],
            "floor_objects": m["n_a"], **{f"floor_{k}": v for k, v in cuts.items()}}


MEMORY_CHILD = r"""
import json, os, resource, sys, time, zarr
from cellplug.blockwise import segment_blockwise
from cellplug.segmenter import SegmentOptions
src, out, block, precision, scratch = sys.argv[1:6]
image = zarr.open_array(src, mode="r")
t0 = time.perf_counter()
res = segment_blockwise(image, None, SegmentOptions(precision=precision), block=int(block),
                        out=out, scheduler="threads", threads=1, scratch_dir=scratch)
dt = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": dt, "peak_rss_bytes": rss, "objects": res.n_objects,
                  "diameter": res.diameter, "blocks": len(res.layout.blocks()),
                  "halo": res.layout.halo}))
"""


def memory(args: argparse.Namespace) -> dict:
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        src = mosaic_zarr(RUNS / f"mosaic_{size}.zarr", size)
        out = RUNS / f"labels_{size}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(src), str(out),
                               str(args.block), args.precision, str(RUNS)],
                              capture_output=True, text=True, check=True)
        row = {"size": size, **json.loads(proc.stdout.strip().splitlines()[-1])}
        row["peak_rss_gib"] = row["peak_rss_bytes"] / 2**30
        print(row, flush=True)
        rows.append(row)
        shutil.rmtree(out, ignore_errors=True)
    return {"block": args.block, "precision": args.precision,
            "scheduler": "dask threads (2 workers, 1 torch thread each)", "rows": rows}


def _cli(args: list[str]) -> float:
    t0 = time.perf_counter()
    exe = Path(sys.executable).parent / "cellplug"
    subprocess.run([str(exe), *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def throughput(args: argparse.Namespace) -> dict:
    import tifffile

    from cellplug.segmenter import Segmenter, SegmentOptions, check_rescale

    folder = fluo_folder(RUNS / f"fluo512_{args.n}", args.n)
    files = sorted(folder.glob("*.tif"))
    common = ["--diameter", str(args.diameter), "--precision", args.precision, "-q"]
    # network only: every image prepared in memory first, then only the network pass
    seg = Segmenter.from_model(None, threads=2)
    opts = SegmentOptions(diameter=args.diameter, precision=args.precision)
    prepared = [seg.prepare(tifffile.imread(f), opts) for f in files]
    rescale = check_rescale(prepared[0].shape[1:], seg.model.diam_mean, args.diameter)
    seg.network(prepared[0], rescale, opts)  # warm-up
    t0 = time.perf_counter()
    for x in prepared:
        seg.network(x, rescale, opts)
    t_net = time.perf_counter() - t0
    runs, in_run = {}, {}
    summary = RUNS / "tp_summary.csv"

    def network_share(workers: int, wall: float) -> float:
        # the share of the workers' wall time spent in the network pass (the run's own
        # per-image timings): what the rest of the pipeline leaves to the network
        with open(summary, newline="") as fh:
            net = sum(float(r["network_seconds"]) for r in csv.DictReader(fh))
        return net / (workers * wall)

    for name, extra, workers in (("1 worker (2 torch threads)", ["--threads", "2"], 1),
                                 ("2 local workers (1 torch thread each)", ["--workers", "2"],
                                  2)):
        out = RUNS / "tp_out"
        shutil.rmtree(out, ignore_errors=True)
        runs[name] = _cli(["segment", str(folder), "--out", str(out), *common, *extra,
                           "--summary-csv", str(summary)])
        in_run[name] = network_share(workers, runs[name])
        print(name, runs[name], flush=True)
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        out = RUNS / "tp_out"
        shutil.rmtree(out, ignore_errors=True)
        name = "LocalCluster, 2 processes (1 torch thread each)"
        runs[name] = _cli(["segment", str(folder), "--out", str(out), *common, "--threads", "1",
                           "--dask-scheduler", cluster.scheduler_address,
                           "--summary-csv", str(summary)])
        in_run[name] = network_share(2, runs[name])
        print(name, runs[name], flush=True)
    n = len(files)
    net_rate = n / t_net * 3600
    return {"n_images": n, "image_size": 512, "diameter": args.diameter,
            "precision": args.precision,
            "network_only": {"seconds": t_net, "images_per_hour": net_rate,
                             "note": "network pass only (2 torch threads), images prepared "
                                     "in memory beforehand; no reading, masks or writing"},
            "runs": {k: {"seconds": v, "images_per_hour": n / v * 3600,
                         "fraction_of_network_only": n / v * 3600 / net_rate,
                         "network_share_of_wall": in_run[k]}
                     for k, v in runs.items()},
            "note": "wall time of the whole cellplug command (process start, model loading, "
                    "reading, network, masks, writing)"}


def to_markdown(part: str, doc: dict) -> str:
    lines = [f"# scale: {part}", "", f"Command: `{doc['command']}`", "",
             f"Machine: {doc['machine'].get('cpu_model', '')}, "
             f"{doc['machine'].get('logical_cpus', '')} logical CPUs; load average at start "
             f"{doc.get('load_at_start')}", ""]
    r = doc["result"]
    if part == "seams":
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {round(v, 4) if isinstance(v, float) else v} |" for k, v in r.items()]
    elif part == "memory":
        lines += ["| size | seconds | peak RSS (GiB) | objects | blocks |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {x['size']}² | {x['seconds']:.0f} | {x['peak_rss_gib']:.2f} | "
                  f"{x['objects']} | {x['blocks']} |" for x in r["rows"]]
    else:
        lines += ["| run | seconds | images/hour | of network-only rate | network share of "
                  "the run's wall time |", "| --- | --- | --- | --- | --- |",
                  f"| network only | {r['network_only']['seconds']:.1f} | "
                  f"{r['network_only']['images_per_hour']:.0f} | 1.00 | |"]
        lines += [f"| {k} | {v['seconds']:.1f} | {v['images_per_hour']:.0f} | "
                  f"{v['fraction_of_network_only']:.2f} | "
                  + (f"{v['network_share_of_wall']:.2f} |" if "network_share_of_wall" in v
                     else " |") for k, v in r["runs"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=["seams", "memory", "throughput"])
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--sizes", default="2048,4096,8192,16384")
    ap.add_argument("--block", type=int, default=2048)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--diameter", type=float, default=14.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--tile", choices=["grid", "on", "off"], default="grid",
                    help="seams: the whole-image run's tiling; grid (what the blocks compute), "
                         "Cellpose's 224 px tiles (on) or one network pass (off)")
    ap.add_argument("--tag", default="", help="results go to scale_<part>_<tag>.{json,md}")
    ap.add_argument("--no-floor", action="store_true",
                    help="seams: skip the whole-image run with a shifted tile grid")
    args = ap.parse_args()
    RUNS.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    result = {"seams": seams, "memory": memory, "throughput": throughput}[args.part](args)
    doc = {"command": " ".join(["python", "benchmarks/scale.py", *sys.argv[1:]]),
           "machine": machine(), "versions": versions("torch", "numpy", "dask", "zarr"),
           "load_at_start": round(load, 2),
           "max_rss_driver_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
           "result": result}
    name = f"scale_{args.part}{'_' + args.tag if args.tag else ''}"
    write_json(RESULTS / f"{name}.json", doc)
    (RESULTS / f"{name}.md").write_text(to_markdown(args.part, doc))
    print(json.dumps(result, indent=2, default=str)[:3000])


if __name__ == "__main__":
    main()
