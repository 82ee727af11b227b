"""What the golden fixtures' maker and their tests share: inputs, the random model, checks.

Plain numpy (+ tifffile): imported by ``make_golden.py`` in the Cellpose environment and by
the tests (without Cellpose), from this folder's path (see :func:`load_support`'s callers).
Nothing here imports cellplug or Cellpose.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

GOLDEN = Path(__file__).resolve().parent
TESTS = GOLDEN.parents[1]
REPO = TESTS.parent

# name -> (image, labels), relative to the repository; all segmented as grayscale ([0, 0])
IMAGES = {
    "dsb2018_fluo": ("tests/data/dsb2018_fluo.tif", "tests/data/dsb2018_fluo_masks.tif"),
    "dsb2018_he": ("tests/data/dsb2018_he.tif", "tests/data/dsb2018_he_masks.tif"),
    "dsb2018_bf": ("tests/data/dsb2018_bf.tif", "tests/data/dsb2018_bf_masks.tif"),
    "usiigaci_phc": ("tests/data/usiigaci_phc.tif", "tests/data/usiigaci_phc_masks.tif"),
    "nuclei": ("examples/nuclei.tif", "examples/nuclei_masks.tif"),
}

# A crop whose padded size (272 x 160) needs two 224-px tiles along Y, one along X: the
# tiled and whole-image network records use it (cheaper than the full 256 x 256 image)
CROPS = {"usiigaci_crop": ("usiigaci_phc", (slice(0, 256), slice(0, 144)))}

# The second model: random weights in the Cellpose CPnet layout (see random_state_dict),
# with diameters unlike the generalist's, so that nothing passes by being the generalist
RANDOM_SEED = 20261201
RANDOM_DIAM_MEAN = 30.0
RANDOM_DIAM_LABELS = 23.0
RANDOM_OUTPUT_KEYS = ("output.2.weight", "output.2.bias")  # calibrated, stored in the fixture


def image(name: str) -> np.ndarray:
    """A test image by name (``IMAGES`` or ``CROPS``), as stored (uint8)."""
    import tifffile

    if name in CROPS:
        base, crop = CROPS[name]
        return np.ascontiguousarray(image(base)[crop])
    return tifffile.imread(REPO / IMAGES[name][0])


def labels(name: str) -> np.ndarray:
    """The ground-truth labels of a test image (uint16)."""
    import tifffile

    return tifffile.imread(REPO / IMAGES[name][1])


def load(stem: str) -> dict[str, np.ndarray]:
    """All arrays of ``<stem>.npz`` in this folder, loaded (the file is closed again)."""
    with np.load(GOLDEN / f"{stem}.npz") as f:
        return {k: f[k] for k in f.files}


def manifest() -> dict:
    return json.loads((GOLDEN / "manifest.json").read_text())


def random_state_dict(template: dict, seed: int = RANDOM_SEED) -> dict[str, np.ndarray]:
    """Random weights for a CPnet-layout state dict, from numpy alone.

    ``template`` maps parameter names to anything with a ``.shape`` (Cellpose's CPnet and
    cellplug's StyleUNet have the same names and shapes). Names are taken in sorted order
    and each draws its values from one ``default_rng(seed).random`` stream (uniform [0, 1),
    whose output numpy keeps stable across versions):

    - convolution / linear weights: uniform within +-1/sqrt(fan_in) (torch's default bound);
    - batch-norm weight (1-D ``weight``): 0.5-1.5; any ``bias``: +-0.1;
    - ``running_mean``: +-0.2; ``running_var``: 0.5-2.0 (so eval-mode statistics matter);
    - ``num_batches_tracked`` is left out (the loader keeps its own);
    - ``diam_mean`` / ``diam_labels``: :data:`RANDOM_DIAM_MEAN` / :data:`RANDOM_DIAM_LABELS`.

    The output layer (:data:`RANDOM_OUTPUT_KEYS`) is then calibrated by the fixture maker
    on a real image and stored in ``random_model.npz``; :func:`random_model_state` puts it
    back. Returns float32 arrays.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name in sorted(template):
        shape = tuple(template[name].shape)
        if name.endswith("num_batches_tracked"):
            continue
        if name == "diam_mean":
            out[name] = np.full(shape, RANDOM_DIAM_MEAN, np.float32)
            continue
        if name == "diam_labels":
            out[name] = np.full(shape, RANDOM_DIAM_LABELS, np.float32)
            continue
        u = rng.random(int(np.prod(shape, dtype=np.int64)), dtype=np.float64).reshape(shape)
        if name.endswith("running_mean"):
            v = 0.4 * u - 0.2
        elif name.endswith("running_var"):
            v = 0.5 + 1.5 * u
        elif name.endswith("bias"):
            v = 0.2 * u - 0.1
        elif name.endswith("weight") and len(shape) == 1:
            v = 0.5 + u
        elif name.endswith("weight"):
            fan_in = int(np.prod(shape[1:]))
            v = (2.0 * u - 1.0) / np.sqrt(fan_in)
        else:
            raise ValueError(f"no rule for parameter {name!r} {shape}")
        out[name] = v.astype(np.float32)
    return out


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def size_model_sha256(metadata: dict) -> str:
    """Digest of what a model's metadata says about sizes (diameters and size model)."""
    keys = ("diam_mean", "diam_labels", "size_model")
    text = json.dumps({k: metadata.get(k) for k in keys}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def state_digest(state: dict[str, np.ndarray]) -> str:
    """sha256 over the sorted names and float32 bytes of a state dict (as numpy arrays)."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(np.ascontiguousarray(state[name], dtype=np.float32).tobytes())
    return h.hexdigest()


def random_model_state(template: dict) -> dict[str, np.ndarray]:
    """The fixtures' random model: :func:`random_state_dict` plus the stored output layer."""
    state = random_state_dict(template)
    stored = load("random_model")
    for key in RANDOM_OUTPUT_KEYS:
        state[key] = stored[key]
    return state


def random_model_torch_state(template: dict) -> dict:
    """:func:`random_model_state` as torch tensors, with every key of ``template`` (a fresh
    network's state dict: its ``num_batches_tracked`` fill the keys the recipe leaves out)."""
    import torch

    state = {k: torch.from_numpy(v.copy()) for k, v in random_model_state(template).items()}
    for key, value in template.items():
        state.setdefault(key, value)
    return state


def relabel_map(a: np.ndarray, b: np.ndarray) -> dict[int, int] | None:
    """The one-to-one map from ``a``'s object ids to ``b``'s if both are the same partition
    of the image (same objects, ids renumbered), else None."""
    a = np.asarray(a).astype(np.int64)
    b = np.asarray(b).astype(np.int64)
    if a.shape != b.shape or not np.array_equal(a > 0, b > 0):
        return None
    fg = a > 0
    pairs = np.unique(np.stack([a[fg], b[fg]]), axis=1)
    if not (pairs.shape[1] == len(np.unique(a[fg])) == len(np.unique(b[fg]))):
        return None
    return {int(i): int(j) for i, j in pairs.T}


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal label images up to the numbering of the objects.

    cellplug numbers objects by their order in the mask step, Cellpose 3.1.1.2 by first
    appearance in a raster scan (``fastremap.renumber``): the same masks get other ids.
    """
    return relabel_map(a, b) is not None


F16_REL = 2.0**-11  # float16 keeps 11 significant bits: rounding moves a value by <= this x |v|


def assert_close(ours, golden, atol: float, what: str = "") -> None:
    """``|ours - golden| <= atol + F16_REL * |golden|`` everywhere.

    ``golden`` may be float16: the relative term covers its rounding (exact for float32
    goldens too, where it is a small extra allowance), ``atol`` the float32 differences
    between cellplug and Cellpose (summation order, MKL-DNN kernels, resizing).
    """
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(golden, np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != golden {ref.shape}"
    err = np.abs(ours - ref)
    excess = err - (atol + F16_REL * np.abs(ref))
    if (excess > 0).any():
        i = np.unravel_index(int(np.argmax(excess)), excess.shape)
        raise AssertionError(
            f"{what}: {int((excess > 0).sum())} of {err.size} values beyond "
            f"{atol:g} + 2^-11 |golden|; max abs difference {err.max():.3g}, worst at {i}: "
            f"ours {ours[i]:.6g}, golden {ref[i]:.6g}"
        )


def partition_report(golden: np.ndarray, ours: np.ndarray) -> str:
    """A short account of how two label images differ (for assertion messages)."""
    golden = np.asarray(golden).astype(np.int64)
    ours = np.asarray(ours).astype(np.int64)
    fg = (golden > 0) != (ours > 0)
    return (
        f"objects golden {len(np.unique(golden)) - 1} / ours {len(np.unique(ours)) - 1}; "
        f"{int(fg.sum())} pixels differ in foreground"
    )
