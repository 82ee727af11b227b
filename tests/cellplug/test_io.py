"""Reading images and labels, writing results atomically."""

from __future__ import annotations

import os
import warnings

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from cellplug import io
from cellplug.errors import InputError

DTYPES = [np.uint8, np.uint16, np.float32]
SHAPES = {"2d": (24, 40), "rgb": (24, 40, 3)}


def _random(shape, dtype, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True).astype(dtype)
    return (rng.standard_normal(shape) * 1000).astype(dtype)


def _files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- round trips -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("kind", SHAPES)
def test_tiff_round_trip(tmp_path, dtype, kind):
    data = _random(SHAPES[kind], dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no tifffile deprecation about ambiguous shapes
        io.write_tiff(tmp_path / "x.tif", data)
    back = io.read_image(tmp_path / "x.tif")
    assert back.dtype == dtype and back.shape == data.shape
    np.testing.assert_array_equal(back, data)


@pytest.mark.parametrize("channels", [2, 4, 5])
def test_tiff_round_trip_other_channel_counts(tmp_path, channels):
    data = _random((16, 20, channels), np.uint16)
    io.write_tiff(tmp_path / "x.tif", data)
    np.testing.assert_array_equal(io.read_image(tmp_path / "x.tif"), data)


def test_tiff_written_by_tifffile_directly(tmp_path):
    """What users have: files written by tifffile (or Fiji) without our helpers."""
    rgb = _random((16, 20, 3), np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    np.testing.assert_array_equal(io.read_image(tmp_path / "rgb.tif"), rgb)
    grey = _random((16, 20), np.float32)
    tifffile.imwrite(tmp_path / "grey.tif", grey)
    np.testing.assert_array_equal(io.read_image(tmp_path / "grey.tif"), grey)


@pytest.mark.parametrize("kind", SHAPES)
def test_png_round_trip_uint8(tmp_path, kind):
    data = _random(SHAPES[kind], np.uint8)
    io.write_png(tmp_path / "x.png", data)
    back = io.read_image(tmp_path / "x.png")
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, data)


def test_png_uint16_is_read_in_its_own_dtype(tmp_path):
    data = _random(SHAPES["2d"], np.uint16)  # (Pillow writes no 16-bit RGB PNG)
    iio.imwrite(tmp_path / "x.png", data)
    back = io.read_image(tmp_path / "x.png")
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, data)


@pytest.mark.parametrize("channels", [2, 4], ids=["grey+alpha", "rgba"])
def test_png_alpha_is_dropped(tmp_path, channels):
    data = _random((12, 10, channels), np.uint8)
    iio.imwrite(tmp_path / "a.png", data)
    np.testing.assert_array_equal(io.read_image(tmp_path / "a.png"), np.squeeze(data[..., :-1]))


def test_png_refuses_non_uint8(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        io.write_png(tmp_path / "x.png", np.zeros((4, 4), np.uint16))
    assert _files(tmp_path) == []


def test_bool_image_becomes_uint8(tmp_path):
    tifffile.imwrite(tmp_path / "b.tif", np.eye(8, dtype=bool))
    back = io.read_image(tmp_path / "b.tif")
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, np.eye(8))


def test_real_test_images(data_dir):
    assert io.read_image(data_dir / "dsb2018_fluo.tif").shape == (160, 160)
    he = io.read_image(data_dir / "dsb2018_he.tif")
    assert he.shape == (128, 128, 3) and he.dtype == np.uint8
    labels = io.read_labels(data_dir / "dsb2018_fluo_masks.tif")
    assert labels.shape == (160, 160) and labels.max() > 0


# -- axes ------------------------------------------------------------------------------------
def test_ome_cyx_becomes_yxc(tmp_path):
    data = _random((3, 16, 20), np.uint16)
    tifffile.imwrite(tmp_path / "x.ome.tif", data, metadata={"axes": "CYX"})
    back = io.read_image(tmp_path / "x.ome.tif")
    assert back.shape == (16, 20, 3)
    np.testing.assert_array_equal(back, np.moveaxis(data, 0, -1))


def test_imagej_hyperstack_cyx(tmp_path):
    data = _random((2, 16, 20), np.uint8)
    tifffile.imwrite(tmp_path / "x.tif", data, imagej=True, metadata={"axes": "CYX"})
    np.testing.assert_array_equal(io.read_image(tmp_path / "x.tif"), np.moveaxis(data, 0, -1))


