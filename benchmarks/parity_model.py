"""The bundled model under cellplug and under Cellpose 3.1.1.2: same weights, same AP.

Segments the validation split of the generalist (training/generalist/val_stems.txt, images
never trained on) with no diameter given (each side uses its size model), once with cellplug
and once with Cellpose 3.1.1.2 loading the very same ``.pth`` and a ``_size.npy`` written from
our metadata. cellplug runs twice: with its defaults (bfloat16 where the CPU has it) and in
float32 (``precision="fp32"``, the Cellpose-identical path); where the default already is
float32 (a CPU without native bfloat16) its one run serves as both.

The check (issue 6): on each split (dsb2018, usiigaci_phc) cellplug's default AP@0.5 is within
0.01 of Cellpose's. Also reported, not gated: float32 per split, and both per image type with
the standard error of the per-image paired differences. Per-image differences come from
borderline masks (sd about 0.02 over the split), so a group of n images moves by about
0.02 / sqrt(n) by chance (0.005-0.008 for the 14 H&E and 7 phase-contrast images): a 0.01
tolerance on the small groups measures that noise more than the conventions.
Run by ``nox -s parity``; needs ../shared/data (or $CELLPLUG_DATA).

    python benchmarks/parity_model.py [MODEL_PTH] [--limit N] [--out RESULTS_JSON]
    python benchmarks/parity_model.py --summarize RESULTS_JSON   # recompute the summary
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, data_root, machine, validation_images  # noqa: E402

DATA = data_root()
TOLERANCE = 0.01


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "model", nargs="?", default=None, help="model .pth (default: bundled generalist)"
    )
    ap.add_argument("--limit", type=int, default=None, help="subsample the split (quick check)")
    ap.add_argument(
        "--summarize",
        type=Path,
        default=None,
        metavar="RESULTS_JSON",
        help="recompute the summary and verdict from a saved run's per-image rows",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=RESULTS / "parity_model.json",
        help="results file (default: benchmarks/results/parity_model.json, the bundled model's)",
    )
    args = ap.parse_args()
    if args.summarize is not None:
        saved = json.loads(args.summarize.read_text())
        return report(saved["model"], saved["images"], out_path=None)
    if not (DATA / "dsb2018").is_dir():
        print(f"parity_model: skipped, no data at {DATA}")
        return 0

    from cellpose import models as cp_models

    from cellplug.inference import resolve_precision
    from cellplug.io import read_image
    from cellplug.metrics import match_counts
    from cellplug.models import resolve_model
    from cellplug.segmenter import Segmenter

    info = resolve_model(args.model)
    if info.size_model is None:
        print(f"{info.weights}: model has no size model", file=sys.stderr)
        return 1
    ours = Segmenter.from_model(str(info.weights))
    tmp = Path(tempfile.mkdtemp())
    size_path = tmp / "size.npy"
    sm = info.size_model
    np.save(size_path, {"A": sm.A, "smean": sm.smean, "ymean": sm.ymean, "diam_mean": sm.diam_mean})
    cp = cp_models.CellposeModel(pretrained_model=str(info.weights), gpu=False)
    cp_size = cp_models.SizeModel(cp, pretrained_size=str(size_path))

    default_precision = resolve_precision("auto")
    run = {"default_precision": default_precision, "machine": machine()}  # load before the run
    images = validation_images(args.limit)
    rows = []
    for img_path, gt_path, group in images:
        image = read_image(img_path)
        gt = tifffile.imread(gt_path)
        t0 = time.perf_counter()
        mine = ours.segment(image, diameter=0)
        t1 = time.perf_counter()
        if default_precision == "fp32":
            mine32 = mine  # the default already is the float32 path
        else:
            mine32 = ours.segment(image, diameter=0, precision="fp32")
        t1b = time.perf_counter()
        diam = float(np.asarray(cp_size.eval(image, channels=[0, 0])[0]))
        theirs = cp.eval(image, channels=[0, 0], diameter=diam)[0]
        t2 = time.perf_counter()
        row = {
            "image": img_path.stem,
            "group": group,
            "ap50_cellplug": float(match_counts(gt, mine.labels, [0.5]).ap[0]),
            "ap50_cellplug_fp32": float(match_counts(gt, mine32.labels, [0.5]).ap[0]),
            "ap50_cellpose": float(match_counts(gt, theirs.astype(np.int64), [0.5]).ap[0]),
            # the two segmentations against each other (Cellpose's as truth)
            "ap50_vs_cellpose": float(
                match_counts(theirs.astype(np.int64), mine.labels, [0.5]).ap[0]
            ),
            "diam_cellplug": round(mine.diameter, 2),
            "diam_cellplug_fp32": round(mine32.diameter, 2),
            "diam_cellpose": round(diam, 2),
            "s_cellplug": round(t1 - t0, 2),
            "s_cellplug_fp32": round(t1b - t1 if mine32 is not mine else t1 - t0, 2),
            "s_cellpose": round(t2 - t1b, 2),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    return report(str(info.weights), rows, out_path=args.out, run=run)


def report(model: str, rows: list[dict], out_path: Path | None, run: dict | None = None) -> int:
    """Print the per-group table and verdict, return the exit code.

    The full result goes to ``out_path``; ``None`` (re-summarizing a saved file) writes
    nothing, so summarizing one run cannot overwrite another's committed results.
    """
    summary = {}
    ok = True
    groups = sorted({r["group"] for r in rows})
    dsb = [g for g in groups if g != "phase_contrast"]
    splits = {"dsb2018 (all)": dsb, "usiigaci_phc": ["phase_contrast"]}
    sets = {g: [g] for g in groups} | splits
    print(
        f"\n{'group':<20} {'n':>3} {'cellplug':>9} {'fp32':>7} {'cellpose':>9} {'diff':>7}"
        f" {'diff fp32':>9} {'se':>6} {'AP50 vs each other':>19}"
    )
    for name, members in sets.items():
        sel = [r for r in rows if r["group"] in members]
        if not sel:
            continue
        a = float(np.mean([r["ap50_cellplug"] for r in sel]))
        a32 = float(np.mean([r["ap50_cellplug_fp32"] for r in sel]))
        b = float(np.mean([r["ap50_cellpose"] for r in sel]))
        agree = float(np.mean([r["ap50_vs_cellpose"] for r in sel]))
        d = np.array([r["ap50_cellplug"] - r["ap50_cellpose"] for r in sel])
        se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
        gated = name in splits
        summary[name] = {
            "n": len(sel),
            "ap50_cellplug_vs_cellpose": round(agree, 4),
            "ap50_cellplug": round(a, 4),
            "ap50_cellplug_fp32": round(a32, 4),
            "ap50_cellpose": round(b, 4),
            "diff": round(a - b, 4),
            "diff_fp32": round(a32 - b, 4),
            "diff_standard_error": round(se, 4),
            "gated": gated,
        }
        if gated:
            ok &= abs(a - b) <= TOLERANCE
        print(
            f"{name:<20} {len(sel):>3} {a:>9.4f} {a32:>7.4f} {b:>9.4f} {a - b:>+7.4f}"
            f" {a32 - b:>+9.4f} {se:>6.4f} {agree:>19.4f}{'  (gated)' if gated else ''}"
        )
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out = {
            "model": model,
            **(run or {}),
            "tolerance": TOLERANCE,
            "passed": bool(ok),
            "summary": summary,
            "images": rows,
        }
        out_path.write_text(json.dumps(out, indent=2) + "\n")
    print("PASS" if ok else "FAIL", f"(default per split: |diff| <= {TOLERANCE})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
