"""``--model auto`` against the generalist on the validation split: accuracy and the cost of
choosing.

Every validation image (dsb2018 and Usiigaci, ``training/generalist/val_stems.txt``; the zoo
was built from the other images) is segmented with no diameter given, once by the generalist
and once by ``auto`` over the installed zoo. Reported:

- mean AP@0.5 per image type (the ``modality`` column), dsb2018 overall and Usiigaci, for both;
- which model ``auto`` chose for which type (images and AP@0.5 per cell);
- the cost of choosing: ``auto``'s time over the generalist's on the same images in the same
  run (the reference's style pass and diameter are reused, so the extra work is the choice
  itself and the loading of the chosen models), per image and in total.

Usage (``nox -s zoo -- --zoo DIR`` runs it)::

    python benchmarks/zoo.py --zoo runs/zoo [--limit N] [--precision auto|fp32] [--threads 2]

Results: ``benchmarks/results/zoo.json`` and ``zoo.md`` (with the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, validation_images  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=None, help="subsample (a quick check)")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--zoo", type=Path, default=None,
                    help="folder of zoo models (cellplug zoo build --out DIR); default: the "
                         "installed ones")
    ap.add_argument("--out", type=Path, default=RESULTS / "zoo.json")
    args = ap.parse_args()
    if args.zoo is not None:  # the user's model folder: where auto looks besides plugins
        os.environ["CELLPLUG_MODELS"] = str(args.zoo.resolve())

    import tifffile
    import torch

    from cellplug.metrics import match_counts
    from cellplug.segmenter import Segmenter, SegmentOptions
    from cellplug.selection import AutoSegmenter, routed_reason

    torch.set_num_threads(args.threads)
    items = validation_images(args.limit)
    opts = SegmentOptions(precision=args.precision)
    t_load = time.perf_counter()
    generalist = Segmenter.from_model("generalist", threads=args.threads)
    auto = AutoSegmenter.from_zoo(threads=args.threads)
    for name, info in auto.candidates.items():  # loaded up front, timed apart: a one-off cost
        if routed_reason(info) is None:  # a routed cluster's images go to the reference
            auto.segmenter_for(name)
    load_seconds = time.perf_counter() - t_load
    print(f"zoo: {sorted(auto.candidates)}; {len(items)} images", flush=True)
    generalist.segment(tifffile.imread(items[0][0]), opts)  # warm-up (numba, oneDNN)

    rows = []
    for image_path, labels_path, modality in items:
        image, truth = tifffile.imread(image_path), tifffile.imread(labels_path)
        t0 = time.perf_counter()
        g = generalist.segment(image, opts)
        t1 = time.perf_counter()
        a, choice = auto.segment(image, opts)
        t2 = time.perf_counter()
        row = {
            "image": image_path.stem[:16], "source": image_path.parent.name,
            "modality": modality, "model": choice.model, "nearest": choice.nearest,
            "routed": choice.routed is not None,
            "similarity": None if choice.similarity is None else round(choice.similarity, 4),
            "fallback": choice.fallback,
            "ap50_generalist": round(float(match_counts(truth, g.labels).ap[0]), 4),
            "ap50_auto": round(float(match_counts(truth, a.labels).ap[0]), 4),
            "seconds_generalist": round(t1 - t0, 3), "seconds_auto": round(t2 - t1, 3),
            "seconds_choose": round(a.timings.get("choose", 0.0), 5),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    def mean(sel, key):
        return round(float(np.mean([r[key] for r in sel])), 4) if sel else None

    groups = {"dsb2018 overall": [r for r in rows if r["source"] == "dsb2018"]}
    for m in sorted({r["modality"] for r in rows}):
        groups[m] = [r for r in rows if r["modality"] == m]
    table = {g: {"n": len(sel), "generalist": mean(sel, "ap50_generalist"),
                 "auto": mean(sel, "ap50_auto")} for g, sel in groups.items()}
    for v in table.values():
        v["difference"] = (round(v["auto"] - v["generalist"], 4)
                           if v["auto"] is not None else None)
    chosen: dict[str, dict[str, dict]] = {}
    for r in rows:
        key = r["model"] + (f" (routed from {r['nearest']})" if r.get("routed") else
                            " (fallback)" if r["fallback"] else "")
        cell = chosen.setdefault(key, {}).setdefault(r["modality"], [])
        cell.append(r)
    by_model = {m: {mod: {"n": len(c), "ap50_auto": mean(c, "ap50_auto"),
                          "ap50_generalist": mean(c, "ap50_generalist")}
                    for mod, c in cells.items()} for m, cells in chosen.items()}
    tg = sum(r["seconds_generalist"] for r in rows)
    ta = sum(r["seconds_auto"] for r in rows)
    cost = {
        "seconds_generalist": round(tg, 2), "seconds_auto": round(ta, 2),
        "extra_fraction_total": round(ta / tg - 1, 4),
        "extra_fraction_median_image": round(float(np.median(
            [r["seconds_auto"] / r["seconds_generalist"] - 1 for r in rows])), 4),
        "choose_seconds_total": round(sum(r["seconds_choose"] for r in rows), 4),
        "zoo_load_seconds_once": round(load_seconds, 2),
    }
    zoo = {n: {k: m.metadata["zoo"].get(k)
               for k in ("cluster", "n_images", "min_similarity", "composition", "mix", "gate",
                         "route_to_reference")}
           for n, m in auto.candidates.items()}
    doc = {"zoo": zoo, "precision": args.precision, "threads": args.threads,
           "limit": args.limit, "table": table, "by_model": by_model, "cost": cost,
           "rows": rows, "machine": machine()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    args.out.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc))


def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = ["# `--model auto` against the generalist", "",
             f"Validation split, no diameter given, precision {doc['precision']}, "
             f"{doc['threads']} threads; {m.get('cpu_model', '')}, {m.get('logical_cpus')} logical "
             f"CPUs ({m.get('date', '')}).", "",
             "| images | n | generalist AP@0.5 | auto AP@0.5 | difference |",
             "|---|---|---|---|---|"]
    for g, v in doc["table"].items():
        lines.append(f"| {g} | {v['n']} | {v['generalist']:.3f} | {v['auto']:.3f} | "
                     f"{v['difference']:+.3f} |")
    mods = sorted({mod for cells in doc["by_model"].values() for mod in cells})
    lines += ["", "Chosen model × image type (images; AP@0.5 auto / generalist):", "",
              "| model | " + " | ".join(mods) + " |", "|---|" + "---|" * len(mods)]
    for model, cells in sorted(doc["by_model"].items()):
        lines.append(f"| {model} | " + " | ".join(
            f"{cells[x]['n']}; {cells[x]['ap50_auto']:.3f} / {cells[x]['ap50_generalist']:.3f}"
            if x in cells else "" for x in mods) + " |")
    c = doc["cost"]
    lines += ["", f"Cost of choosing: auto took {c['seconds_auto']:.1f} s, the generalist "
              f"{c['seconds_generalist']:.1f} s on the same images "
              f"({c['extra_fraction_total']:+.1%} in total, {c['extra_fraction_median_image']:+.1%}"
              f" for the median image); the choice itself {c['choose_seconds_total']:.3f} s in "
              f"all; loading the zoo once {c['zoo_load_seconds_once']:.1f} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