def test_singleton_axes_are_squeezed(tmp_path):
    data = _random((1, 1, 1, 16, 20), np.float32)
    tifffile.imwrite(tmp_path / "x.ome.tif", data, metadata={"axes": "TCZYX"})
    back = io.read_image(tmp_path / "x.ome.tif")
    assert back.shape == (16, 20)
    np.testing.assert_array_equal(back, data[0, 0, 0])


def test_pages_without_axes_are_channels(tmp_path):
    """A (2, Y, X) array saved by plain tifffile (axes 'QYX'), as Cellpose users do."""
    data = _random((2, 16, 20), np.uint8)
    tifffile.imwrite(tmp_path / "x.tif", data, photometric="minisblack")
    np.testing.assert_array_equal(io.read_image(tmp_path / "x.tif"), np.moveaxis(data, 0, -1))


@pytest.mark.parametrize(
    ("shape", "axes"),
    [((3, 16, 20), "ZYX"), ((2, 2, 16, 20), "ZCYX"), ((4, 16, 20), "TYX")],
)
def test_stacks_are_rejected(tmp_path, shape, axes):
    path = tmp_path / "stack.ome.tif"
    tifffile.imwrite(path, np.zeros(shape, np.uint8), metadata={"axes": axes})
    with pytest.raises(InputError) as err:
        io.read_image(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: expected a 2-D image (Y, X) or (Y, X, C); got axes {axes}")
    assert "z-stacks and time series are not supported" in msg and "\n" not in msg


def test_too_many_pages_are_a_stack(tmp_path):
    path = tmp_path / "pages.tif"
    tifffile.imwrite(path, np.zeros((12, 16, 20), np.uint8), photometric="minisblack")
    with pytest.raises(InputError, match="got axes QYX"):
        io.read_image(path)


def test_too_many_channels(tmp_path):
    path = tmp_path / "c.ome.tif"
    tifffile.imwrite(path, np.zeros((12, 16, 20), np.uint8), metadata={"axes": "CYX"})
    with pytest.raises(InputError, match="12 channels is too many"):
        io.read_image(path)


# -- bad inputs ------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"nope\.tif: no such file$"):
        io.read_image(tmp_path / "nope.tif")


def test_directory(tmp_path):
    with pytest.raises(InputError, match="is a directory"):
        io.read_image(tmp_path)


def test_corrupt_tiff(tmp_path):
    path = tmp_path / "bad.tif"
    path.write_bytes(b"this is not a tiff file at all")
    with pytest.raises(InputError) as err:
        io.read_image(path)
    assert str(err.value).startswith(f"{path}: not a readable TIFF")
    assert err.value.path == path


def test_truncated_tiff(tmp_path):
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, _random((64, 64), np.uint16))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(InputError, match="cut.tif: "):
        io.read_image(path)


def test_corrupt_png(tmp_path):
    path = tmp_path / "bad.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(InputError, match="bad.png: not a readable image"):
        io.read_image(path)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_and_inf(tmp_path, value):
    data = np.ones((8, 8), np.float32)
    data[3, 4] = value
    tifffile.imwrite(tmp_path / "x.tif", data)
    with pytest.raises(InputError, match="NaN" if np.isnan(value) else "infinite"):
        io.read_image(tmp_path / "x.tif")


@pytest.mark.parametrize("shape", [(0, 16), (16, 0)])
def test_empty_image(tmp_path, shape):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tifffile: "writing zero-size array"
        tifffile.imwrite(tmp_path / "e.tif", np.zeros(shape, np.uint8))
    with pytest.raises(InputError, match=r"image is empty \(shape"):
        io.read_image(tmp_path / "e.tif")


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "x.gif"
    path.write_bytes(b"GIF89a")
    with pytest.raises(InputError, match="unsupported file type '.gif'"):
        io.read_image(path)


def test_complex_pixels(tmp_path):
    tifffile.imwrite(tmp_path / "c.tif", np.zeros((4, 4), np.complex64))
    with pytest.raises(InputError, match="unsupported pixel type complex64"):
        io.read_image(tmp_path / "c.tif")


# -- labels ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("largest", "dtype"), [(0, np.uint16), (65535, np.uint16), (65536, np.uint32)]
)
def test_labels_dtype_by_largest_label(tmp_path, largest, dtype):
    labels = np.zeros((6, 7), np.int64)
    labels[1, 2] = largest
    labels[3, 3] = 1 if largest else 0
    io.write_labels(tmp_path / "m.tif", labels)
    assert tifffile.imread(tmp_path / "m.tif").dtype == dtype
    back = io.read_labels(tmp_path / "m.tif")
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, labels)


