"""Human-in-the-loop benchmark: does fine-tuning on a few corrected images teach a new image type?

As the Cellpose 2.0 paper did, ground truth stands in for a person's corrections. The starting
model has never seen phase contrast: it is trained on dsb2018 only (nuclei; recipe in
training/nuclei/train.sh). It is fine-tuned with the human-in-the-loop recipe
(``cellplug.hitl``, the default of ``cellplug train --base ... --name ...``) on k = 1, 2, 3, 5
"corrected" Usiigaci phase-contrast images (512 x 512 crops of images outside the validation
split, <= 200 ROIs in all), then scored, with no diameter given, on

- the Usiigaci validation images (the new type; goal: AP@0.5 up by >= 0.25), and
- the dsb2018 validation images (the old type; goal: down by <= 0.03).

Usage (``nox -s hitl`` runs it with the default model path)::

    python benchmarks/hitl.py --base runs/nuclei/nuclei.pth [--counts 1 2 3 5] [--replay 16]

With ``--replay N`` (default 16) the fine-tune rehearses N dsb2018 training images
(``train --replay``, recipe ``hitl-replay``); ``--replay 0`` is the plain ``hitl`` recipe.

Results: ``benchmarks/results/hitl.json`` and ``hitl.md`` (with the machine).
"""

from __future__ import annotations

import argparse
import json
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
    training_stems,
    validation_images,
)

CROP = 512
MAX_ROIS = 200


def corrected_images(n: int, seed: int = 0):
    """The ``n`` "corrected" images: 512 x 512 crops of Usiigaci training images (not in the
    validation split), the same ones in the same order for every k."""
    import tifffile

    from cellplug.annotations import Annotation
    from cellplug.segmenter import remove_small_objects

    folder = data_root() / "usiigaci_phc"
    pool = training_stems("usiigaci_phc")
    order = np.random.default_rng(seed).permutation(len(pool))
    out = []
    for i in order[:n]:
        stem = pool[i]
        image = tifffile.imread(folder / f"{stem}.tif")[:CROP, :CROP]
        labels = remove_small_objects(tifffile.imread(folder / f"{stem}_masks.tif")[:CROP, :CROP]
                                      .astype(np.uint32), 1)
        out.append(Annotation(image, labels, f"{stem}_crop", f"{stem}.tif[:{CROP}, :{CROP}]"))
    return out


def replay_images(n: int, seed: int = 0):
    """``n`` dsb2018 training images (the base model's own training data, never the
    validation split), rehearsed during the fine-tune so that nuclei are not forgotten."""
    import tifffile

    from cellplug.annotations import Annotation

    folder = data_root() / "dsb2018"
    pool = training_stems("dsb2018")
    picked = np.random.default_rng(seed).permutation(len(pool))[:n]
    return [Annotation(tifffile.imread(folder / f"{pool[i]}.tif"),
                       tifffile.imread(folder / f"{pool[i]}_masks.tif"), pool[i],
                       f"dsb2018/{pool[i]}.tif") for i in sorted(picked)]


