"""The user's model folder: models add / info / remove / export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cellplug.cli import main
from cellplug.io import file_sha256

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BUNDLED = Path(__file__).resolve().parents[2] / "plugins/cellplug_zoo/weights/generalist.pth"


@pytest.fixture(autouse=True)
def zoo(user_models) -> Path:
    """The empty user model folder of every test here (conftest's ``user_models``)."""
    return user_models


def run(*args, code=0):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    return r


def _cellpose_file(folder: Path) -> Path:
    """A bare Cellpose model (our weights without JSON) and its _size.npy, as Cellpose saves."""
    path = folder / "cellpose_cyto_like"
    shutil.copy(BUNDLED, path)
    size = json.loads(BUNDLED.with_suffix(".json").read_text())["size_model"]
    np.save(str(path) + "_size.npy", {k: np.asarray(v) for k, v in size.items()},
            allow_pickle=True)
    return path


def test_add_a_cellpose_file_lists_segments_and_records_its_origin(tmp_path, zoo):
    src = _cellpose_file(tmp_path)
    r = run("models", "add", src, "--name", "cp")
    assert f"added 'cp' -> {zoo / 'cp.pth'} (sha256 {file_sha256(src)[:12]})" in r.stdout
    assert file_sha256(zoo / "cp.pth") == file_sha256(src)  # weights copied unchanged
    meta = json.loads((zoo / "cp.json").read_text())
    assert meta["added_from"]["path"] == str(src.resolve())
    assert meta["added_from"]["format"] == "cellpose" and meta["format"] == "cellplug-model/1"
    assert meta["diam_mean"] == 17.0 and meta["size_model"]["A"][:2] == pytest.approx(
        json.loads(BUNDLED.with_suffix(".json").read_text())["size_model"]["A"][:2])
    listed = json.loads(run("models", "list", "--json").stdout)
    assert {m["name"]: m["origin"] for m in listed}["cp"] == "user"
    out = tmp_path / "o"
    run("segment", EXAMPLES / "nuclei.tif", "--model", "cp", "--out", out, "-q")
    run("segment", EXAMPLES / "nuclei.tif", "--out", tmp_path / "g", "-q")
    assert (out / "nuclei_masks.tif").read_bytes() == (tmp_path / "g/nuclei_masks.tif").read_bytes()


def test_info_shows_the_metadata(zoo):
    doc = json.loads(run("models", "info", "generalist", "--json").stdout)
    assert doc["architecture"]["backbone"] == "cellpose-unet" and doc["diam_mean"] == 17.0
    assert doc["sha256"] == file_sha256(BUNDLED) and doc["origin"] == "plugin:zoo"
    assert doc["style_centroid"]["length"] == 256 and doc["size_model"] is True
    text = run("models", "info", "generalist").stdout
    assert text.splitlines()[0].split() == ["name", "generalist"]


def test_remove_and_export(tmp_path, zoo):
    run("models", "add", BUNDLED, "--name", "mine")
    assert (zoo / "mine.json").is_file()
    r = run("models", "export", "mine", tmp_path / "shared")
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == ["mine.json", "mine.pth"]
    assert "wrote" in r.stdout
    again = run("models", "export", "mine", tmp_path / "shared", code=1)
    assert "exists; export into another folder (nothing was written)" in again.stderr
    run("models", "remove", "mine")
    assert not list(zoo.iterdir())
    r = run("models", "remove", "generalist", code=1)
    assert "comes with plugin:zoo; only models in" in r.stderr


@pytest.mark.parametrize("case", ["pickled", "wrong_layout", "bad_json", "taken_name"])
def test_a_model_that_fails_validation_is_refused_and_nothing_is_copied(case, tmp_path, zoo):
    import os

    import torch

    sentinel = tmp_path / "PAYLOAD_RAN"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    path = tmp_path / "m.pth"
    if case == "pickled":
        torch.save({"w": torch.zeros(1), "x": Payload()}, path)
        want = "refused to load: the file contains pickled objects other than tensors"
    elif case == "wrong_layout":
        torch.save({"conv.weight": torch.zeros(3, 3)}, path)
        want = "weights do not match backbone 'cellpose-unet'"
    elif case == "bad_json":
        shutil.copy(BUNDLED, path)
        path.with_suffix(".json").write_text('{"diam_mean": "thirty"}')
        want = "field 'diam_mean' must be a positive number, got 'thirty'"
    else:
        shutil.copy(BUNDLED, path)
        run("models", "add", path, "--name", "dup")
        want = "a model named 'dup' exists already"
    before = sorted(zoo.iterdir()) if zoo.exists() else []
    r = run("models", "add", path, "--name", "dup" if case == "taken_name" else "new", code=1)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and want in errors[0], r.stderr
    assert (sorted(zoo.iterdir()) if zoo.exists() else []) == before
    assert not sentinel.exists()
