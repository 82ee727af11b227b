"""Helpers shared by the benchmark and parity scripts (not part of the cellplug package).

* where the real data lives (``../shared/data`` next to the repository, or ``$CELLPLUG_DATA``);
* synthetic crowded label images (touching ellipses cut by a Voronoi tessellation);
* the bundled generalist's validation images;
* a description of the machine, for results files.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def data_root() -> Path:
    """``$CELLPLUG_DATA`` if set, else ``<repo>/../shared/data``."""
    env = os.environ.get("CELLPLUG_DATA")
    return Path(env) if env else (REPO.parent / "shared" / "data").resolve()


def validation_stems() -> set[str]:
    """The generalist's validation split (training/generalist/val_stems.txt)."""
    return set((REPO / "training" / "generalist" / "val_stems.txt").read_text().split())


def training_stems(dataset: str) -> list[str]:
    """Sorted stems of ``dataset`` (a folder of ``../shared/data``) with a ``_masks.tif``,
    the validation split left out: what benchmarks may train, calibrate or rehearse on."""
    val = validation_stems()
    stems = sorted(p.name[: -len("_masks.tif")] for p in (data_root() / dataset).glob(
        "*_masks.tif"))
    return [s for s in stems if s not in val]


def metadata_rows(folder: Path) -> list[dict[str, str]]:
    """The rows of ``folder/metadata.csv`` (a shared dataset's: ``stem``, ``modality``,
    ``height``, ``width``, ``channels``, ...), in file order."""
    with open(Path(folder) / "metadata.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def validation_images(limit: int | None = None) -> list[tuple[Path, Path, str]]:
    """(image, labels, modality) of the generalist's validation split, in metadata order.

    ``limit`` subsamples it (a quick check) while keeping every modality represented.
    """
    data = data_root()
    stems = validation_stems()
    out = []
    for folder in ("dsb2018", "usiigaci_phc"):
        for row in metadata_rows(data / folder):
            if row["stem"] in stems:
                out.append(
                    (
                        data / folder / f"{row['stem']}.tif",
                        data / folder / f"{row['stem']}_masks.tif",
                        row["modality"],
                    )
                )
    if limit:
        by: dict[str, list] = {}
        for item in out:
            by.setdefault(item[2], []).append(item)
        out = [x for items in by.values() for x in items[: max(1, limit * len(items) // len(out))]]
    return out


def synthetic_cells(
    shape: tuple[int, int],
    diameter: float = 30.0,
    seed: int = 0,
    *,
    jitter: float = 0.3,
    fill: bool = False,
    min_area: int = 20,
) -> np.ndarray:
    """Crowded synthetic label image: one random ellipse per cell, cut by its Voronoi cell.

    Centres sit on a square grid of spacing ``diameter``, each moved by up to ``jitter *
    diameter`` in y and x. Every pixel belongs to its nearest centre (Voronoi tessellation);
    a cell keeps the pixels inside its own randomly sized and oriented ellipse (semi-axes
    0.5-0.65 and 0.35-0.55 times ``diameter``), so neighbouring cells touch along straight
    edges where their ellipses overlap and leave background elsewhere. With ``fill=True``
    every pixel belongs to a cell (a pure tessellation, no background). Every cell is
    convex, hence connected. Cells with fewer than ``min_area`` pixels are removed (the
    reconstruction drops objects below 15 pixels by design).

    Returns
    -------
    ndarray
        int32 (H, W) labels 1..N in row-major order of the cell centres, 0 = background.
    """
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    H, W = shape
    gy = np.arange(diameter / 2, H, diameter)
    gx = np.arange(diameter / 2, W, diameter)
    cy, cx = (a.ravel() for a in np.meshgrid(gy, gx, indexing="ij"))
    cy = np.clip(np.round(cy + rng.uniform(-jitter, jitter, cy.size) * diameter), 0, H - 1)
    cx = np.clip(np.round(cx + rng.uniform(-jitter, jitter, cx.size) * diameter), 0, W - 1)
    cy = cy.astype(np.int64)
    cx = cx.astype(np.int64)
    n = cy.size
    seeds = np.zeros(shape, np.int32)
    seeds[cy, cx] = np.arange(1, n + 1, dtype=np.int32)  # later centres win exact clashes
    present = np.zeros(n + 1, bool)
    present[seeds[cy, cx]] = True
    iy, ix = ndi.distance_transform_edt(seeds == 0, return_distances=False, return_indices=True)
    lab = seeds[iy, ix]
    del iy, ix
    if not fill:
        a = diameter * rng.uniform(0.5, 0.65, n + 1)
        b = diameter * rng.uniform(0.35, 0.55, n + 1)
        th = rng.uniform(0.0, np.pi, n + 1)
        c, s = np.cos(th), np.sin(th)
        for i0 in range(0, H, 512):  # row bands keep the temporaries small
            band = lab[i0 : i0 + 512]
            yy = np.arange(i0, i0 + band.shape[0])[:, None].astype(np.float64)
            xx = np.arange(W)[None, :].astype(np.float64)
            k = band
            dy = yy - cy[k - 1]
            dx = xx - cx[k - 1]
            u = (dy * c[k] + dx * s[k]) / a[k]
            v = (dx * c[k] - dy * s[k]) / b[k]
            band[u * u + v * v > 1.0] = 0
    counts = np.bincount(lab.ravel(), minlength=n + 1)
    keep = (counts >= min_area) & present
    keep[0] = False
    lut = np.zeros(n + 1, np.int32)
    lut[keep] = np.arange(1, keep.sum() + 1, dtype=np.int32)
    return lut[lab]


def machine() -> dict:
    """CPU model and core count (from lscpu when available), OS, date, load average."""
    info: dict = {
        "cpu_model": platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "memory_gb": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9, 1),
    }
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            key, _, val = line.partition(":")
            key, val = key.strip(), val.strip()
            if key == "Model name":
                info["cpu_model"] = val
            elif key == "Core(s) per socket":
                info["cores_per_socket"] = int(val)
            elif key == "Socket(s)":
                info["sockets"] = int(val)
            elif key == "Thread(s) per core":
                info["threads_per_core"] = int(val)
            elif key in ("CPU family", "Model"):  # tells CPU generations of one name apart
                info["cpu_family" if key == "CPU family" else "cpu_model_number"] = val
            elif key == "Flags":  # native bfloat16 decides what --precision auto means
                info["native_bf16"] = "avx512_bf16" in val.split() or "amx_bf16" in val.split()
    except (OSError, subprocess.CalledProcessError, ValueError):
        pass
    return info


def versions(*modules: str) -> dict:
    """``{name: __version__}`` of the importable ones among ``modules``."""
    import importlib

    out = {}
    for name in modules:
        try:
            out[name] = getattr(importlib.import_module(name), "__version__", "?")
        except ImportError:
            continue
    return out


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")
