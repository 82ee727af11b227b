"""Large and many images (issue 23): block-wise agreement with whole-image segmentation,
dask.distributed, --resume, killed runs, OME-Zarr round trips, the block-merge rules."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from cellplug import blockwise
from cellplug.cli import main
from cellplug.metrics import iou_matrix

DATA = Path(__file__).resolve().parents[1] / "data"
DIAMETER = 10.4  # the size model's estimate on dsb2018_fluo.tif, fixed to skip that step


@pytest.fixture(scope="module")
def mosaic() -> np.ndarray:
    """(200, 240) uint8: the fluorescence crop and mirrored copies, cut at odd places."""
    a = tifffile.imread(DATA / "dsb2018_fluo.tif")
    tiled = np.block([[a, a[:, ::-1]], [a[::-1], a[::-1, ::-1]]])
    return np.ascontiguousarray(tiled[40:240, 30:270])


@pytest.fixture(scope="module")
def segmenter():
    from cellplug.segmenter import Segmenter

    return Segmenter.from_model(None, threads=1)


def _opts(**kw):
    from cellplug.segmenter import SegmentOptions

    return SegmentOptions(diameter=DIAMETER, **kw)


def _ap50(a: np.ndarray, b: np.ndarray) -> float:
    iou = iou_matrix(a, b)
    tp = int((iou >= 0.5).sum())
    return tp / (iou.shape[0] + iou.shape[1] - tp)


def _cut(labels: np.ndarray, whole: np.ndarray, block: int) -> int:
    """Whole-image objects crossing a block boundary line whose best block-wise match does
    not cross it (ends at the line)."""
    iou = iou_matrix(whole, labels)
    ids_w, ids_b = np.unique(whole[whole > 0]), np.unique(labels[labels > 0])
    cut = 0
    for axis in (0, 1):
        for k in range(block, whole.shape[axis], block):
            bw, aw = np.take(whole, k - 1, axis), np.take(whole, k, axis)
            bl, al = np.take(labels, k - 1, axis), np.take(labels, k, axis)
            crossing_b = set(bl[(bl == al) & (bl > 0)].tolist())
            for w in set(bw[(bw == aw) & (bw > 0)].tolist()):
                row = iou[np.searchsorted(ids_w, w)]
                if row.max() >= 0.5 and ids_b[row.argmax()] not in crossing_b:
                    cut += 1
    return cut


class _Spy:
    """An array-like that records the windows read from it."""

    def __init__(self, data: np.ndarray) -> None:
        self.data, self.shape, self.dtype, self.ndim = data, data.shape, data.dtype, data.ndim
        self.windows: list[tuple[slice, ...]] = []

    def __getitem__(self, item):
        self.windows.append(item)
        return self.data[item]


@pytest.fixture(scope="module")
def blocks96(mosaic, segmenter):
    """Block-wise labels of the mosaic in 3 x 3 blocks of 96 (halo 48), sync scheduler;
    ``.windows``: what was read from the image."""
    spy = _Spy(mosaic)
    res = blockwise.segment_blockwise(spy, segmenter, _opts(), block=96, scheduler="sync")
    res.windows = spy.windows
    return res


def test_blockwise_reads_the_image_a_block_at_a_time(blocks96):
    """Besides the normalisation's regular subsample (every pixel for so small an image),
    one window per block is read: the block, its halo (48) and the reach of the network tiles
    that meet them (224 rescaled pixels, 224 / (30 / DIAMETER) = 78 image pixels)."""
    sample, *windows = blocks96.windows
    assert all(s.step is not None for s in sample)
    assert len(windows) == 9
    reach = int(np.ceil(224 / (30.0 / DIAMETER))) + 1
    side = 96 + 2 * 48 + 2 * reach
    assert max((w[0].stop - w[0].start) * (w[1].stop - w[1].start) for w in windows) <= side**2


# -- block-wise vs whole image ---------------------------------------------------------------
def _same_objects(a: np.ndarray, b: np.ndarray) -> bool:
    """The same objects, pixel for pixel, whatever their ids."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return pairs.shape[1] == len(np.unique(a[a > 0])) == len(np.unique(b[b > 0]))


