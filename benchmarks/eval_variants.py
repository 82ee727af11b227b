"""AP@0.5 of the bundled model on the validation split under inference variants.

Segments each validation image (training/generalist/val_stems.txt) with no diameter given
(the default: what ``cellplug eval`` reports) and then under variants, and prints the mean
AP@0.5 per image type:

- whole reruns: float32, flip test-time augmentation, one whole-image pass (no tiles);
- mask step only, on the default run's flows and cell probability (same diameter):
  cell-probability threshold -1, -0.5, +0.5 and flow threshold 0.6, 0.8 (defaults 0, 0.4);
- scale: the network rerun at 0.8, 0.9 and 1.1 x the size model's diameter.

It answers "would a different inference setting do better than the defaults?"; the settings
are compared on the validation split itself, so a winner here is a hint, not a result.
Needs ../shared/data (or $CELLPLUG_DATA).

    python benchmarks/eval_variants.py [MODEL]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, data_root, validation_images  # noqa: E402

RERUN = {
    "fp32": {"precision": "fp32"},
    "augment": {"augment": True},
    "whole_image": {"tile": False},
}
MASK_STEP = {
    "cellprob-1": {"cellprob_threshold": -1.0},
    "cellprob-0.5": {"cellprob_threshold": -0.5},
    "cellprob+0.5": {"cellprob_threshold": 0.5},
    "flow0.6": {"flow_threshold": 0.6},
    "flow0.8": {"flow_threshold": 0.8},
}
SCALE = {"diameter_x0.8": 0.8, "diameter_x0.9": 0.9, "diameter_x1.1": 1.1}
NAMES = ["default", *RERUN, *MASK_STEP, *SCALE]


def ap50(truth: np.ndarray, labels: np.ndarray) -> float:
    from cellplug.metrics import match_counts

    return float(match_counts(truth, labels.astype(np.int64), [0.5]).ap[0])


def main() -> int:
    data = data_root()
    if not (data / "dsb2018").is_dir():
        print(f"eval_variants: skipped, no data at {data}")
        return 0
    from cellplug.io import read_image, read_labels
    from cellplug.segmenter import Segmenter, SegmentOptions, default_niter

    seg = Segmenter.from_model(sys.argv[1] if len(sys.argv) > 1 else "generalist")
    groups: dict[str, list[dict]] = {}
    for image_path, labels_path, modality in validation_images():
        image = read_image(image_path)
        truth = read_labels(labels_path).astype(np.int64)

        base = seg.segment(image, diameter=0)
        row = {
            "image": image_path.stem,
            "group": modality,
            "diameter": round(base.diameter, 2),
            "default": ap50(truth, base.labels),
        }
        for name, options in RERUN.items():
            row[name] = ap50(truth, seg.segment(image, diameter=0, **options).labels)
        niter = default_niter(seg.model.diam_mean / base.diameter)  # as the default run
        for name, options in MASK_STEP.items():
            labels = seg.reconstruct(base.flows, base.cellprob, niter, SegmentOptions(**options))
            row[name] = ap50(truth, labels)
        for name, factor in SCALE.items():
            row[name] = ap50(truth, seg.segment(image, diameter=base.diameter * factor).labels)
        print(json.dumps(row), flush=True)
        groups.setdefault(modality, []).append(row)
        if image_path.parent.name == "dsb2018":
            groups.setdefault("dsb2018 (all)", []).append(row)
    summary = {
        g: {"n": len(rows)} | {v: round(float(np.mean([r[v] for r in rows])), 4) for v in NAMES}
        for g, rows in groups.items()
    }
    for g, s in summary.items():
        print(g, s)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "eval_variants.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
