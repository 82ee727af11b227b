"""Seconds per image: RunCellplug inside headless CellProfiler vs `cellplug segment` (issue 19).

Both run the bundled generalist with default settings on the same grayscale images:

- CellProfiler: ``cellprofiler -c -r -p bridges/cellprofiler/examples/segment_nuclei.cppipe``
  (NamesAndTypes -> RunCellplug -> MeasureObjectSizeShape -> ExportToSpreadsheet); the module's
  seconds per image are the wall times CellProfiler logs for it ("Image # N, module
  RunCellplug ...: Wall_time"), i.e. the module's whole run(): CellProfiler image in,
  segmentation, objects and measurements out;
- CLI: ``cellplug segment IMAGES --json``; its seconds per image are the "seconds" of
  summary.json (Segmenter.segment on the image read from the file).

The module loads the model during its first image set (the CLI before its first image), so the
overhead is computed on the images after the first; the first is reported on its own. Each
command runs ``--repeats`` times, alternating, and each image keeps its fastest time (the
machine is shared). Object counts must agree. Results: benchmarks/results/bench_cellprofiler.json.

Run it in an environment with CellProfiler and the bridge (the nox session `cellprofiler`):

    .nox/cellprofiler/bin/python benchmarks/bench_cellprofiler.py [--limit 12] [--repeats 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
from _common import REPO, RESULTS, data_root, machine, validation_images, versions, write_json

BIN = Path(sys.executable).parent
PIPELINE = REPO / "bridges" / "cellprofiler" / "examples" / "segment_nuclei.cppipe"
MODULE_LINE = re.compile(r"Image # (\d+), module RunCellplug # \d+: CPU_time = ([\d.]+) secs, "
                         r"Wall_time = ([\d.]+) secs")


def pick_images(limit: int) -> list[Path]:
    """Grayscale 8/16-bit images of the generalist's validation split (or the repository's
    test images when ../shared/data is missing)."""
    try:
        candidates = [img for img, _, _ in validation_images()]
    except OSError:
        candidates = [REPO / "examples" / "nuclei.tif"] + sorted(
            p for p in (REPO / "tests" / "data").glob("*.tif") if not p.stem.endswith("_masks"))
    out = []
    for path in candidates:
        data = tifffile.imread(path)
        if data.ndim == 2 and data.dtype in (np.uint8, np.uint16):
            out.append(path)
        if len(out) == limit:
            break
    return out


def run_cellprofiler(inp: Path, out: Path, plugins: Path) -> tuple[dict[str, float], dict, float]:
    """Per file: module wall seconds; per file: object count; whole-process seconds."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    t0 = time.perf_counter()
    proc = subprocess.run([str(BIN / "cellprofiler"), "-c", "-r", "-p", str(PIPELINE),
                           "--plugins-directory", str(plugins), "-i", str(inp), "-o", str(out),
                           "--enable-readers", "imageio_reader"],
                          capture_output=True, text=True)
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"cellprofiler failed:\n{proc.stderr[-3000:]}")
    wall = {int(n): float(w) for n, _, w in MODULE_LINE.findall(proc.stderr)}
    if not wall:  # e.g. the plugin did not load (the bridge is not installed here)
        raise SystemExit(f"RunCellplug did not run in CellProfiler:\n{proc.stderr[-3000:]}")
    with open(out / "MyExpt_Image.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    names = {int(r["ImageNumber"]): r["FileName_DNA"] for r in rows}
    counts = {r["FileName_DNA"]: int(float(r["Count_Nuclei"])) for r in rows}
    return {names[n]: s for n, s in wall.items()}, counts, total


def run_cli(images: list[Path], out: Path) -> tuple[dict[str, float], dict, float]:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run([str(BIN / "cellplug"), "segment", *map(str, images), "--out",
                           str(out), "--json", "-q"], capture_output=True, text=True)
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"cellplug segment failed:\n{proc.stderr[-3000:]}")
    doc = json.loads(proc.stdout)
    seconds = {Path(e["image"]).name: e["seconds"] for e in doc["images"]}
    counts = {Path(e["image"]).name: e["objects"] for e in doc["images"]}
    return seconds, counts, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_cellprofiler.json")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "bridges" / "cellprofiler" / "src"))
    from cellplug_cellprofiler.plugin import install_plugin

    images = pick_images(args.limit)
    work = Path(tempfile.mkdtemp(prefix="bench-cellprofiler-"))
    try:
        plugins, inp = work / "plugins", work / "in"
        install_plugin(plugins)
        inp.mkdir()
        for path in images:
            shutil.copy(path, inp / path.name)
        copies = sorted(inp.iterdir())  # CellProfiler's image sets follow the file names
        cp_runs, cli_runs = [], []
        for _ in range(args.repeats):
            cp_runs.append(run_cellprofiler(inp, work / "cp_out", plugins))
            cli_runs.append(run_cli(copies, work / "cli_out"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if cp_runs[0][1] != cli_runs[0][1]:
        raise SystemExit(f"object counts differ: {cp_runs[0][1]} vs {cli_runs[0][1]}")
    source = {p.name: p for p in images}
    rows = []
    for i, name in enumerate(p.name for p in copies):
        shape = tifffile.imread(source[name]).shape
        rows.append({
            "image": name, "shape": list(shape), "objects": cli_runs[0][1][name],
            "module_s": min(r[0][name] for r in cp_runs),
            "cli_s": min(r[0][name] for r in cli_runs),
            "first": i == 0,
        })
    steady = [r for r in rows if not r["first"]]
    module_s = sum(r["module_s"] for r in steady)
    cli_s = sum(r["cli_s"] for r in steady)
    summary = {
        "images": len(rows),
        "module_s_per_image": round(module_s / len(steady), 3),
        "cli_s_per_image": round(cli_s / len(steady), 3),
        "overhead": round(module_s / cli_s - 1, 4),
        "median_ratio": round(float(np.median([r["module_s"] / r["cli_s"] for r in steady])), 4),
        "overhead_goal": 0.10,
        "first_image": {"image": rows[0]["image"], "module_s": rows[0]["module_s"],
                        "cli_s": rows[0]["cli_s"],
                        "note": "the module loads the model here; the CLI loads it before"},
        "process_s": {"cellprofiler": round(min(r[2] for r in cp_runs), 2),
                      "cellplug_segment": round(min(r[2] for r in cli_runs), 2)},
    }
    doc = {
        "what": "seconds per image, RunCellplug in headless CellProfiler vs cellplug segment, "
                "same images, generalist, default settings; module seconds = CellProfiler's "
                "logged wall time of the module (0.01 s resolution); overhead over the images "
                "after the first; fastest of the repeats per image",
        "command": "python benchmarks/bench_cellprofiler.py " + " ".join(sys.argv[1:]),
        "data": str(data_root()),
        "repeats": args.repeats,
        "machine": machine(),
        "versions": versions("cellplug", "torch", "numpy", "scipy", "skimage",
                             "cellprofiler_core", "cellprofiler"),
        "summary": summary,
        "rows": rows,
    }
    write_json(args.out, doc)
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