@pytest.mark.parametrize("precision", ["auto", "fp32"])  # auto: bf16 where native
def test_blockwise_equals_the_whole_image_grid_run(mosaic, segmenter, blocks96, precision):
    """Blocks compute the whole-image tile="grid" network output (cellplug.aligned), so the
    objects are the whole image's, pixel for pixel, wherever the blocks fall."""
    whole = segmenter.segment(mosaic, _opts(tile="grid", precision=precision)).labels
    for block in (64, 96, 128):  # 4 x 4, 3 x 3 and 2 x 2 blocks of a 200 x 240 image
        res = blocks96 if block == 96 and precision == "auto" else (
            blockwise.segment_blockwise(mosaic, segmenter, _opts(precision=precision),
                                        block=block, scheduler="sync"))
        labels = res.labels
        assert labels.dtype == np.uint32 and labels.shape == mosaic.shape
        assert res.n_objects == len(np.unique(labels)) - 1  # ids 1..N, all present
        assert set(np.unique(labels)) == set(range(res.n_objects + 1))
        assert res.n_candidates > res.n_objects  # crossing objects were seen twice
        assert _same_objects(whole, labels), (block, _ap50(whole, labels))
        assert _cut(labels, whole, block) == 0, block


def test_grid_network_output_of_a_window_is_the_whole_images(mosaic, segmenter):
    """The raw output over any box equals the whole image's there, up to float rounding
    (oneDNN's sums differ in the last bits with the number of tiles in a batch)."""
    opts = _opts(tile="grid", precision="fp32")
    x = segmenter.prepare(mosaic, opts)
    for rescale in (30.0 / DIAMETER, 1.0, 0.7):
        whole, _, _ = segmenter.network(x, rescale, opts)
        for box in ((0, 200, 0, 240), (37, 151, 55, 199), (150, 200, 3, 9)):
            part, _, _ = segmenter.network_window(lambda ys, xs: x[:, ys, xs], mosaic.shape,
                                                  rescale, box, opts)
            np.testing.assert_allclose(part, whole[:, box[0]:box[1], box[2]:box[3]],
                                       rtol=0, atol=1e-4)


def test_grid_size_estimate_and_style_are_cellpose_tiled(mosaic, segmenter):
    """The diameter (one number per image) and the style auto compares are computed with
    Cellpose's tiles under tile="grid" too: the same values as the default tiling."""
    from cellplug.segmenter import SegmentOptions

    grid, tiles = SegmentOptions(tile="grid"), SegmentOptions()
    assert segmenter.estimate_diameter(mosaic, grid) == segmenter.estimate_diameter(mosaic,
                                                                                  tiles)
    x = segmenter.prepare(mosaic, tiles)
    np.testing.assert_array_equal(segmenter.default_scale_style(x, grid),
                                  segmenter.default_scale_style(x, tiles))


def test_grid_tiles_cover_every_window_and_stay_on_the_grid():
    from cellplug.aligned import PAD, grid_starts, grid_stride

    stride = grid_stride(224, 0.1)
    assert stride == 186
    for lo, hi in ((0, 1), (0, 500), (37, 38), (180, 1000), (5000, 5233)):
        starts = grid_starts(lo, hi, 224, stride)
        assert ((starts + PAD) % stride == 0).all() and (starts >= -PAD).all()
        assert starts[0] <= lo and starts[-1] + 224 >= hi  # covered
        assert (np.diff(starts) == stride).all()  # no gaps (stride < tile)
        assert starts[0] + 224 > lo and starts[-1] < hi  # every tile meets the window


def test_decide_keeps_the_version_with_more_context():
    """Two blocks saw the same object (80 % overlap): the one with more context stays; a
    barely overlapping neighbour stays too, painted below the winner."""
    a = blockwise.Candidates((0, 0), area=np.array([100.0, 50.0]), cy=np.array([10.0, 40.0]),
                             cx=np.array([60.0, 20.0]), score=np.array([30.0, 80.0]))
    b = blockwise.Candidates((0, 1), area=np.array([90.0, 60.0]), cy=np.array([10.5, 12.0]),
                             cx=np.array([61.0, 75.0]), score=np.array([50.0, 70.0]))
    pairs = {(0, 1): np.array([[1, 1, 80], [1, 2, 5]])}
    luts, prios, n = blockwise.decide([a, b], pairs)
    assert n == 3
    assert luts[0][1] == 0 and luts[1][1] > 0  # a's object 1 had less context than b's
    assert luts[0][2] > 0 and luts[1][2] > 0
    assert prios[1][2] < prios[1][1]  # b2 (score 70) above b1 (score 50)
    assert sorted([luts[0][2], luts[1][1], luts[1][2]]) == [1, 2, 3]
    assert luts[1][1] < luts[1][2] and luts[0][2] == 3  # raster order of centroids


