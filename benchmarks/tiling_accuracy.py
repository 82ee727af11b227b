"""Does the grid tiling (``tile="grid"``, what block-wise segmentation computes) segment as
well as Cellpose's tiling? AP@0.5 against the ground truth on the validation split.

Each image's diameter is estimated once (the size model, Cellpose's tiling), then the image
is segmented at that diameter with both tilings. Reported: mean AP@0.5 per source and image
type for each, and the agreement between the two (AP@0.5 of one against the other).

    python benchmarks/tiling_accuracy.py [--limit N] [--precision auto|fp32] [--threads 2]

Results: ``benchmarks/results/tiling_accuracy.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, validation_images, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "tiling_accuracy.json")
    args = ap.parse_args()

    import tifffile

    from cellplug.metrics import match_counts
    from cellplug.segmenter import Segmenter, SegmentOptions

    seg = Segmenter.from_model(None, threads=args.threads)
    rows = []
    for image_path, labels_path, modality in validation_images(args.limit):
        image, truth = tifffile.imread(image_path), tifffile.imread(labels_path)
        cellpose = SegmentOptions(precision=args.precision, tile=True)
        x = seg.prepare(image, cellpose)
        d, _ = seg.size_and_style(x, cellpose)
        a = seg.segment_prepared(x, cellpose, d).labels
        grid = SegmentOptions(precision=args.precision, tile="grid")
        b = seg.segment_prepared(x, grid, d).labels
        row = {"image": image_path.stem[:16], "source": image_path.parent.name,
               "modality": modality, "diameter": round(d, 2),
               "ap50_cellpose_tiles": round(float(match_counts(truth, a).ap[0]), 4),
               "ap50_grid": round(float(match_counts(truth, b).ap[0]), 4),
               "ap50_grid_vs_cellpose_tiles": round(float(match_counts(a, b).ap[0]), 4)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    groups = {"dsb2018": [r for r in rows if r["source"] == "dsb2018"],
              "usiigaci_phc": [r for r in rows if r["source"] == "usiigaci_phc"]}
    for m in sorted({r["modality"] for r in rows}):
        groups[m] = [r for r in rows if r["modality"] == m]
    keys = ("ap50_cellpose_tiles", "ap50_grid", "ap50_grid_vs_cellpose_tiles")
    table = {g: {"n": len(sel), **{k: round(float(np.mean([r[k] for r in sel])), 4)
                                   for k in keys}}
             for g, sel in groups.items() if sel}
    doc = {"precision": args.precision, "threads": args.threads, "table": table, "rows": rows,
           "machine": machine()}
    write_json(args.out, doc)
    m = doc["machine"]
    lines = ["# Grid tiling vs Cellpose's tiling (validation split, ground truth)", "",
             f"Each image's diameter estimated once, then segmented with both tilings; "
             f"precision {args.precision}, {args.threads} threads; {m.get('cpu_model', '')} "
             f"({m.get('date', '')}).", "",
             "| images | n | Cellpose tiles AP@0.5 | grid AP@0.5 | difference | grid vs "
             "Cellpose tiles |", "|---|---:|---:|---:|---:|---:|"]
    for g, v in table.items():
        lines.append(f"| {g} | {v['n']} | {v['ap50_cellpose_tiles']:.3f} | "
                     f"{v['ap50_grid']:.3f} | "
                     f"{v['ap50_grid'] - v['ap50_cellpose_tiles']:+.3f} | "
                     f"{v['ap50_grid_vs_cellpose_tiles']:.3f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