def test_labels_must_be_2d(tmp_path):
    with pytest.raises(ValueError, match="labels must be 2-D"):
        io.write_labels(tmp_path / "m.tif", np.zeros((2, 3, 4), np.uint16))
    assert _files(tmp_path) == []
    io.write_tiff(tmp_path / "rgb.tif", np.zeros((5, 5, 3), np.uint8))
    with pytest.raises(InputError, match="label image must be 2-D"):
        io.read_labels(tmp_path / "rgb.tif")


def test_float_labels(tmp_path):
    tifffile.imwrite(tmp_path / "ok.tif", np.array([[0, 1], [2, 2]], np.float32))
    np.testing.assert_array_equal(io.read_labels(tmp_path / "ok.tif"), [[0, 1], [2, 2]])
    tifffile.imwrite(tmp_path / "frac.tif", np.array([[0, 1.5]], np.float32))
    with pytest.raises(InputError, match="non-integer"):
        io.read_labels(tmp_path / "frac.tif")
    tifffile.imwrite(tmp_path / "neg.tif", np.array([[0, -1]], np.int16))
    with pytest.raises(InputError, match="negative"):
        io.read_labels(tmp_path / "neg.tif")


# -- atomic writes ----------------------------------------------------------------------------
def test_atomic_path_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out" / "result.tif"
    with pytest.raises(RuntimeError), io.atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".")
        tmp.write_bytes(b"half written")
        raise RuntimeError("disk full")
    assert _files(target.parent) == []


def test_atomic_path_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "result.json"
    io.write_json(target, {"run": 1})
    with pytest.raises(KeyboardInterrupt), io.atomic_path(target) as tmp:
        tmp.write_text("{")
        raise KeyboardInterrupt
    assert _files(tmp_path) == ["result.json"]
    assert target.read_text() == '{\n  "run": 1\n}\n'


def test_failed_writer_leaves_no_temp_file(tmp_path):
    with pytest.raises(TypeError):
        io.write_json(tmp_path / "x.json", {"obj": object()})
    with pytest.raises(Exception):  # noqa: B017 - whatever tifffile raises
        io.write_tiff(tmp_path / "x.tif", np.zeros((4, 4), object))
    assert _files(tmp_path) == []


def test_written_files_are_not_private(tmp_path):
    path = io.write_labels(tmp_path / "m.tif", np.ones((4, 4), np.uint8))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_write_json_numpy_values(tmp_path):
    path = io.write_json(tmp_path / "s.json", {"n": np.int64(3), "a": np.arange(2),
                                               "p": tmp_path, "f": np.float32(0.5)})
    assert path.read_text() == (
        f'{{\n  "n": 3,\n  "a": [\n    0,\n    1\n  ],\n  "p": "{tmp_path}",\n  "f": 0.5\n}}\n'
    )


# -- listing inputs ----------------------------------------------------------------------------
def test_list_images_skips_masks_outputs_and_hidden_files(tmp_path):
    for name in ["b.tif", "a.png", "a_masks.png", "b_masks.tif", "b_flows.tif", "b_overlay.png",
                 "b_cellprob.tif", ".b.1234.tif", "notes.txt", "summary.json", "C.TIFF"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep.tif").write_bytes(b"")
    assert [p.name for p in io.list_images([tmp_path])] == ["C.TIFF", "a.png", "b.tif"]


def test_list_images_keeps_explicit_files_in_order(tmp_path):
    for name in ["z.tif", "a_masks.tif"]:
        (tmp_path / name).write_bytes(b"")
    got = io.list_images([tmp_path / "z.tif", tmp_path / "a_masks.tif"])
    assert got == [tmp_path / "z.tif", tmp_path / "a_masks.tif"]


def test_list_images_errors(tmp_path):
    with pytest.raises(InputError, match="missing.tif: no such file"):
        io.list_images([tmp_path / "missing.tif"])
    (tmp_path / "only_masks.tif").write_bytes(b"")
    with pytest.raises(InputError, match="directory contains no image files"):
        io.list_images([tmp_path])


def test_atomic_paths_rolls_back_when_a_later_replacement_fails(tmp_path):
    first, second = tmp_path / "a_masks.tif", tmp_path / "a_overlay.png"
    first.write_bytes(b"old masks")
    with pytest.raises(OSError), io.atomic_paths([first, second]) as (t1, t2):
        t1.write_bytes(b"new masks")
        t2.write_bytes(b"new overlay")
        second.mkdir()  # appears while writing: the second rename fails after the first
    assert first.read_bytes() == b"old masks"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_masks.tif", "a_overlay.png"]
    assert second.is_dir() and not list(second.iterdir())