def test_layout_covers_the_image_once():
    lay = blockwise.BlockLayout((300, 500), 128, 40)
    seen = np.zeros((300, 500), int)
    for b in lay.blocks():
        y0, y1, x0, x1 = lay.core(*b)
        seen[y0:y1, x0:x1] += 1
        e = lay.extended(*b)
        assert e[0] == max(0, y0 - 40) and e[3] == min(500, x1 + 40)
    assert (seen == 1).all() and lay.grid == (3, 4)
    assert (1, 1) in lay.neighbours(0, 0) and (2, 3) not in lay.neighbours(0, 0)


# -- dask.distributed ----------------------------------------------------------------------
@pytest.mark.slow
def test_local_cluster_gives_the_same_labels(mosaic, segmenter, blocks96, tmp_path):
    distributed = pytest.importorskip("distributed")
    img = tmp_path / "in" / "mosaic.tif"
    img.parent.mkdir()
    tifffile.imwrite(img, mosaic, tile=(64, 64), metadata={"axes": "YX"})
    fluo = tifffile.imread(DATA / "dsb2018_fluo.tif")
    tifffile.imwrite(img.parent / "fluo.tif", fluo, metadata={"axes": "YX"})
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        # block-wise: the model goes to the workers by name; each loads it once
        from cellplug.lazy import open_image

        res = blockwise.segment_blockwise(open_image(img), None, _opts(), block=96,
                                          scheduler=cluster.scheduler_address, threads=1,
                                          scratch_dir=tmp_path)
        np.testing.assert_array_equal(res.labels, blocks96.labels)
        # a batch: one task per image
        r = CliRunner().invoke(main, ["segment", str(img.parent), "--diameter", str(DIAMETER),
                                      "--threads", "1", "-q", "--out", str(tmp_path / "out"),
                                      "--dask-scheduler", cluster.scheduler_address])
        assert r.exit_code == 0, r.output
    for name, image in (("mosaic_masks.tif", mosaic), ("fluo_masks.tif", fluo)):
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / name),
                                      segmenter.segment(image, _opts()).labels)


