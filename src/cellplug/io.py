"""Reading images and labels, writing results atomically.

Images come back as numpy arrays in their own dtype with an explicit dimension order:
(Y, X) for one channel, (Y, X, C) for several. Anything that cannot be put in that order
(a z-stack, a time series, 5 colour samples...) is an :class:`~cellplug.errors.InputError`
naming the file and its shape, never a silent guess.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import AxesGuessWarning, CellplugError, InputError
from .transforms import check_pixel_values

TIFF_SUFFIXES = (".tif", ".tiff")
OTHER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
IMAGE_SUFFIXES = TIFF_SUFFIXES + OTHER_SUFFIXES
EXTRA_OUTPUT_SUFFIXES = ("_flows", "_overlay", "_cellprob")  # what `segment --save` adds
MAX_CHANNELS = 8  # more than this along a channel-like axis is treated as a stack, not colour
AXES_CODES = "YXCSZTQ"  # --axes letters: tifffile's codes (S = colour samples, Q = unknown)


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _axes_to_yxc(data: np.ndarray, axes: str, path: Path) -> np.ndarray:
    """Reorder ``data`` with tifffile axis codes to (Y, X) or (Y, X, C).

    A single axis of unknown meaning (tifffile's ``Q``, ImageJ's ``I``: pages of a TIFF
    written without axis metadata, e.g. ``tifffile.imwrite(f, (2, Y, X) array)``) is taken
    as channels when it has at most :data:`MAX_CHANNELS` entries, as for a PNG or an array
    without metadata, with an :class:`~cellplug.errors.AxesGuessWarning` (it may as well be
    a small z-stack: ``axes=`` in :func:`read_image` says which); longer ones are stacks and
    rejected.
    """
    axes = axes.upper()
    # drop singleton axes other than Y and X (T=1, Z=1, C=1, ...)
    keep = [i for i, a in enumerate(axes) if a in "YX" or data.shape[i] != 1]
    data = data.reshape([data.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    unknown = [i for i, a in enumerate(axes) if a in "QI"]
    if len(unknown) == 1 and len(axes) == 3 and data.shape[unknown[0]] <= MAX_CHANNELS:
        n = data.shape[unknown[0]]
        warnings.warn(
            f"{path}: no axis metadata; reading its {n} planes as channels (if they are a "
            f"z-stack or time series, say so with --axes / axes=, e.g. ZYX)",
            AxesGuessWarning,
            stacklevel=3,
        )
        axes = axes.replace(axes[unknown[0]], "C")
    if "Y" not in axes or "X" not in axes:
        raise InputError(path, f"cannot find Y and X axes (axes {axes}, shape {data.shape})")
    extra = [a for a in axes if a not in "YX"]
    if len(extra) > 1 or (extra and extra[0] not in "CS"):
        raise InputError(
            path,
            f"expected a 2-D image (Y, X) or (Y, X, C); got axes {axes} with shape "
            f"{data.shape} (z-stacks and time series are not supported: split them first)",
        )
    order = [axes.index("Y"), axes.index("X")] + [axes.index(a) for a in extra]
    data = np.transpose(data, order)
    if data.ndim == 3 and data.shape[2] > MAX_CHANNELS:
        raise InputError(path, f"{data.shape[2]} channels is too many (max {MAX_CHANNELS})")
    return data


def _guess_yxc(data: np.ndarray, path: Path) -> np.ndarray:
    """Order an array without axis metadata: (Y, X), (Y, X, C) or (C, Y, X) with C <= 8."""
    data = np.squeeze(data) if data.ndim > 2 else data
    if data.ndim == 2:
        return data
    if data.ndim == 3:
        if data.shape[2] <= MAX_CHANNELS < min(data.shape[:2]) or data.shape[2] <= 4:
            return data
        if data.shape[0] <= MAX_CHANNELS:
            return np.moveaxis(data, 0, -1)
    raise InputError(
        path,
        f"expected a 2-D image (Y, X) or (Y, X, C) with at most {MAX_CHANNELS} channels; "
        f"got shape {data.shape}",
    )


@contextlib.contextmanager
def _quiet_tifffile() -> Iterator[None]:
    """tifffile logs what it repairs in a damaged file; the caller reports what matters."""
    logger = logging.getLogger("tifffile")
    old = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = old


def _given_axes(axes: str | None, data: np.ndarray, path: Path) -> str | None:
    """Validate user-given ``axes`` against the stored array (``None`` passes through)."""
    if axes is None:
        return None
    axes = axes.upper()
    if len(set(axes)) != len(axes) or any(a not in AXES_CODES for a in axes):
        raise InputError(
            path, f"invalid axes {axes!r}: use each of the letters {AXES_CODES} at most once"
        )
    if len(axes) != data.ndim:
        raise InputError(
            path, f"axes {axes!r} do not fit the stored array of shape {data.shape} "
            f"({data.ndim} dimensions)"
        )
    return axes


def _check_size(shape: Sequence[int], dtype: np.dtype, path: Path) -> None:
    """Refuse, before reading, an image larger than :func:`max_image_bytes` (a corrupt or
    hostile header can declare 100000 x 100000 pixels)."""
    n = float(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize
    limit = max_image_bytes()
    if n > limit:
        raise InputError(
            path,
            f"image of shape {tuple(shape)} {np.dtype(dtype)} needs {n / 2**30:.1f} GiB, above "
            f"the {limit / 2**30:g} GiB limit for an image read whole "
            f"(set CELLPLUG_MAX_IMAGE_GIB to raise it)",
        )


def max_image_bytes() -> int:
    """Largest image read whole: ``$CELLPLUG_MAX_IMAGE_GIB`` GiB (default 4)."""
    return int(float(os.environ.get("CELLPLUG_MAX_IMAGE_GIB", "4")) * 2**30)


def _check_empty(data: np.ndarray, path: Path) -> None:
    if data.size == 0:
        raise InputError(path, f"image is empty (shape {data.shape})")


def _check_values(data: np.ndarray, path: Path) -> np.ndarray:
    _check_empty(data, path)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    try:
        check_pixel_values(data)
    except CellplugError as exc:
        raise InputError(path, str(exc)) from None
    return data


def read_image(path: str | os.PathLike[str], axes: str | None = None) -> np.ndarray:
    """Read a microscopy image.

    Parameters
    ----------
    path
        A TIFF / OME-TIFF (via tifffile) or a PNG, JPEG or BMP file (via imageio).
    axes
        The meaning of the stored array's dimensions, in tifffile's letters (``"YX"``,
        ``"CYX"``, ``"YXC"``, ``"ZYX"``...), overriding the file's metadata and the guess
        made without it. ``None``: the file's axes (TIFF), or (Y, X[, C]) with the channel
        axis found by size (other formats).

    Returns
    -------
    ndarray
        (Y, X) or (Y, X, C), in the file's own dtype (uint8, uint16, float32, ...).
        Alpha channels of PNG files (grey + alpha, RGBA) are dropped.

    Raises
    ------
    InputError
        Missing or unreadable file, corrupt TIFF, unsupported dimensions, empty image,
        NaN or infinite values.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file")
    if path.is_dir():
        raise InputError(path, "is a directory, expected an image file")
    if path.stat().st_size == 0:
        raise InputError(path, "empty file (0 bytes)")
    suffix = path.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        import tifffile

        try:
            with _quiet_tifffile(), tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                _check_size(series.shape, series.dtype, path)
                data = series.asarray()
                file_axes = series.axes
        except InputError:
            raise
        except MemoryError:
            raise InputError(path, "image too large to load into memory") from None
        except Exception as exc:  # tifffile raises several types for broken files
            raise InputError(path, f"not a readable TIFF ({type(exc).__name__}: {exc})") from None
        data = np.asarray(data)
        _check_empty(data, path)
        data = _axes_to_yxc(data, _given_axes(axes, data, path) or file_axes, path)
    elif suffix in OTHER_SUFFIXES:
        import imageio.v3 as iio

        try:
            data = np.asarray(iio.imread(path))
        except Exception as exc:
            raise InputError(path, f"not a readable image ({type(exc).__name__}: {exc})") from None
        _check_empty(data, path)
        given = _given_axes(axes, data, path)
        if given is not None:
            data = _axes_to_yxc(data, given, path)
        else:
            if data.ndim == 3 and suffix == ".png" and data.shape[2] in (2, 4):
                data = data[..., : data.shape[2] - 1]  # grey + alpha or RGBA: drop alpha
            data = _guess_yxc(data, path)
    else:
        raise InputError(
            path, f"unsupported file type {suffix!r}; expected one of {', '.join(IMAGE_SUFFIXES)}"
        )
    return _check_values(np.ascontiguousarray(data), path)


