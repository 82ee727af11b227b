"""The command line, through click's CliRunner (and once through the installed script).

``plugins list`` tests expect the test dists of ``tests/plugins/dists/`` to be installed
(``nox -s tests`` does it); they fail, not skip, without them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

import cellplug
from cellplug import io
from cellplug.cli import main
from cellplug.plugins import set_registry

BROKEN_ERROR = "import failed: ModuleNotFoundError: No module named 'cellplug_missing_dependency'"


@pytest.fixture(autouse=True)
def fresh_registry():
    """Every invocation loads the plugins itself, as a new process would."""
    set_registry(None)
    yield
    set_registry(None)


def run(*args: str | Path, code: int = 0):
    result = CliRunner(catch_exceptions=False).invoke(main, [str(a) for a in args])
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.stderr
    if code != 2:  # (2: click's own usage errors) stderr holds one-line reports only
        for line in result.stderr.splitlines():
            assert line.startswith(("warning: ", "error: ")), line
    return result


def errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# -- basics -------------------------------------------------------------------------------
def test_version():
    assert run("--version").stdout == f"cellplug, version {cellplug.__version__}\n"


def test_help_lists_the_commands():
    out = run("--help").stdout
    for command in ("plugins", "models", "segment", "train"):
        assert command in out


# -- plugins list ----------------------------------------------------------------------------
def test_plugins_list_table():
    result = run("plugins", "list")
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["kind", "name", "plugin", "distribution", "status"]
    rows = {tuple(line.split()[:2]): line for line in lines[1:]}
    version = cellplug.__version__
    for kind, name in [("backbone", "cellpose-unet"), ("decoder", "cellpose-flows"),
                       ("reconstructor", "cellpose-dynamics"), ("selector", "nearest-centroid"),
                       ("source", "mask-folder")]:
        assert f"cellplug {version}" in rows[kind, name] and rows[kind, name].endswith("ok")
    assert ("selector", "first-model") in rows, "example test plugin is not installed"
    assert "cellplug-example-plugin 0.1.0" in rows["selector", "first-model"]
    assert ("backbone", "example-tiny") in rows and ("source", "example-npz") in rows
    broken = rows["?", "broken"]
    assert "cellplug-broken-plugin 0.1.0" in broken
    assert broken.endswith(f"error: {BROKEN_ERROR}")
    # the load failure is also reported once, as one line, on stderr
    assert [line for line in result.stderr.splitlines() if "'broken'" in line] == [
        f"warning: cellplug plugin 'broken' (cellplug_broken.plugin) skipped: {BROKEN_ERROR}"
    ]


def test_plugins_list_json():
    rows = json.loads(run("plugins", "list", "--json").stdout)
    by_name = {(r["kind"], r["name"]): r for r in rows}
    assert by_name["backbone", "cellpose-unet"]["distribution"] == "cellplug"
    assert by_name["backbone", "example-tiny"] == {
        "kind": "backbone", "name": "example-tiny", "plugin": "example",
        "distribution": "cellplug-example-plugin", "version": "0.1.0", "status": "ok",
        "models": [],  # no installed model has its layout
    }
    assert by_name["?", "broken"]["status"] == f"error: {BROKEN_ERROR}"


def test_plugins_list_kind():
    rows = json.loads(run("plugins", "list", "--kind", "selector", "--json").stdout)
    assert {r["name"] for r in rows} == {"nearest-centroid", "first-model", "broken"}
    table = run("plugins", "list", "--kind", "backbone").stdout
    assert "cellpose-unet" in table and "mask-folder" not in table and "broken" in table


def test_plugins_list_bad_kind():
    result = run("plugins", "list", "--kind", "backbones", code=2)
    assert "Invalid value for '--kind'" in result.stderr


def test_installed_console_script():
    """The real thing: a new process, the installed entry points and console script."""
    script = Path(sys.executable).with_name("cellplug")
    if not script.exists():
        script = shutil.which("cellplug")
    cmd = [str(script)] if script else [sys.executable, "-m", "cellplug.cli"]
    proc = subprocess.run([*cmd, "plugins", "list"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "cellplug-example-plugin" in proc.stdout
    broken = [line for line in proc.stdout.splitlines() if line.startswith("?")]
    assert len(broken) == 1 and broken[0].endswith(f"error: {BROKEN_ERROR}")
    assert proc.stderr.splitlines() == [
        f"warning: cellplug plugin 'broken' (cellplug_broken.plugin) skipped: {BROKEN_ERROR}"
    ]


# -- models list -----------------------------------------------------------------------------
def test_models_list_shows_user_models(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLPLUG_MODELS", str(tmp_path))
    (tmp_path / "mine.pth").write_bytes(b"")  # listing reads metadata only
    (tmp_path / "mine.json").write_text(json.dumps({"name": "mine", "diam_mean": 17.0}))
    line = [ln for ln in run("models", "list").stdout.splitlines() if " mine " in ln]
    assert len(line) == 1 and "user" in line[0] and "diam_mean=17.0" in line[0]
    rows = {r["name"]: r for r in json.loads(run("models", "list", "--json").stdout)}
    assert rows["mine"] == {
        "name": "mine", "origin": "user", "default": False, "diam_mean": 17.0,
        "size_model": False, "weights": str(tmp_path / "mine.pth"),
    }


def test_models_list_bad_metadata(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLPLUG_MODELS", str(tmp_path))
    (tmp_path / "bad.pth").write_bytes(b"")
    (tmp_path / "bad.json").write_text("{not json")
    # one broken file in the user folder is skipped with a warning, the rest still listed
    result = run("models", "list")
    warned = [w for w in result.stderr.splitlines() if "skipped user model 'bad'" in w]
    assert len(warned) == 1 and f"{tmp_path / 'bad.json'}: unreadable model metadata" in warned[0]
    assert "generalist" in result.stdout and "bad" not in result.stdout


# -- segment ---------------------------------------------------------------------------------
def test_segment_folder_writes_masks_beside_inputs(tmp_path, data_dir, random_model):
    shutil.copy(data_dir / "dsb2018_fluo.tif", tmp_path / "cells.tif")
    shutil.copy(data_dir / "dsb2018_fluo_masks.tif", tmp_path / "cells_truth_masks.tif")
    (tmp_path / "notes.txt").write_text("not an image")
    result = run("segment", tmp_path, "--model", random_model, "--diameter", "17",
                 "--threads", "1")
    assert _files(tmp_path) == ["cells.tif", "cells_masks.tif", "cells_truth_masks.tif",
                                "notes.txt"]
    masks = tifffile.imread(tmp_path / "cells_masks.tif")
    assert masks.shape == (160, 160) and masks.dtype == np.uint16
    assert result.stdout.startswith(f"{tmp_path / 'cells.tif'}: ")
    assert result.stdout.rstrip().endswith(f"-> {tmp_path / 'cells_masks.tif'}")
    assert errors(result) == []


def test_segment_tile_and_precision_options(tmp_path, data_dir, random_model):
    """Cellpose-identical mode (tiles, float32) and whole-image mode both run; the labels are
    the same size and the flows differ only slightly between the two network passes."""
    shutil.copy(data_dir / "dsb2018_fluo.tif", tmp_path / "cells.tif")
    flows = {}
    for tile, precision in (("on", "fp32"), ("off", "bf16"), ("auto", "auto")):
        out = tmp_path / tile
        run("segment", tmp_path / "cells.tif", "--out", out, "--model", random_model,
            "--diameter", "17", "--tile", tile, "--precision", precision, "--save", "flows",
            "--threads", "1")
        assert tifffile.imread(out / "cells_masks.tif").shape == (160, 160)
        flows[tile] = tifffile.imread(out / "cells_flows.tif")
    assert flows["on"].shape == flows["off"].shape == (2, 160, 160)
    assert not np.array_equal(flows["on"], flows["off"])
    run("segment", tmp_path / "cells.tif", "--model", random_model, "--tile", "sometimes", code=2)


def test_segment_extras_and_json(tmp_path, data_dir, random_model):
    out = tmp_path / "out"
    image = data_dir / "dsb2018_fluo.tif"
    # the random model's cell probability is just below 0 everywhere: thresholds that let it
    # find objects, so that the object count below is not trivially 0
    result = run("segment", image, "--model", random_model, "--out", out, "--save", "overlay",
                 "--save", "flows", "--json", "--diameter", "17", "--threads", "1",
                 "--cellprob-threshold", "-1", "--flow-threshold", "0")
    assert _files(out) == ["dsb2018_fluo_flows.tif", "dsb2018_fluo_masks.tif",
                           "dsb2018_fluo_overlay.png", "summary.json"]
    doc = json.loads(result.stdout)
    assert doc == json.loads((out / "summary.json").read_text())
    assert doc["model"] == "random"
    (entry,) = doc["images"]
    assert entry["image"] == str(image)
    assert entry["masks"] == str(out / "dsb2018_fluo_masks.tif")
    masks = io.read_labels(out / "dsb2018_fluo_masks.tif")
    assert entry["diameter"] == 17.0 and entry["objects"] == len(np.unique(masks)) - 1 > 0
    assert sorted(entry["outputs"]) == [str(out / f) for f in _files(out)[:3]]
    flows = io.read_image(out / "dsb2018_fluo_flows.tif")
    assert flows.shape == (160, 160, 2) and flows.dtype == np.float32
    overlay = io.read_image(out / "dsb2018_fluo_overlay.png")
    assert overlay.shape == (160, 160, 3) and overlay.dtype == np.uint8
    assert io.read_labels(out / "dsb2018_fluo_masks.tif").max() == entry["objects"]


def test_segment_good_and_bad_inputs(tmp_path, data_dir, random_model):
    """A bad image is reported; the others are still segmented; exit code 1."""
    shutil.copy(data_dir / "dsb2018_fluo.tif", tmp_path / "good.tif")
    (tmp_path / "bad.tif").write_bytes(b"garbage")
    out = tmp_path / "out"
    result = run("segment", tmp_path / "bad.tif", tmp_path / "good.tif", "--model", random_model,
                 "--out", out, "--diameter", "17", "--threads", "1", "-q", code=1)
    (line,) = errors(result)
    assert line.startswith(f"error: {tmp_path / 'bad.tif'}: not a readable TIFF (TiffFileError: ")
    assert _files(out) == ["good_masks.tif"]


def test_segment_error_about_an_image_names_it(tmp_path, data_dir, random_model):
    image = data_dir / "dsb2018_he.tif"  # RGB
    out = tmp_path / "out"
    result = run("segment", image, "--model", random_model, "--out", out, "--channels", "5", "0",
                 code=1)
    (line,) = errors(result)
    assert line.startswith(f"error: {image}: ") and "5" in line
    assert _files(out) == []


def test_segment_write_failure_removes_partial_outputs(tmp_path, data_dir, random_model,
                                                        monkeypatch):
    def disk_full(path, rgb, atomic=True):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io, "write_png", disk_full)
    out = tmp_path / "out"
    image = data_dir / "dsb2018_fluo.tif"
    result = run("segment", image, "--model", random_model, "--out", out,
                 "--save", "overlay", "--diameter", "17", "--threads", "1", code=1)
    assert errors(result) == [
        f"error: {image}: cannot write {out / 'dsb2018_fluo_overlay.png'} "
        "(No space left on device)"
    ]
    assert _files(out) == []


def _write_bad(kind: str, folder: Path) -> Path:
    """Create one kind of unusable input in ``folder``; return the path to pass."""
    path = folder / f"{kind}.tif"
    if kind == "missing":
        return path
    if kind == "corrupt":
        path.write_bytes(b"II*\x00 definitely not a tiff" * 4)
    elif kind == "nan":
        data = np.ones((32, 32), np.float32)
        data[5, 5] = np.nan
        tifffile.imwrite(path, data)
    elif kind == "zstack":
        tifffile.imwrite(path, np.zeros((3, 2, 32, 32), np.uint8), metadata={"axes": "ZCYX"})
    elif kind == "empty":
        tifffile.imwrite(path, np.zeros((0, 32), np.uint8))
    elif kind == "unsupported":
        path = folder / "image.gif"
        path.write_bytes(b"GIF89a")
    elif kind == "no-images":
        path = folder / "empty_folder"
        path.mkdir()
        (path / "readme.txt").write_text("no images here")
    return path


@pytest.mark.filterwarnings("ignore:.*zero-size array")
@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        ("missing", "no such file"),
        ("corrupt", "not a readable TIFF"),
        ("nan", "image contains NaN values"),
        ("zstack", "expected a 2-D image (Y, X) or (Y, X, C); got axes ZCYX"),
        ("empty", "image is empty (shape (0, 32))"),
        ("unsupported", "unsupported file type '.gif'"),
        ("no-images", "directory contains no image files"),
    ],
)
def test_segment_bad_input(tmp_path, random_model, kind, problem):
    inputs = tmp_path / "in"
    inputs.mkdir()
    path = _write_bad(kind, inputs)
    before = _files(inputs)
    out = tmp_path / "out"
    result = run("segment", path, "--model", random_model, "--out", out, code=1)
    (line,) = errors(result)
    assert line.startswith(f"error: {path}: {problem}")
    assert result.stdout == ""
    assert _files(out) == [] and _files(inputs) == before  # no partial outputs, no temp files


@pytest.mark.parametrize("kind", ["unknown-name", "not-weights", "image", "missing-path"])
def test_segment_bad_model(tmp_path, data_dir, kind):
    image = tmp_path / "cells.tif"
    shutil.copy(data_dir / "dsb2018_fluo.tif", image)
    if kind == "unknown-name":
        ref, expected = "no-such-model", "error: unknown model 'no-such-model'; available: "
    elif kind == "not-weights":
        ref = tmp_path / "weights.pth"
        ref.write_text("these are not weights")
        expected = f"error: {ref}: not a model weights file"
    elif kind == "image":
        ref, expected = image, f"error: {image}: not a model weights file"
    else:
        ref = tmp_path / "nowhere" / "model.pth"
        expected = f"error: {ref}: model file not found"
    result = run("segment", image, "--model", ref, code=1)
    (line,) = errors(result)
    assert line.startswith(expected)
    assert _files(tmp_path) == sorted(["cells.tif", *(["weights.pth"] if kind == "not-weights"
                                                      else [])])


def test_segment_bad_options(tmp_path, random_model):
    result = run("segment", tmp_path, "--model", random_model, "--diameter", "-1", code=2)
    assert "--diameter" in result.stderr
    result = run("segment", tmp_path, "--save", "everything", code=2)
    assert "Invalid value for '--save'" in result.stderr
    assert run("segment", code=2).stderr.startswith("Usage:")


# -- train -----------------------------------------------------------------------------------
def test_train_without_annotations_is_a_clear_error(tmp_path):
    (tmp_path / "lonely.tif").write_bytes(b"")
    result = run("train", tmp_path, "--out", tmp_path / "model.pth", "-q", code=1)
    (line,) = errors(result)
    assert line.startswith(f"error: {tmp_path}: no annotation source can read this (sources: ")
    assert "mask-folder" in line
    assert _files(tmp_path) == ["lonely.tif"]


def test_a_plugin_adds_a_command():
    """register_commands: the example test plugin's command runs and is listed."""
    assert run("example-hello", "Ada").stdout == "hello Ada from cellplug-example-plugin\n"
    assert "example-hello" in run("--help").stdout
    rows = json.loads(run("plugins", "list", "--kind", "command", "--json").stdout)
    # (bridges installed beside it add theirs)
    assert ("command", "example-hello") in [(r["kind"], r["name"]) for r in rows]
    assert {r["kind"] for r in rows} <= {"command", "?"}  # --kind command lists commands only