# -- batches ----------------------------------------------------------------------------------
def _inputs(folder: Path, n: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    a = tifffile.imread(DATA / "dsb2018_fluo.tif")
    paths = []
    for k in range(n):
        p = folder / f"img{k}.tif"
        tifffile.imwrite(p, np.rot90(a, k).copy(), metadata={"axes": "YX"})
        paths.append(p)
    return paths


def test_resume_skips_finished_images_and_measures(tmp_path):
    _inputs(tmp_path / "in")
    out = tmp_path / "out"
    args = ["segment", str(tmp_path / "in"), "--out", str(out), "--diameter", str(DIAMETER),
            "--measure", "csv", "-q"]
    assert CliRunner().invoke(main, args).exit_code == 0
    (out / "img1_masks.tif").unlink()  # as if the run had stopped before img1
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    r = CliRunner().invoke(main, [*args, "--resume", "--summary-csv", str(out / "s.csv")])
    assert r.exit_code == 0, r.output
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert after["img0_masks.tif"] == before["img0_masks.tif"]
    assert after["img2_objects.csv"] == before["img2_objects.csv"]
    assert after["img1_objects.csv"] != before["img1_objects.csv"]  # redone, both outputs
    rows = (out / "s.csv").read_text().splitlines()
    assert rows[0].startswith("image,status,objects")
    status = {Path(r.split(",")[0]).name: r.split(",")[1] for r in rows[1:]}
    assert status == {"img0.tif": "skipped", "img1.tif": "ok", "img2.tif": "skipped"}
    import csv

    done = next(r for r in csv.DictReader(rows) if r["status"] == "ok")
    assert 0 < float(done["network_seconds"]) <= float(done["seconds"])
    table = (out / "img1_objects.csv").read_text().splitlines()
    assert table[0].split(",")[:3] == ["label", "area", "centroid-0"]
    assert "solidity" in table[0] and "intensity_mean-0" in table[0]
    labels = tifffile.imread(out / "img1_masks.tif")
    assert len(table) - 1 == labels.max()


def _cellplug() -> list[str]:
    return [sys.executable, "-c", "from cellplug.cli import main; main()"]


@pytest.mark.slow
def test_killed_run_leaves_no_half_written_output(tmp_path):
    """SIGKILL (no handler runs) while outputs are being written: every output present is
    complete, and --resume finishes the rest."""
    _inputs(tmp_path / "in", 4)
    out = tmp_path / "out"
    cmd = [*_cellplug(), "segment", str(tmp_path / "in"), "--out", str(out), "--diameter",
           str(DIAMETER), "--save", "flows", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(out.glob("*_masks.tif")):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name[: -len("_masks.tif")] for p in out.glob("*_masks.tif"))
    assert 1 <= len(finished) < 4
    for stem in finished:  # both outputs of an image, or neither; each readable
        assert tifffile.imread(out / f"{stem}_masks.tif").max() > 0
        assert tifffile.imread(out / f"{stem}_flows.tif").shape[0] == 2
    visible = [p.name for p in out.iterdir() if not p.name.startswith(".")]
    assert len(visible) == 2 * len(finished)  # anything else is a hidden temporary file
    r = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(list(out.glob("*_masks.tif"))) == 4


@pytest.mark.slow
def test_killed_blockwise_run_leaves_no_labels(tmp_path, mosaic):
    src = tmp_path / "big.tif"
    tifffile.imwrite(src, mosaic, tile=(64, 64), metadata={"axes": "YX"})
    cmd = [*_cellplug(), "segment", str(src), "--out", str(tmp_path / "out"), "--diameter",
           str(DIAMETER), "--block-size", "64", "--labels-format", "ome-zarr", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((tmp_path / "out").glob(".big*partial*")):
        time.sleep(0.02)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out" / "big.ome.zarr").exists()


# -- OME-Zarr --------------------------------------------------------------------------------
@pytest.fixture(params=["0.4", "0.5"])
def ome_image(request, tmp_path, mosaic) -> Path:
    """An OME-Zarr image written by ome-zarr's own writer, in NGFF 0.4 or 0.5."""
    zarr = pytest.importorskip("zarr")
    fmt = pytest.importorskip("ome_zarr.format")
    from ome_zarr.writer import write_image

    path = tmp_path / "img.ome.zarr"
    v04 = request.param == "0.4"
    group = zarr.open_group(str(path), mode="w", zarr_format=2 if v04 else 3)
    write_image(mosaic, group, axes="yx", scale_factors=(),
                fmt=fmt.FormatV04() if v04 else fmt.FormatV05())
    return path


def _ome_nodes(path: Path) -> list:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    return list(Reader(parse_url(str(path)))())


def test_ome_zarr_round_trip(ome_image, blocks96, request):
    """cellplug segment IMG.ome.zarr writes labels/masks beside the image; ome-zarr's reader
    finds the image and the labels, and they are the block-wise result (the CLI runs the
    blocks on dask threads and writes zarr chunks; ``blocks96`` ran synchronously into
    memory)."""
    args = ["segment", str(ome_image), "--diameter", str(DIAMETER), "--threads", "1", "-q"]
    r = CliRunner().invoke(main, [*args, "--block-size", "96"])
    assert r.exit_code == 0, r.output
    nodes = _ome_nodes(ome_image)
    specs = {type(s).__name__ for n in nodes for s in n.specs}
    assert {"Multiscales", "Labels", "Label"} <= specs
    label = next(n for n in nodes if any(type(s).__name__ == "Label" for s in n.specs))
    got = np.asarray(label.data[0])
    assert got.shape == tuple(nodes[0].data[0].shape)  # the image is the first node
    np.testing.assert_array_equal(got, blocks96.labels)
    if request.node.callspec.params["ome_image"] == "0.4":  # again: replaced in place
        r = CliRunner().invoke(main, [*args, "--block-size", "128"])
        assert r.exit_code == 0, r.output
        from cellplug.lazy import ngff_attrs

        assert ngff_attrs(ome_image / "labels")["labels"] == ["masks"]
        assert not [p for p in (ome_image / "labels").iterdir() if p.name.startswith(".m")]


def test_tiff_to_new_ome_zarr_and_tiled_tiff(tmp_path, mosaic):
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, mosaic, tile=(64, 64), metadata={"axes": "YX"})
    base = ["segment", str(src), "--out", str(tmp_path / "out"), "--diameter", str(DIAMETER),
            "--block-size", "96", "--threads", "1", "-q"]
    assert CliRunner().invoke(main, base).exit_code == 0
    assert CliRunner().invoke(main, [*base, "--labels-format", "ome-zarr"]).exit_code == 0
    tiff = tifffile.imread(tmp_path / "out" / "in_masks.tif")
    with tifffile.TiffFile(tmp_path / "out" / "in_masks.tif") as tf:
        assert tf.pages[0].is_tiled
    nodes = _ome_nodes(tmp_path / "out" / "in.ome.zarr")
    np.testing.assert_array_equal(np.asarray(nodes[0].data[0]), mosaic)  # the image, copied
    label = next(n for n in nodes if any(type(s).__name__ == "Label" for s in n.specs))
    np.testing.assert_array_equal(np.asarray(label.data[0]), tiff)


def test_napari_reads_the_labels(tmp_path, mosaic):
    """napari's OME-Zarr reader (napari-ome-zarr) opens the image and its labels."""
    if os.environ.get("CELLPLUG_REQUIRE_NAPARI"):  # nox -s napari: never a silent skip
        import napari  # noqa: F401
        import napari_ome_zarr as reader_mod
    else:
        pytest.importorskip("napari", reason="napari is not installed in this environment "
                                             "(nox -s napari installs it and runs this test)")
        reader_mod = pytest.importorskip("napari_ome_zarr", reason="napari-ome-zarr is not "
                                         "installed (nox -s napari installs it)")
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, mosaic, metadata={"axes": "YX"})
    r = CliRunner().invoke(main, ["segment", str(src), "--out", str(tmp_path), "--diameter",
                                  str(DIAMETER), "--block-size", "96", "--labels-format",
                                  "ome-zarr", "-q"])
    assert r.exit_code == 0, r.output
    reader = reader_mod.napari_get_reader(str(tmp_path / "in.ome.zarr"))
    assert reader is not None
    layers = reader(str(tmp_path / "in.ome.zarr"))
    kinds = [layer[2] if len(layer) > 2 else "image" for layer in layers]
    assert "labels" in kinds and "image" in kinds
    data = next(layer[0] for layer, kind in zip(layers, kinds, strict=True) if kind == "labels")
    data = data[0] if isinstance(data, list) else data
    assert np.asarray(data).shape == mosaic.shape and np.asarray(data).max() > 0


