"""Write the validation split of the bundled generalist model (deterministic, stratified).

Per modality (from each folder's metadata.csv), images are ordered by
sha1("cellplug-val:" + stem) and the first ceil(15 %) (at least 3) are held out.

    python training/make_split.py ../shared/data/dsb2018 ../shared/data/usiigaci_phc \
        > training/generalist/val_stems.txt
"""

from __future__ import annotations

import csv
import hashlib
import math
import sys
from pathlib import Path

FRACTION = 0.15
MINIMUM = 3


def main(folders: list[str]) -> None:
    for folder in folders:
        rows = list(csv.DictReader(open(Path(folder) / "metadata.csv", newline="")))
        by_modality: dict[str, list[str]] = {}
        for r in rows:
            by_modality.setdefault(r["modality"], []).append(r["stem"])
        for modality, stems in sorted(by_modality.items()):
            stems.sort(key=lambda s: hashlib.sha1(f"cellplug-val:{s}".encode()).hexdigest())
            n = max(MINIMUM, math.ceil(FRACTION * len(stems)))
            for s in sorted(stems[:n]):
                print(s)
            print(f"{folder} {modality}: {n} of {len(stems)} held out", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
