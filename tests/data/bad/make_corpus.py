"""The bad-input corpus: every kind of unusable (or merely odd) input cellplug must survive.

Each case is made by a function, so nothing large is committed (a TIFF that declares
100000 x 100000 pixels is 300 bytes here). ``python tests/data/bad/make_corpus.py DIR`` writes
every case into DIR to look at; ``tests/test_corpus.py`` makes them in a temporary folder and
runs each through every entry point, asserting the rules of docs/robustness.md.

Image cases return the path of one input file; model cases return the path of a weights file
(with its JSON or ``_size.npy`` beside it). Payload cases carry a pickle that, if it were ever
unpickled, would create the file ``PAYLOAD_SENTINEL`` in the case folder.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tifffile

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
EXAMPLE = REPO / "examples" / "nuclei.tif"
EXAMPLE_MASKS = REPO / "examples" / "nuclei_masks.tif"
BUNDLED = REPO / "plugins" / "cellplug_zoo" / "weights" / "generalist.pth"
PAYLOAD_SENTINEL = "PAYLOAD_RAN"


class _Payload:
    """Unpickling this runs ``touch <sentinel>`` (it must never happen)."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def _tif(folder: Path, name: str, data: np.ndarray, **kwargs) -> Path:
    path = folder / name
    tifffile.imwrite(path, data, **kwargs)
    return path


def _valid_tif_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    tifffile.imwrite(buf, (np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64))
    return buf.getvalue()


def _valid_png_bytes() -> bytes:
    import imageio.v3 as iio

    return iio.imwrite("<bytes>", np.full((32, 32), 7, np.uint8), extension=".png")


# -- image cases -----------------------------------------------------------------------------
def tiff_corrupt(d: Path) -> Path:
    (d / "corrupt.tif").write_bytes(b"II*\x00" + bytes(range(256)) * 3)
    return d / "corrupt.tif"


