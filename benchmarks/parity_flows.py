"""Parity of the flow engine (cellplug_flows) with Cellpose 3.1.1.2.

Run with ``nox -s parity`` (or ``python benchmarks/parity_flows.py`` in an environment with
cellplug, ``cellpose==3.1.1.2`` and ``torch==2.13.0``). Results are printed as a table and
written to ``benchmarks/results/parity_flows.json``; the exit code is 1 if a check fails.

Checks, per dataset:

(a) ``cosine``: mean cosine similarity between ``cellplug_flows.masks_to_flows`` and
    ``cellpose.dynamics.masks_to_flows``, over all object pixels of the dataset (a pixel
    where both flows are zero counts as 1, where exactly one is zero as 0). Threshold 0.99.
(b) ``roundtrip``: labels -> our flows -> our ``flows_to_masks`` (cell probability +5
    inside objects, -5 outside, default parameters) recovers the labels: mean over images
    of AP at IoU 0.5. Threshold 0.99.
(c) ``vs_cellpose``: our ``flows_to_masks(flows, cellprob)`` against Cellpose's
    ``dynamics.resize_and_compute_masks(5 * flows, cellprob, niter=200)`` (same defaults:
    cellprob_threshold 0, flow_threshold 0.4, min_size 15, max_size_fraction 0.4; Cellpose
    takes flows times 5), Cellpose's masks as truth: mean over images of AP at IoU 0.5.
    Threshold 0.98. Two inputs: the clean (flows, cellprob) of (b), and ``vs_cellpose_noisy``,
    a deliberately poor pair (smoothed noise on the flows growing from left to right, a
    blurred noisy cell probability; see ``perturb``), so that the flow-error check, seeding,
    hole filling and thresholds all see imperfect input; about half of the objects survive.

Datasets:

* ``dsb2018``: 30 label images of ``<data>/dsb2018`` (Kaggle DSB 2018, CC0), 10 per
  modality of its ``metadata.csv`` (fluorescence, histology_or_color, brightfield): within a
  modality, stems sorted alphabetically, the 10 at evenly spaced ranks
  ``round(linspace(0, n - 1, 10))``.
* ``usiigaci_phc``: 4 label images of ``<data>/usiigaci_phc`` (phase-contrast whole cells,
  large and irregular), stems sorted alphabetically, ranks ``round(linspace(0, n - 1, 4))``.
* ``synthetic``: 6 crowded images (touching random ellipses cut by a Voronoi tessellation,
  ``_common.synthetic_cells``), 289 to 1849 objects each, one a pure tessellation without
  background, two with non-contiguous ids.

``<data>`` is ``$CELLPLUG_DATA`` or ``../shared/data`` relative to the repository root. If
it is absent, the real-data rows are skipped with a message (exit 0 if the synthetic rows
pass).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
from _common import (
    RESULTS,
    data_root,
    machine,
    metadata_rows,
    synthetic_cells,
    versions,
    write_json,
)

THRESHOLDS = {"cosine": 0.99, "roundtrip": 0.99, "vs_cellpose": 0.98, "vs_cellpose_noisy": 0.98}
DSB_PER_MODALITY = 10
USIIGACI_N = 4
SYNTHETIC = [  # (shape, diameter, seed, fill, non-contiguous ids)
    ((512, 512), 30.0, 0, False, False),
    ((512, 512), 24.0, 1, False, True),
    ((512, 512), 12.0, 2, False, False),
    ((512, 512), 20.0, 3, True, False),
    ((640, 768), 16.0, 4, False, True),
    ((512, 512), 40.0, 5, False, False),
]


def evenly_spaced(items: list, k: int) -> list:
    if len(items) <= k:
        return list(items)
    return [items[int(i)] for i in np.round(np.linspace(0, len(items) - 1, k))]


def dsb_subset(root: Path) -> list[tuple[str, str]]:
    """[(stem, modality)] of the fixed dsb2018 subset (see the module docstring)."""
    by_mod: dict[str, list[str]] = {}
    for row in metadata_rows(root):
        by_mod.setdefault(row["modality"], []).append(row["stem"])
    out = []
    for mod in sorted(by_mod):
        out += [(s, mod) for s in evenly_spaced(sorted(by_mod[mod]), DSB_PER_MODALITY)]
    return out


def load_datasets(root: Path) -> tuple[dict[str, list[tuple[str, np.ndarray]]], list[str]]:
    import tifffile

    sets: dict[str, list[tuple[str, np.ndarray]]] = {}
    notes = []
    dsb = root / "dsb2018"
    if (dsb / "metadata.csv").is_file():
        sets["dsb2018"] = [
            (f"{mod}/{stem}", tifffile.imread(dsb / f"{stem}_masks.tif").astype(np.int32))
            for stem, mod in dsb_subset(dsb)
        ]
    else:
        notes.append(f"dsb2018 not found under {root}: skipped")
    usi = root / "usiigaci_phc"
    if usi.is_dir():
        stems = sorted(p.name[: -len("_masks.tif")] for p in usi.glob("*_masks.tif"))
        sets["usiigaci_phc"] = [
            (s, tifffile.imread(usi / f"{s}_masks.tif").astype(np.int32))
            for s in evenly_spaced(stems, USIIGACI_N)
        ]
    else:
        notes.append(f"usiigaci_phc not found under {root}: skipped")
    synth = []
    for shape, diam, seed, fill, noncontig in SYNTHETIC:
        lab = synthetic_cells(shape, diam, seed, fill=fill)
        name = f"{shape[0]}x{shape[1]}_d{diam:g}_s{seed}" + ("_fill" if fill else "")
        if noncontig:  # random distinct ids with gaps, in random order
            rng = np.random.default_rng(100 + seed)
            n = int(lab.max())
            ids = np.concatenate([[0], rng.choice(np.arange(1, 20 * n), n, replace=False)])
            lab = ids[lab].astype(np.int32)
            name += "_ids"
        synth.append((name, lab))
    sets["synthetic"] = synth
    return sets, notes


def cosine_inside(a: np.ndarray, b: np.ndarray, inside: np.ndarray) -> tuple[float, int]:
    """(sum of per-pixel cosine similarities over ``inside``, number of pixels)."""
    a = a[:, inside].astype(np.float64)
    b = b[:, inside].astype(np.float64)
    na = np.hypot(a[0], a[1])
    nb = np.hypot(b[0], b[1])
    za, zb = na < 1e-6, nb < 1e-6
    cos = np.where(za | zb, (za & zb).astype(float), (a * b).sum(0) / np.maximum(na * nb, 1e-300))
    return float(cos.sum()), int(inside.sum())


def perturb(labels: np.ndarray, flows: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A network-like, deliberately poor (flows, cellprob) pair.

    Flows: plus Gaussian noise smoothed with sigma 1.5, whose std grows from 0.1 at the left
    edge to 0.6 at the right edge (per component), so that objects on the left pass the
    flow-error check (threshold 0.4, about 2 x std^2) and those on the right fail it.
    Cell probability: ``6 * (2 * blurred foreground - 1)`` (sigma 1) plus smoothed noise of
    std 2, which punches holes in objects and bridges gaps between them.
    """
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    noise = np.stack([gaussian_filter(c, 1.5) for c in rng.standard_normal(flows.shape)])
    noise *= np.linspace(0.1, 0.6, labels.shape[1])[None, None, :] / noise.std()
    fg = gaussian_filter((labels > 0).astype(np.float64), 1.0)
    cp_noise = gaussian_filter(rng.standard_normal(labels.shape), 1.0)
    cellprob = 6.0 * (2.0 * fg - 1.0) + cp_noise * (2.0 / cp_noise.std())
    return (flows + noise).astype(np.float32), cellprob.astype(np.float32)