def score(model, items, precision: str, threads: int) -> dict:
    """Mean per-image AP@0.5 over ``items`` ((image, labels, group) paths), no diameter given."""
    import tifffile

    from cellplug.metrics import match_counts
    from cellplug.segmenter import Segmenter, SegmentOptions

    seg = Segmenter.from_model(str(model), threads=threads)
    opts = SegmentOptions(precision=precision)
    aps = []
    for image_path, labels_path, _ in items:
        pred = seg.segment(tifffile.imread(image_path), opts).labels
        aps.append(float(match_counts(tifffile.imread(labels_path), pred).ap[0]))
    return {"ap50": round(float(np.mean(aps)), 4), "n": len(aps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=Path, default=Path("runs/nuclei/nuclei.pth"))
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 2, 3, 5])
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=None, help="override the recipe's 100")
    ap.add_argument("--replay", type=int, default=16, metavar="N",
                    help="rehearse N dsb2018 training images (train --replay); 0: none, "
                         "the plain hitl recipe")
    ap.add_argument("--replay-fraction", type=float, default=None,
                    help="share of each batch from the replay images (default: cellplug's)")
    ap.add_argument("--quick", action="store_true", help="a few images only (a smoke test)")
    ap.add_argument("--resume", type=Path, default=None, metavar="LOG",
                    help="reuse the rows (lines starting with {\"k\") an interrupted run printed "
                         "to LOG for the same base; only the missing k are run")
    ap.add_argument("--old-type-every-k", action="store_true",
                    help="score dsb2018 after every k (default: before, and after the largest k)")
    ap.add_argument("--out", type=Path, default=RESULTS / "hitl.json")
    args = ap.parse_args()

    import torch

    from cellplug.hitl import fine_tune, recipe_config
    from cellplug.inference import resolve_precision
    from cellplug.io import file_sha256

    torch.set_num_threads(args.threads)
    val = validation_images()
    new_type = [v for v in val if v[2] == "phase_contrast"]
    old_type = [v for v in val if v[2] != "phase_contrast"]
    if args.quick:
        new_type, old_type = new_type[:2], old_type[:3]
    anns = corrected_images(max(args.counts))
    rois = [int(np.unique(a.labels[a.labels > 0]).size) for a in anns]
    print(f"corrected images: {[a.stem for a in anns]}, ROIs {rois}", flush=True)
    replay = replay_images(args.replay) if args.replay else []
    recipe = "hitl-replay" if replay else "hitl"  # train's default with and without --replay
    if replay:
        print(f"replayed dsb2018 training images: {[a.stem for a in replay]}", flush=True)

    done = {}
    if args.resume is not None:  # rows of an interrupted run of the same base and images
        done = {r["k"]: r for r in (json.loads(line) for line in args.resume.read_text()
                                    .splitlines() if line.startswith('{"k"'))}
    t0 = time.perf_counter()
    before = done.get(0) or {
        "k": 0, "rois": 0, "usiigaci": score(args.base, new_type, args.precision, args.threads),
        "dsb2018": score(args.base, old_type, args.precision, args.threads)}
    before.setdefault("eval_seconds", round(time.perf_counter() - t0, 1))
    rows = [before]
    print(json.dumps(before), flush=True)
    bf16 = resolve_precision("auto") == "bf16" if args.precision == "auto" else (
        args.precision == "bf16")
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.counts:
            if k in done:
                rows.append(done[k])
                print(json.dumps(done[k]), flush=True)
                continue
            config = recipe_config(recipe, threads=args.threads, bf16=bf16, seed=0,
                                   epochs=args.epochs)
            w0, c0 = time.perf_counter(), time.process_time()
            result = fine_tune(anns[:k], str(args.base), out_path=Path(tmp) / f"k{k}.pth",
                               config=config, progress=False, log_fn=lambda m: None,
                               replay=replay, replay_fraction=args.replay_fraction)
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            row = {"k": k, "rois": sum(rois[:k]), "train_seconds": round(wall, 1),
                   "train_cpu_minutes": round(cpu / 60, 2),
                   "usiigaci": score(result.model_path, new_type, args.precision, args.threads)}
            row["gain_usiigaci"] = round(row["usiigaci"]["ap50"] - before["usiigaci"]["ap50"], 4)
            if args.old_type_every_k or k == max(args.counts):
                row["dsb2018"] = score(result.model_path, old_type, args.precision, args.threads)
                row["change_dsb2018"] = round(row["dsb2018"]["ap50"] - before["dsb2018"]["ap50"],
                                              4)
            rows.append(row)
            print(json.dumps(row), flush=True)
    doc = {"base": str(args.base), "base_sha256": file_sha256(args.base),
           "recipe_name": recipe, "recipe": recipe_config(recipe, epochs=args.epochs).__dict__,
           "precision": args.precision, "threads": args.threads, "quick": args.quick,
           "replay": {"n_images": len(replay), "stems": [a.stem for a in replay],
                      "fraction": args.replay_fraction} if replay else None,
           "corrected": [{"stem": a.stem, "source": a.source, "rois": r}
                         for a, r in zip(anns, rois, strict=True)],
           "rows": sorted(rows, key=lambda r: r["k"]), "resumed_from": str(args.resume or ""),
           "machine": machine()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    args.out.with_suffix(".md").write_text(_markdown(doc))
    print(f"wrote {args.out}")


def _markdown(doc: dict) -> str:
    lines = ["# Human-in-the-loop benchmark", "",
             f"Base: `{doc['base']}` (sha256 {doc['base_sha256'][:12]}), recipe "
             f"{doc.get('recipe_name', 'hitl')} ({doc['recipe']['epochs']} epochs), "
             f"precision {doc['precision']}, {doc['threads']} threads. AP@0.5 is the mean over "
             f"validation images, no diameter given.", "",
             *([f"Replay: {doc['replay']['n_images']} dsb2018 training images rehearsed, "
                f"{doc['replay']['fraction'] or 'the default'} of each batch "
                f"(`train --replay`).", ""] if doc.get("replay") else
               ["No replay: the corrections only.", ""]),
             "| corrected images | ROIs | train min (wall) | train CPU min | Usiigaci AP@0.5 | "
             "change | dsb2018 AP@0.5 | change |", "| ---: | ---: | ---: | ---: | ---: | ---: | "
             "---: | ---: |"]
    for r in doc["rows"]:
        lines.append(
            f"| {r['k']} | {r['rois']} | {r.get('train_seconds', 0) / 60:.1f} | "
            f"{r.get('train_cpu_minutes', 0):.1f} | {r['usiigaci']['ap50']:.3f} | "
            f"{r.get('gain_usiigaci', 0):+.3f} | "
            + (f"{r['dsb2018']['ap50']:.3f} | {r.get('change_dsb2018', 0):+.3f} |"
               if "dsb2018" in r else "not scored | |"))
    m = doc["machine"]
    if doc.get("resumed_from"):
        lines += ["", f"Rows printed by earlier runs of the same base, images and recipe were "
                      f"reused from `{doc['resumed_from']}`."]
    lines += ["", f"Wall-clock minutes on {m.get('logical_cpus')} CPUs, load average "
              f"{m.get('load_average_at_start')} at the start; CPU minutes (this process) are "
              f"the machine-independent cost.", "", f"Machine: {m}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