def tiff_truncated(d: Path) -> Path:
    raw = _valid_tif_bytes()
    (d / "truncated.tif").write_bytes(raw[: len(raw) // 3])
    return d / "truncated.tif"


def tiff_zero_bytes(d: Path) -> Path:
    (d / "empty.tif").write_bytes(b"")
    return d / "empty.tif"


def png_corrupt(d: Path) -> Path:
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    return d / "corrupt.png"


def png_truncated(d: Path) -> Path:
    raw = _valid_png_bytes()
    (d / "truncated.png").write_bytes(raw[: len(raw) // 2])
    return d / "truncated.png"


def png_zero_bytes(d: Path) -> Path:
    (d / "empty.png").write_bytes(b"")
    return d / "empty.png"


def tiff_declares_100000(d: Path) -> Path:
    """A 16 x 16 TIFF whose header was edited to claim 100000 x 100000 pixels."""
    path = _tif(d, "huge_header.tif", np.zeros((16, 16), np.uint8))
    with tifffile.TiffFile(path, mode="r+") as tif:
        tif.pages[0].tags["ImageWidth"].overwrite(100000)
        tif.pages[0].tags["ImageLength"].overwrite(100000)
    return path


def nan_values(d: Path) -> Path:
    data = np.ones((48, 48), np.float32)
    data[5, 7] = np.nan
    return _tif(d, "nan.tif", data)


def inf_values(d: Path) -> Path:
    data = np.ones((48, 48), np.float32)
    data[5, 7] = -np.inf
    return _tif(d, "inf.tif", data)


def overflow_float64(d: Path) -> Path:
    """Finite float64 values near 1e300: NaN-free, but infinite once in float32."""
    data = np.linspace(-1e300, 1e300, 48 * 48).reshape(48, 48)
    return _tif(d, "overflow64.tif", data)


def overflow_float32(d: Path) -> Path:
    """float32 values of +-3e38: their range overflows float32 while normalising."""
    data = np.full((48, 48), -3e38, np.float32)
    data[10:30, 10:30] = 3e38
    return _tif(d, "overflow32.tif", data)


def zero_by_n(d: Path) -> Path:
    return _tif(d, "zero_rows.tif", np.zeros((0, 32), np.uint8))


def one_pixel(d: Path) -> Path:
    return _tif(d, "one_pixel.tif", np.full((1, 1), 9, np.uint8))


def constant(d: Path) -> Path:
    return _tif(d, "constant.tif", np.full((64, 64), 100, np.uint16))


def five_d(d: Path) -> Path:
    data = np.zeros((2, 3, 2, 32, 32), np.uint8)  # T, Z, C, Y, X with ImageJ axis metadata
    return _tif(d, "hyperstack.tif", data, imagej=True, metadata={"axes": "TZCYX"})


def zstack(d: Path) -> Path:
    return _tif(d, "zstack.tif", np.zeros((12, 32, 32), np.uint8), metadata={"axes": "ZYX"})


def stack_without_axes(d: Path) -> Path:
    """5 planes, no axis metadata: read as 5 channels with a warning (--axes says otherwise)."""
    rng = np.random.default_rng(0)
    return _tif(d, "stack5.tif", rng.integers(0, 255, (5, 64, 64), dtype=np.uint8),
                metadata=None)


def text_file_as_tif(d: Path) -> Path:
    (d / "notes.tif").write_text("not an image\n")
    return d / "notes.tif"


def directory_named_tif(d: Path) -> Path:
    (d / "folder.tif").mkdir()
    return d / "folder.tif"


def missing_file(d: Path) -> Path:
    return d / "missing.tif"


def empty_folder(d: Path) -> Path:
    (d / "empty_folder").mkdir()
    return d / "empty_folder"


IMAGE_CASES: dict[str, Callable[[Path], Path]] = {
    f.__name__: f
    for f in (
        tiff_corrupt, tiff_truncated, tiff_zero_bytes, png_corrupt, png_truncated,
        png_zero_bytes, tiff_declares_100000, nan_values, inf_values, overflow_float64,
        overflow_float32, zero_by_n, one_pixel, constant, five_d, zstack, stack_without_axes,
        text_file_as_tif, directory_named_tif, missing_file, empty_folder,
    )
}


# -- model cases -----------------------------------------------------------------------------
def _copy_bundled(d: Path, name: str, **changes) -> Path:
    """The bundled model under another name, its metadata changed (None deletes a key)."""
    weights = d / f"{name}.pth"
    shutil.copy(BUNDLED, weights)
    meta = json.loads(BUNDLED.with_suffix(".json").read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    weights.with_suffix(".json").write_text(json.dumps(meta))
    return weights


def _bundled_size_model() -> dict:
    return json.loads(BUNDLED.with_suffix(".json").read_text())["size_model"]


def pth_pickle_payload(d: Path) -> Path:
    import torch

    path = d / "payload.pth"
    torch.save({"weight": torch.zeros(1), "evil": _Payload(d / PAYLOAD_SENTINEL)}, path)
    return path


def size_npy_pickle_payload(d: Path) -> Path:
    """A bare Cellpose .pth (ours, without its JSON) whose _size.npy carries a payload."""
    path = d / "cellpose_model"
    shutil.copy(BUNDLED, path)
    obj = np.empty((), dtype=object)
    obj[()] = {"A": _Payload(d / PAYLOAD_SENTINEL), "smean": np.zeros(256), "ymean": 0.0,
               "diam_mean": 17.0}
    np.save(str(path) + "_size.npy", obj, allow_pickle=True)
    return path


def not_a_model(d: Path) -> Path:
    (d / "notes.pth").write_text("these are not weights\n")
    return d / "notes.pth"


def meta_unreadable_json(d: Path) -> Path:
    weights = _copy_bundled(d, "badjson")
    weights.with_suffix(".json").write_text("{not json")
    return weights


def meta_diam_mean_text(d: Path) -> Path:
    return _copy_bundled(d, "diam_text", diam_mean="thirty")


def meta_diam_mean_zero(d: Path) -> Path:
    return _copy_bundled(d, "diam_zero", diam_mean=0)


def meta_diam_mean_negative(d: Path) -> Path:
    return _copy_bundled(d, "diam_negative", diam_mean=-30)


def meta_n_channels_wrong(d: Path) -> Path:
    return _copy_bundled(d, "channels3", n_channels=3)


def meta_size_model_missing_key(d: Path) -> Path:
    size = _bundled_size_model()
    del size["smean"]
    return _copy_bundled(d, "size_missing", size_model=size)


def meta_size_model_wrong_shape(d: Path) -> Path:
    size = _bundled_size_model()
    size["A"] = size["A"][:100]
    size["smean"] = size["smean"][:100]
    return _copy_bundled(d, "size_shape", size_model=size)


def cellpose_size_npy_wrong_shape(d: Path) -> Path:
    path = d / "cellpose_size_shape"
    shutil.copy(BUNDLED, path)
    np.save(str(path) + "_size.npy", {"A": np.zeros(10), "smean": np.zeros(10), "ymean": 0.0,
                                      "diam_mean": 17.0}, allow_pickle=True)
    return path


def meta_backbone_options_unknown(d: Path) -> Path:
    return _copy_bundled(d, "opts_unknown",
                         backbone_options={"n_channels": 2, "n_outputs": 3, "depth": 7})


def meta_backbone_options_ill_typed(d: Path) -> Path:
    return _copy_bundled(d, "opts_typed", backbone_options={"n_channels": "two", "n_outputs": 3})


MODEL_CASES: dict[str, Callable[[Path], Path]] = {
    f.__name__: f
    for f in (
        pth_pickle_payload, size_npy_pickle_payload, not_a_model, meta_unreadable_json,
        meta_diam_mean_text, meta_diam_mean_zero, meta_diam_mean_negative,
        meta_n_channels_wrong, meta_size_model_missing_key, meta_size_model_wrong_shape,
        cellpose_size_npy_wrong_shape, meta_backbone_options_unknown,
        meta_backbone_options_ill_typed,
    )
}


# -- annotation folders (what train and the annotation sources read) ------------------------
def _with_image(d: Path, stem: str = "cells") -> Path:
    folder = d / "annotations"
    folder.mkdir()
    shutil.copy(EXAMPLE, folder / f"{stem}.tif")
    return folder


def seg_npy_pickle_payload(d: Path) -> Path:
    folder = _with_image(d)
    data = {"masks": np.zeros((360, 360), np.uint16), "evil": _Payload(d / PAYLOAD_SENTINEL)}
    np.save(folder / "cells_seg.npy", data, allow_pickle=True)
    return folder


def seg_npy_3d_masks(d: Path) -> Path:
    folder = _with_image(d)
    np.save(folder / "cells_seg.npy", {"masks": np.zeros((2, 360, 360), np.uint16)},
            allow_pickle=True)
    return folder


def seg_npy_shape_mismatch(d: Path) -> Path:
    folder = _with_image(d)
    np.save(folder / "cells_seg.npy", {"masks": np.ones((100, 100), np.uint16)},
            allow_pickle=True)
    return folder


def roi_zip_corrupt(d: Path) -> Path:
    folder = _with_image(d)
    (folder / "cells_RoiSet.zip").write_bytes(b"PK\x03\x04 not really a zip")
    return folder


def masks_negative_labels(d: Path) -> Path:
    folder = _with_image(d)
    tifffile.imwrite(folder / "cells_masks.tif", -np.ones((360, 360), np.int32))
    return folder


def masks_fractional_labels(d: Path) -> Path:
    folder = _with_image(d)
    tifffile.imwrite(folder / "cells_masks.tif", np.full((360, 360), 1.5, np.float32))
    return folder


ANNOTATION_CASES: dict[str, Callable[[Path], Path]] = {
    f.__name__: f
    for f in (
        seg_npy_pickle_payload, seg_npy_3d_masks, seg_npy_shape_mismatch, roi_zip_corrupt,
        masks_negative_labels, masks_fractional_labels,
    )
}


def make_all(root: Path) -> dict[str, Path]:
    """Every case in its own folder under ``root``: {case name: path to pass}."""
    out = {}
    for name, make in {**IMAGE_CASES, **MODEL_CASES, **ANNOTATION_CASES}.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        out[name] = make(folder)
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "bad-corpus")
    for name, path in make_all(target).items():
        print(f"{name:32s} {path}")