# -- lazy reading ----------------------------------------------------------------------------
def test_lazy_tiff_windows_in_yxc_order(tmp_path):
    from cellplug.errors import InputError
    from cellplug.lazy import open_image

    data = np.arange(2 * 300 * 200, dtype=np.uint16).reshape(2, 300, 200)
    tifffile.imwrite(tmp_path / "cyx.tif", data, tile=(64, 64), metadata={"axes": "CYX"})
    img = open_image(tmp_path / "cyx.tif")
    assert img.shape == (300, 200, 2)
    np.testing.assert_array_equal(img[10:50, 100:180], np.moveaxis(data, 0, -1)[10:50, 100:180])
    np.testing.assert_array_equal(img[::7, ::5], np.moveaxis(data, 0, -1)[::7, ::5])
    tifffile.imwrite(tmp_path / "zyx.tif", data[:, :40, :40].repeat(5, 0),
                     metadata={"axes": "ZYX"})
    with pytest.raises(InputError, match="stack"):
        open_image(tmp_path / "zyx.tif")
    import pickle

    assert pickle.loads(pickle.dumps(img))[0:2, 0:2].shape == (2, 2, 2)


# -- stacks ------------------------------------------------------------------------------------
def test_zstack_planes_and_stitching(tmp_path):
    a = tifffile.imread(DATA / "dsb2018_fluo.tif")
    stack = np.stack([np.roll(a, k, axis=1) for k in range(3)])  # objects move 1 px per plane
    tifffile.imwrite(tmp_path / "z.tif", stack, metadata={"axes": "ZYX"})
    hyper = np.stack([stack[:2, :80, :80], stack[1:, :80, :80]])[:, :, None]  # T, Z, C, Y, X
    tifffile.imwrite(tmp_path / "tz.tif", hyper, imagej=True, metadata={"axes": "TZCYX"})
    base = ["segment", "--diameter", str(DIAMETER), "--stack", "-q"]
    r = CliRunner().invoke(main, [*base, str(tmp_path / "z.tif"), "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    planes = tifffile.imread(tmp_path / "a" / "z_masks.tif")
    with tifffile.TiffFile(tmp_path / "a" / "z_masks.tif") as tf:
        assert tf.series[0].axes == "ZYX"
    per_plane = [len(np.unique(p)) - 1 for p in planes]
    assert len(np.unique(planes)) - 1 == sum(per_plane)  # ids numbered through the stack
    r = CliRunner().invoke(main, [*base, str(tmp_path / "z.tif"), str(tmp_path / "tz.tif"),
                                  "--stitch-threshold", "0.5", "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    stitched = tifffile.imread(tmp_path / "b" / "z_masks.tif")
    assert ((stitched > 0) == (planes > 0)).all()
    n = len(np.unique(stitched)) - 1
    assert max(per_plane) <= n <= 1.1 * max(per_plane)  # objects linked through z
    ids0 = set(np.unique(stitched[0])) - {0}
    assert len(ids0 & set(np.unique(stitched[2]))) >= 0.9 * len(ids0)
    tz = tifffile.imread(tmp_path / "b" / "tz_masks.tif")
    assert tz.shape == (2, 2, 80, 80) and tz.max() > 0