def read_labels(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a label image: (Y, X) integer, 0 = background, any positive ids."""
    path = Path(path)
    data = read_image(path)
    if data.ndim != 2:
        raise InputError(path, f"label image must be 2-D (Y, X); got shape {data.shape}")
    if np.issubdtype(data.dtype, np.floating):
        if not np.all(np.mod(data, 1) == 0):
            raise InputError(path, "label image has non-integer values")
        data = data.astype(np.int64)
    if data.min() < 0:
        raise InputError(path, "label image has negative values")
    return data


def labels_dtype(labels: np.ndarray) -> np.dtype:
    """uint16 when it fits (what Fiji and CellProfiler read best), else uint32."""
    return np.dtype(np.uint16) if labels.size == 0 or labels.max() < 2**16 else np.dtype(np.uint32)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    On error the temporary file is removed and ``path`` is untouched, so a failed run
    never leaves a half-written result behind. (:func:`atomic_paths` for one file.)
    """
    with atomic_paths([path]) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_paths(paths: Sequence[str | os.PathLike[str]]) -> Iterator[list[Path]]:
    """Like :func:`atomic_path` for several files that belong together: all or none.

    Yields one temporary path per target. When the block succeeds, every target is
    replaced, each by one atomic rename; if a replacement fails midway, the targets already
    replaced get their previous contents back (or are removed if they did not exist). When
    the block fails, nothing is touched. Either way no temporary file is left behind.
    """
    targets = [Path(p) for p in paths]
    if len(set(targets)) != len(targets):
        raise ValueError(f"the same target twice in {targets}")
    temps: list[Path] = []
    backups: dict[Path, Path | None] = {}  # target -> its previous contents (None: new)
    try:
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(
                prefix=f".{target.stem}.", suffix=target.suffix, dir=target.parent
            )
            os.close(fd)
            temps.append(Path(tmp))
        yield list(temps)
        mode = 0o666 & ~_umask()  # mkstemp makes 0600; results are shared files
        for i, (target, tmp) in enumerate(zip(targets, temps, strict=True)):
            os.chmod(tmp, mode)
            backup = None
            # a second name for the previous contents (the target itself stays in place), for
            # rolling back if a later replacement fails; the last one has nothing after it
            if i < len(targets) - 1 and (target.is_file() or target.is_symlink()):
                backup = target.with_name(f".{target.name}.{os.getpid()}.old")
                try:
                    os.link(target, backup)
                except OSError:  # a filesystem without hard links
                    shutil.copy2(target, backup)
            backups[target] = backup
            os.replace(tmp, target)
    except BaseException:
        for target, backup in backups.items():  # undo the replacements made so far
            with contextlib.suppress(OSError):
                if backup is not None:
                    os.replace(backup, target)
                elif target.is_file():
                    target.unlink()
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise
    for backup in backups.values():
        if backup is not None:
            backup.unlink(missing_ok=True)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes (e.g. to record exactly which weights were used)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _default_axes(data: np.ndarray) -> str | None:
    if data.ndim == 2:
        return "YX"
    if data.ndim == 3 and data.shape[2] <= MAX_CHANNELS:
        return "YXC"
    if data.ndim == 3 and data.shape[0] <= MAX_CHANNELS:
        return "CYX"
    return None


def _write_tiff(path: Path, data: np.ndarray, axes: str | None = None) -> None:
    """Write with explicit axes, so that :func:`read_image` reads back the same array.

    (Y, X, 3|4) uint8/uint16 is stored as an RGB(A) image, anything else as grey samples
    with the axes in tifffile's metadata (without it, tifffile would store a (Y, X, 2)
    array as Y pages of X x 2 pixels).
    """
    import tifffile

    axes = axes or _default_axes(data)
    if axes is not None and len(axes) != data.ndim:
        raise ValueError(f"axes {axes!r} do not match data of shape {data.shape}")
    kwargs: dict[str, Any] = {"photometric": "minisblack"}
    if axes is not None:
        kwargs["metadata"] = {"axes": axes}
        if axes.endswith(("C", "S")):
            kwargs["planarconfig"] = "contig"
            if data.shape[-1] in (3, 4) and data.dtype in (np.uint8, np.uint16):
                kwargs["photometric"] = "rgb"
                kwargs["metadata"] = {"axes": axes[:-1] + "S"}
                if data.shape[-1] == 4:
                    kwargs["extrasamples"] = ("unassalpha",)
    tifffile.imwrite(path, data, compression="zlib", **kwargs)


def _maybe_atomic(path: str | os.PathLike[str], atomic: bool) -> contextlib.AbstractContextManager:
    return atomic_path(path) if atomic else contextlib.nullcontext(Path(path))


def write_labels(path: str | os.PathLike[str], labels: np.ndarray, atomic: bool = True) -> Path:
    """Write a label image (Y, X) as a zlib-compressed TIFF, atomically.

    Stored as uint16 when the largest label fits, else uint32. ``atomic=False`` writes to
    ``path`` directly (for a temporary path of :func:`atomic_paths`).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    with _maybe_atomic(path, atomic) as tmp:
        _write_tiff(tmp, labels.astype(labels_dtype(labels), copy=False), "YX")
    return Path(path)


def write_tiff(
    path: str | os.PathLike[str], data: np.ndarray, axes: str | None = None,
    atomic: bool = True,
) -> Path:
    """Write an array as a zlib-compressed TIFF, atomically (dtype kept).

    ``axes`` (tifffile codes, e.g. ``"YX"``, ``"YXC"``, ``"CYX"``) is stored in the file;
    by default (Y, X), (Y, X, C) or (C, Y, X) is inferred with C <= :data:`MAX_CHANNELS`.
    """
    data = np.asarray(data)
    with _maybe_atomic(path, atomic) as tmp:
        _write_tiff(tmp, data, axes)
    return Path(path)


def write_png(path: str | os.PathLike[str], rgb: np.ndarray, atomic: bool = True) -> Path:
    """Write a uint8 (Y, X) or (Y, X, 3) array as PNG, atomically."""
    import imageio.v3 as iio

    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8:
        raise ValueError(f"PNG data must be uint8, got {rgb.dtype}")
    with _maybe_atomic(path, atomic) as tmp:
        iio.imwrite(tmp, rgb, extension=".png")
    return Path(path)


def write_json(path: str | os.PathLike[str], obj: Mapping[str, Any] | list[Any]) -> Path:
    """Write JSON (indented, UTF-8), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n", encoding="utf-8")
    return Path(path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def list_images(
    inputs: Sequence[str | os.PathLike[str]], exclude_suffixes: tuple[str, ...] = ("_masks",)
) -> list[Path]:
    """Expand files and directories into a sorted list of image files.

    Directories contribute their image files (not recursively), skipping files whose
    stem ends with one of ``exclude_suffixes`` (our own outputs, ground-truth masks).
    Raises the first :class:`InputError` (a missing file, a folder without images); see
    :func:`collect_images` to go on past them.
    """
    files, problems = collect_images(inputs, exclude_suffixes)
    if problems:
        raise problems[0]
    return files


def collect_images(
    inputs: Sequence[str | os.PathLike[str]], exclude_suffixes: tuple[str, ...] = ("_masks",)
) -> tuple[list[Path], list[InputError]]:
    """:func:`list_images` that goes on past bad inputs: (image files, one error per bad input)."""
    out: list[Path] = []
    problems: list[InputError] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = sorted(
                f
                for f in p.iterdir()
                if f.is_file()
                and is_image_path(f)
                and not f.name.startswith(".")
                and not any(f.stem.endswith(s) for s in exclude_suffixes)
                and not f.stem.endswith(EXTRA_OUTPUT_SUFFIXES)
            )
            if not files:
                problems.append(InputError(p, "directory contains no image files"))
            out.extend(files)
        elif not p.exists():
            problems.append(InputError(p, "no such file"))
        else:
            out.append(p)
    return out, problems