def identical(a: np.ndarray, b: np.ndarray) -> bool:
    """Same partition of the image (equal up to a renumbering of the objects)."""
    if not np.array_equal(a > 0, b > 0):
        return False
    fg = a > 0
    pairs = np.unique(np.stack([a[fg], b[fg]]).astype(np.int64), axis=1)
    return pairs.shape[1] == len(np.unique(a[fg])) == len(np.unique(b[fg]))


def run_image(labels, seed, dynamics, masks_to_flows, flows_to_masks, average_precision):
    th = [0.5, 0.75, 0.9]
    inside = labels > 0
    t0 = time.perf_counter()
    ours = masks_to_flows(labels)
    ref = dynamics.masks_to_flows(labels)
    cos_sum, npx = cosine_inside(ours, ref, inside)
    cellprob = np.where(inside, 5.0, -5.0).astype(np.float32)
    m_ours = flows_to_masks(ours, cellprob)
    m_cp = dynamics.resize_and_compute_masks(5.0 * ours, cellprob, niter=200)
    nflows, ncellprob = perturb(labels, ours, seed)
    n_ours = flows_to_masks(nflows, ncellprob)
    n_cp = dynamics.resize_and_compute_masks(5.0 * nflows, ncellprob, niter=200)
    rt = average_precision(labels, m_ours, th)
    return {
        "n_objects": int(len(np.unique(labels)) - 1),
        "cos_sum": cos_sum,
        "n_pixels": npx,
        "cosine": cos_sum / max(npx, 1),
        "roundtrip": float(rt[0]),
        "roundtrip_ap_050_075_090": [float(v) for v in rt],
        "cellpose_roundtrip": float(average_precision(labels, m_cp.astype(np.int64), th)[0]),
        "vs_cellpose": float(average_precision(m_cp.astype(np.int64), m_ours, th)[0]),
        "vs_cellpose_noisy": float(average_precision(n_cp.astype(np.int64), n_ours, th)[0]),
        "identical": identical(m_ours, m_cp),
        "identical_noisy": identical(n_ours, n_cp),
        "noisy_vs_truth": float(average_precision(labels, n_ours, th)[0]),
        "cellpose_noisy_vs_truth": float(average_precision(labels, n_cp.astype(np.int64), th)[0]),
        "seconds": time.perf_counter() - t0,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS / "parity_flows.json")
    args = ap.parse_args()

    try:
        from cellpose import dynamics
    except ImportError:
        print("parity_flows: cellpose is not installed; run `nox -s parity`", file=sys.stderr)
        return 2
    logging.getLogger("cellpose").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
    from cellplug_flows import flows_to_masks, masks_to_flows

    from cellplug.metrics import average_precision

    root = data_root()
    sets, notes = load_datasets(root)
    for note in notes:
        print(f"parity_flows: {note}")
    summary: dict[str, dict] = {}
    per_image: dict[str, dict] = {}
    failed = []
    for dname, items in sets.items():
        rows = {}
        for name, labels in items:
            seed = zlib.crc32(f"{dname}/{name}".encode())  # noise seed: fixed per image
            rows[name] = run_image(
                labels, seed, dynamics, masks_to_flows, flows_to_masks, average_precision
            )
            r = rows[name]
            print(
                f"  {dname}/{name}: n={r['n_objects']} cos={r['cosine']:.5f} "
                f"rt={r['roundtrip']:.3f} cp={r['vs_cellpose']:.3f} "
                f"noisy={r['vs_cellpose_noisy']:.3f} (vs labels {r['noisy_vs_truth']:.3f}) "
                f"({r['seconds']:.1f}s)",
                flush=True,
            )
        per_image[dname] = rows
        vals = list(rows.values())
        s = {
            "images": len(vals),
            "objects": sum(v["n_objects"] for v in vals),
            "cosine": sum(v["cos_sum"] for v in vals) / max(1, sum(v["n_pixels"] for v in vals)),
        }
        worst = {"cosine": min(v["cosine"] for v in vals)}
        for key in (
            "roundtrip",
            "vs_cellpose",
            "vs_cellpose_noisy",
            "cellpose_roundtrip",
            "noisy_vs_truth",
            "cellpose_noisy_vs_truth",
        ):
            s[key] = float(np.mean([v[key] for v in vals]))
            worst[key] = min(v[key] for v in vals)
        s["worst_image"] = worst
        s["identical_to_cellpose"] = sum(v["identical"] for v in vals)
        s["identical_to_cellpose_noisy"] = sum(v["identical_noisy"] for v in vals)
        s["passed"] = {k: bool(s[k] >= t) for k, t in THRESHOLDS.items()}
        failed += [f"{dname}:{k}" for k, ok in s["passed"].items() if not ok]
        summary[dname] = s

    header = f"{'dataset':<14}{'images':>7}{'objects':>8}  " + "".join(
        f"{k:>20}" for k in THRESHOLDS
    )
    print("\nParity with Cellpose 3.1.1.2 (value / worst image; threshold)")
    print(header)
    for dname, s in summary.items():
        cells = "".join(
            f"{s[k]:>10.4f} / {s['worst_image'][k]:.4f}{'' if s['passed'][k] else '!'}".rjust(20)
            for k in THRESHOLDS
        )
        print(f"{dname:<14}{s['images']:>7}{s['objects']:>8}  {cells}")
    print(f"{'threshold':<31}" + "".join(f"{'>= ' + str(t):>20}" for t in THRESHOLDS.values()))
    for d, s in summary.items():
        print(
            f"{d}: masks identical to Cellpose's on {s['identical_to_cellpose']}/{s['images']} "
            f"clean and {s['identical_to_cellpose_noisy']}/{s['images']} noisy inputs; "
            f"AP@0.5 vs the labels: Cellpose round trip {s['cellpose_roundtrip']:.4f}, noisy "
            f"input ours {s['noisy_vs_truth']:.4f} / Cellpose {s['cellpose_noisy_vs_truth']:.4f}"
        )

    write_json(
        args.out,
        {
            "description": "cellplug_flows vs cellpose 3.1.1.2; see benchmarks/parity_flows.py",
            "thresholds": THRESHOLDS,
            "data_root": str(root),
            "notes": notes,
            "summary": summary,
            "per_image": per_image,
            "failed": failed,
            "machine": machine(),
            "versions": versions("cellplug", "cellpose", "numpy", "numba", "torch", "scipy"),
        },
    )
    print(f"written {args.out}")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    print("all parity checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
