"""Speed of the flow engine (cellplug_flows) against Cellpose 3.1.1.2, measured in one run.

Run with ``nox -s bench`` (or ``python benchmarks/bench_flows.py`` in an environment with
cellplug, ``cellpose==3.1.1.2`` and ``torch==2.13.0``). Writes
``benchmarks/results/bench_flows.json`` and ``benchmarks/results/bench_flows.md``.

* **Inputs**: synthetic crowded label images (``_common.synthetic_cells``, cells about 30
  pixels across, seed = image size) of 512^2, 1024^2 and 2048^2 pixels. masks -> flows takes
  the labels; flows -> masks takes our flows of those labels with cell probability +5
  inside / -5 outside (Cellpose gets the same flows times 5, its convention).
* **What is timed**: ``cellplug_flows.masks_to_flows`` vs ``cellpose.dynamics.masks_to_flows``
  (CPU), and ``cellplug_flows.flows_to_masks`` vs
  ``cellpose.dynamics.resize_and_compute_masks(niter=200)`` (both: flow-error check at 0.4,
  hole filling, min_size 15). Wall-clock seconds per image, the best of a few repeats, the
  two libraries alternating so that changes in machine load hit both alike. Both are
  warmed up (JIT compiled) first; numba and torch use their default thread counts.
* **JIT**: the first-call compile time of cellplug_flows, in a fresh subprocess whose
  ``NUMBA_CACHE_DIR`` is an empty temporary directory (then again with that cache filled).
* **Memory**: peak resident memory of ``flows_to_masks`` on a 4096^2 image, in a separate
  subprocess: its peak resident size (``VmHWM``) minus the resident size after imports and a
  small warm-up call, so it includes the inputs (loaded after the baseline) and every
  temporary. Must stay below 2 GiB. (``ru_maxrss`` is not used: on Linux it keeps the
  parent's resident size at fork across ``exec``.)

The goal is both steps at least 10 x faster than Cellpose. Other work on the machine slows
both libraries; the ratios, measured in the same run, remain meaningful.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
from _common import RESULTS, machine, synthetic_cells, versions, write_json

SIZES = (512, 1024, 2048)
REPEATS = {512: 3, 1024: 2, 2048: 1}
DIAMETER = 30.0
MEMORY_SIZE = 4096
MEMORY_LIMIT = 2 * 1024**3
GOAL = 10.0
HERE = Path(__file__).resolve().parent


def timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t, out


def bench_size(n: int, repeats: int, dynamics) -> dict:
    from cellplug_flows import flows_to_masks, masks_to_flows

    from cellplug.metrics import average_precision

    labels = synthetic_cells((n, n), DIAMETER, seed=n)
    flows = masks_to_flows(labels)
    cellprob = np.where(labels > 0, 5.0, -5.0).astype(np.float32)
    dp = 5.0 * flows
    t = {"ours_m2f": [], "cellpose_m2f": [], "ours_f2m": [], "cellpose_f2m": []}
    for _ in range(repeats):
        dt, f_ours = timed(masks_to_flows, labels)
        t["ours_m2f"].append(dt)
        dt, f_cp = timed(dynamics.masks_to_flows, labels)
        t["cellpose_m2f"].append(dt)
        dt, m_ours = timed(flows_to_masks, flows, cellprob)
        t["ours_f2m"].append(dt)
        dt, m_cp = timed(dynamics.resize_and_compute_masks, dp, cellprob, niter=200)
        t["cellpose_f2m"].append(dt)
    best = {k: min(v) for k, v in t.items()}
    inside = labels > 0
    cos = (f_ours[:, inside] * f_cp[:, inside]).sum(0)  # both unit length inside
    return {
        "size": n,
        "objects": int(labels.max()),
        "pixels_inside": int(inside.sum()),
        "repeats": repeats,
        "seconds": best,
        "all_seconds": t,
        "ratio_m2f": best["cellpose_m2f"] / best["ours_m2f"],
        "ratio_f2m": best["cellpose_f2m"] / best["ours_f2m"],
        "check_mean_cosine_m2f": float(cos.mean()),
        "check_ap50_f2m_vs_cellpose": float(
            average_precision(m_cp.astype(np.int64), m_ours, [0.5])[0]
        ),
    }


def sparse_mosaic(size: int = 2048, tile: int = 512) -> np.ndarray | None:
    """Real, sparse labels: the generalist's dsb2018 validation masks (each cropped or padded
    to ``tile``), tiled row-major into ``size`` x ``size``, ids made unique; None without data."""
    import tifffile
    from _common import validation_images

    try:
        items = [lab for _, lab, _ in validation_images() if "dsb2018" in str(lab)]
    except OSError:
        return None
    k = size // tile
    if len(items) < k * k:
        return None
    out = np.zeros((size, size), np.int32)
    offset = 0
    for n, path in enumerate(items[: k * k]):
        m = np.asarray(tifffile.imread(path), np.int32)[:tile, :tile]
        m = np.where(m > 0, m + offset, 0)
        offset = max(offset, int(m.max()))
        r, c = divmod(n, k)
        out[r * tile : r * tile + m.shape[0], c * tile : c * tile + m.shape[1]] = m
    return out


def bench_sparse(dynamics, repeats: int = 3) -> dict | None:
    """flows -> masks on real, sparse images (issue 24): a 2048^2 mosaic of dsb2018
    validation masks, a few per cent foreground. Ours on the foreground pixels' list (the
    default) and with the whole-image steps (``sparse=False``), against Cellpose."""
    from cellplug_flows import flows_to_masks, masks_to_flows

    from cellplug.metrics import average_precision

    labels = sparse_mosaic()
    if labels is None:
        return None
    flows = masks_to_flows(labels)
    cellprob = np.where(labels > 0, 5.0, -5.0).astype(np.float32)
    t = {"ours_f2m": [], "ours_whole_image_f2m": [], "cellpose_f2m": []}
    for _ in range(repeats):
        dt, m_ours = timed(flows_to_masks, flows, cellprob)
        t["ours_f2m"].append(dt)
        dt, m_whole = timed(flows_to_masks, flows, cellprob, sparse=False)
        t["ours_whole_image_f2m"].append(dt)
        dt, m_cp = timed(dynamics.resize_and_compute_masks, 5.0 * flows, cellprob, niter=200)
        t["cellpose_f2m"].append(dt)
    best = {k: min(v) for k, v in t.items()}
    return {
        "size": labels.shape[0], "objects": int(len(np.unique(labels)) - 1),
        "foreground_fraction": float((labels > 0).mean()), "repeats": repeats,
        "seconds": best, "all_seconds": t,
        "ratio_f2m": best["cellpose_f2m"] / best["ours_f2m"],
        "ratio_f2m_whole_image": best["cellpose_f2m"] / best["ours_whole_image_f2m"],
        "same_labels_both_ways": bool(np.array_equal(m_ours, m_whole)),
        "check_ap50_f2m_vs_cellpose": float(
            average_precision(m_cp.astype(np.int64), m_ours, [0.5])[0]),
    }


JIT_CODE = textwrap.dedent(
    """
    import json, sys, time
    sys.path.insert(0, {here!r})
    t0 = time.perf_counter()
    import numpy as np
    from cellplug_flows import flows_to_masks, masks_to_flows
    t1 = time.perf_counter()
    from _common import synthetic_cells
    lab = synthetic_cells((256, 256), 30.0, seed=1)
    cp = np.where(lab > 0, 5.0, -5.0).astype(np.float32)
    r = {{"import": t1 - t0}}
    for k in ("first", "second"):
        t = time.perf_counter(); fl = masks_to_flows(lab); r[k + "_m2f"] = time.perf_counter() - t
        t = time.perf_counter(); flows_to_masks(fl, cp); r[k + "_f2m"] = time.perf_counter() - t
    print(json.dumps(r))
    """
)


def jit_times() -> dict:
    """Compile time in a fresh interpreter with an empty numba cache, then with it filled."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="numba-cache-") as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for run in ("empty_cache", "filled_cache"):
            res = subprocess.run(
                [sys.executable, "-c", JIT_CODE.format(here=str(HERE))],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(res.stdout.strip().splitlines()[-1])
            r["jit_m2f"] = r["first_m2f"] - r["second_m2f"]
            r["jit_f2m"] = r["first_f2m"] - r["second_f2m"]
            out[run] = r
    return out


MEM_CODE = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    from cellplug_flows import flows_to_masks, masks_to_flows

    def status(key):  # kB fields of /proc/self/status, in bytes
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    def rss():
        return status("VmRSS")

    # warm-up through every step (compiled code loaded or built before the baseline)
    lab = np.zeros((64, 64), np.int32); lab[4:24, 4:24] = 1; lab[30:50, 30:60] = 2
    flows_to_masks(masks_to_flows(lab), np.where(lab > 0, 5.0, -5.0).astype(np.float32))
    base = rss()
    flows = np.load(sys.argv[1]); cellprob = np.load(sys.argv[2])
    inputs = rss() - base
    t = time.perf_counter(); masks = flows_to_masks(flows, cellprob); dt = time.perf_counter() - t
    # VmHWM: this process's own peak. ru_maxrss would not do: Linux keeps the parent's
    # resident size at fork in it across exec.
    peak = status("VmHWM")
    print(json.dumps({{"baseline_rss": base, "inputs": inputs, "peak_rss": peak,
                      "seconds": dt, "objects_found": int(masks.max())}}))
    """
)


def peak_memory(n: int) -> dict:
    from cellplug_flows import masks_to_flows

    labels = synthetic_cells((n, n), DIAMETER, seed=n)
    with tempfile.TemporaryDirectory(prefix="bench-flows-") as tmp:
        f, c = Path(tmp) / "flows.npy", Path(tmp) / "cellprob.npy"
        np.save(f, masks_to_flows(labels))
        np.save(c, np.where(labels > 0, 5.0, -5.0).astype(np.float32))
        objects = int(labels.max())
        del labels
        res = subprocess.run(
            [sys.executable, "-c", MEM_CODE.format(), str(f), str(c)],
            capture_output=True,
            text=True,
            check=True,
        )
    r = json.loads(res.stdout.strip().splitlines()[-1])
    r["size"] = n
    r["objects"] = objects
    r["peak_minus_baseline"] = r["peak_rss"] - r["baseline_rss"]
    r["limit"] = MEMORY_LIMIT
    r["passed"] = r["peak_minus_baseline"] < MEMORY_LIMIT
    return r


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        "# Flow engine speed: cellplug_flows vs Cellpose 3.1.1.2",
        "",
        f"Machine: {m['cpu_model']}, {m['logical_cpus']} logical CPUs "
        f"({m.get('cores_per_socket', '?')} cores per socket x {m.get('sockets', '?')} "
        f"socket, {m.get('threads_per_core', '?')} thread per core); {m['date']}; "
        f"load average at start {m['load_average_at_start']}, at end "
        f"{res['load_average_at_end']}. Threads: numba {res['threads']['numba']}, "
        f"torch {res['threads']['torch']}.",
        "",
        "Seconds per image (best of the repeats, the two libraries alternating), synthetic "
        f"crowded images with cells about {DIAMETER:g} px across; ratio = Cellpose / cellplug.",
        "",
        "| size | objects | masks->flows cellplug | Cellpose | ratio "
        "| flows->masks cellplug | Cellpose | ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in res["sizes"]:
        s = r["seconds"]
        lines.append(
            f"| {r['size']}^2 | {r['objects']} | {s['ours_m2f']:.3f} | {s['cellpose_m2f']:.3f} "
            f"| {r['ratio_m2f']:.1f}x | {s['ours_f2m']:.3f} | {s['cellpose_f2m']:.3f} "
            f"| {r['ratio_f2m']:.1f}x |"
        )
    sp = res.get("sparse")
    if sp:
        s = sp["seconds"]
        lines += [
            "",
            f"Sparse real images (a {sp['size']}^2 mosaic of dsb2018 validation masks, "
            f"{sp['objects']} objects, {100 * sp['foreground_fraction']:.1f} % foreground): "
            f"flows->masks {s['ours_f2m']:.3f} s on the foreground pixels' list "
            f"({s['ours_whole_image_f2m']:.3f} s with the whole-image steps) vs Cellpose "
            f"{s['cellpose_f2m']:.3f} s: {sp['ratio_f2m']:.1f}x "
            f"({sp['ratio_f2m_whole_image']:.1f}x); same labels both ways: "
            f"{sp['same_labels_both_ways']}; AP@0.5 vs Cellpose "
            f"{sp['check_ap50_f2m_vs_cellpose']:.4f}.",
        ]
    j = res["jit"]["empty_cache"]
    jc = res["jit"]["filled_cache"]
    mem = res["memory"]
    short = [
        f"{step} at {r['size']}^2 ({r['ratio_' + key]:.1f}x)"
        for r in res["sizes"]
        for key, step in (("m2f", "masks->flows"), ("f2m", "flows->masks"))
        if r["ratio_" + key] < GOAL
    ]
    lines += [
        "",
        f"Goal, both steps at least {GOAL:g}x faster: "
        + ("met at every size." if not short else "not met for " + ", ".join(short) + "."),
        "",
        f"First-call JIT compilation (fresh process, empty NUMBA_CACHE_DIR): masks->flows "
        f"{j['jit_m2f']:.1f} s, flows->masks {j['jit_f2m']:.1f} s (import {j['import']:.1f} s). "
        f"With the cache filled: {jc['jit_m2f']:.2f} s and {jc['jit_f2m']:.2f} s "
        f"(import {jc['import']:.1f} s).",
        "",
        f"Peak memory of flows->masks at {mem['size']}^2 ({mem['objects']} objects, "
        f"{mem['seconds']:.1f} s): {mem['peak_minus_baseline'] / 2**20:.0f} MiB above the "
        f"process baseline after imports (inputs included: {mem['inputs'] / 2**20:.0f} MiB); "
        f"process peak {mem['peak_rss'] / 2**20:.0f} MiB. Limit 2048 MiB: "
        f"{'passed' if mem['passed'] else 'FAILED'}.",
        "",
        "Other work on the machine (see the load averages) slows both libraries alike; the "
        "ratios come from one run with alternating measurements. "
        + (res["note"] + " " if res.get("note") else "")
        + "Rerun: `nox -s bench` or `python benchmarks/bench_flows.py`.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    ap.add_argument("--no-memory", action="store_true", help="skip the 4096^2 memory check")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_flows.json")
    ap.add_argument("--note", default="", help="context for the results, e.g. machine load")
    args = ap.parse_args()
    try:
        import torch
        from cellpose import dynamics
    except ImportError:
        print("bench_flows: cellpose is not installed; run `nox -s bench`", file=sys.stderr)
        return 2
    logging.getLogger("cellpose").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
    import numba
    from cellplug_flows import flows_to_masks, masks_to_flows

    info = machine()
    # warm-up: compile / load both libraries' numba code
    small = synthetic_cells((128, 128), DIAMETER, seed=0)
    cp_small = np.where(small > 0, 5.0, -5.0).astype(np.float32)
    fl_small = masks_to_flows(small)
    flows_to_masks(fl_small, cp_small)
    dynamics.masks_to_flows(small)
    dynamics.resize_and_compute_masks(5.0 * fl_small, cp_small)

    res: dict = {
        "description": "seconds per image, cellplug_flows vs cellpose 3.1.1.2; "
        "see benchmarks/bench_flows.py",
        "machine": info,
        "versions": versions("cellplug", "cellpose", "numpy", "numba", "torch"),
        "threads": {"numba": numba.get_num_threads(), "torch": torch.get_num_threads()},
        "goal_ratio": GOAL,
        "note": args.note,
        "sizes": [],
    }
    print(
        f"{'size':>6} {'objects':>8} | {'m2f ours':>9} {'cellpose':>9} {'ratio':>6} | "
        f"{'f2m ours':>9} {'cellpose':>9} {'ratio':>6}"
    )
    for n in args.sizes:
        r = bench_size(n, REPEATS.get(n, 1), dynamics)
        res["sizes"].append(r)
        s = r["seconds"]
        print(
            f"{n:>6} {r['objects']:>8} | {s['ours_m2f']:>9.3f} {s['cellpose_m2f']:>9.3f} "
            f"{r['ratio_m2f']:>5.1f}x | {s['ours_f2m']:>9.3f} {s['cellpose_f2m']:>9.3f} "
            f"{r['ratio_f2m']:>5.1f}x",
            flush=True,
        )
    res["sparse"] = sp = bench_sparse(dynamics)
    if sp:
        print(f"sparse {sp['size']}^2 ({sp['objects']} objects): flows->masks "
              f"{sp['seconds']['ours_f2m']:.3f} s vs Cellpose {sp['seconds']['cellpose_f2m']:.3f}"
              f" s = {sp['ratio_f2m']:.1f}x (whole-image steps {sp['ratio_f2m_whole_image']:.1f}x)",
              flush=True)
    res["jit"] = jit_times()
    j = res["jit"]["empty_cache"]
    print(
        f"JIT (empty cache): masks->flows {j['jit_m2f']:.1f} s, flows->masks "
        f"{j['jit_f2m']:.1f} s, import {j['import']:.1f} s",
        flush=True,
    )
    if not args.no_memory:
        res["memory"] = mem = peak_memory(MEMORY_SIZE)
        print(
            f"peak memory flows->masks {MEMORY_SIZE}^2: "
            f"{mem['peak_minus_baseline'] / 2**20:.0f} MiB above baseline "
            f"(process peak {mem['peak_rss'] / 2**20:.0f} MiB, {mem['seconds']:.1f} s)"
        )
    res["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    res["goal_met"] = all(min(r["ratio_m2f"], r["ratio_f2m"]) >= GOAL for r in res["sizes"])
    write_json(args.out, res)
    if "memory" in res and args.out.suffix == ".json":
        args.out.with_suffix(".md").write_text(markdown(res))
    print(f"written {args.out}")
    if "memory" in res and not res["memory"]["passed"]:
        print("FAILED: peak memory above 2 GiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
