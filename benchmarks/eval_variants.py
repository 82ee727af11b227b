"""AP@0.5 of the bundled model on the validation split under inference variants.

Segments each validation image (training/generalist/val_stems.txt) with no diameter given in
float32, with flip test-time augmentation and as one whole-image pass (no tiles), and prints
the mean AP@0.5 per image type; the default setting is what ``cellplug eval`` reports.
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

VARIANTS = {
    "fp32": {"precision": "fp32"},
    "augment": {"augment": True},
    "whole_image": {"tile": False},
}


def main() -> int:
    data = data_root()
    if not (data / "dsb2018").is_dir():
        print(f"eval_variants: skipped, no data at {data}")
        return 0
    from cellplug.io import read_image, read_labels
    from cellplug.metrics import match_counts
    from cellplug.segmenter import Segmenter

    seg = Segmenter.from_model(sys.argv[1] if len(sys.argv) > 1 else "generalist")
    groups: dict[str, list[dict]] = {}
    for image_path, labels_path, modality in validation_images():
        image = read_image(image_path)
        truth = read_labels(labels_path).astype(np.int64)
        row = {"image": image_path.stem, "group": modality}
        for name, options in VARIANTS.items():
            labels = seg.segment(image, diameter=0, **options).labels.astype(np.int64)
            row[name] = float(match_counts(truth, labels, [0.5]).ap[0])
        print(json.dumps(row), flush=True)
        groups.setdefault(modality, []).append(row)
        if image_path.parent.name == "dsb2018":
            groups.setdefault("dsb2018 (all)", []).append(row)
    summary = {
        g: {"n": len(rows)} | {v: round(float(np.mean([r[v] for r in rows])), 4) for v in VARIANTS}
        for g, rows in groups.items()
    }
    for g, s in summary.items():
        print(g, s)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "eval_variants.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
