"""Human-in-the-loop fine-tuning: recipe, lineage, saving into the user's zoo, cancelling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from cellplug.annotations import Annotation
from cellplug.cli import main
from cellplug.errors import CellplugError
from cellplug.hitl import fine_tune, recipe_config
from cellplug.io import file_sha256
from cellplug.train import TrainingCancelled
from cellplug.zoo import new_model_path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BUNDLED = Path(__file__).resolve().parents[2] / "plugins/cellplug_zoo/weights/generalist.pth"
FAST = ["--epochs", "2", "--patch", "64", "--size-epochs", "1", "-q"]


@pytest.fixture(autouse=True)
def zoo(user_models) -> Path:
    """An empty user model folder, and a fresh plugin registry per test."""
    return user_models


def _crops() -> list[tuple[np.ndarray, np.ndarray, str]]:
    image = tifffile.imread(EXAMPLES / "nuclei.tif")
    labels = tifffile.imread(EXAMPLES / "nuclei_masks.tif")
    out = []
    for i, (y, x) in enumerate([(0, 0), (200, 160)]):
        crop = labels[y:y + 160, x:x + 200]
        out.append((image[y:y + 160, x:x + 200], crop, f"crop{i}"))
    return out


def test_recipes_and_overrides():
    hitl = recipe_config("hitl")
    assert (hitl.optimizer, hitl.learning_rate, hitl.weight_decay, hitl.warmup_epochs,
            hitl.epochs, hitl.batch_size) == ("sgd", 0.1, 1e-4, 0, 100, 8)
    replay = recipe_config("hitl-replay")  # half the batch rehearses: more epochs
    assert replay.epochs == 150 and {**replay.__dict__, "epochs": 100} == hitl.__dict__
    assert recipe_config("scratch").optimizer == "adamw"
    assert recipe_config("hitl", epochs=7, learning_rate=None).epochs == 7
    with pytest.raises(CellplugError, match="unknown recipe 'fast'"):
        recipe_config("fast")


def test_train_name_fine_tunes_two_roi_annotated_images_into_the_zoo(tmp_path, zoo):
    from cellplug_sources.imagej_roi import write_roi_zip

    folder = tmp_path / "corrected"
    folder.mkdir()
    objects = {}
    for image, labels, stem in _crops():
        tifffile.imwrite(folder / f"{stem}.tif", image)
        write_roi_zip(folder / f"{stem}_RoiSet.zip", labels)
        objects[stem] = len(np.unique(labels[labels > 0]))
    runner = CliRunner()
    r = runner.invoke(main, ["train", str(folder), "--base", "generalist", "--name", "lab-r1",
                             *FAST])
    assert r.exit_code == 0, r.output
    assert "saved" in r.stdout and "as model 'lab-r1'" in r.stdout
    assert "training: 2 epochs x 1 steps of 8 patches, about" in r.stderr  # the estimate
    meta = json.loads((zoo / "lab-r1.json").read_text())
    assert meta["name"] == "lab-r1" and meta["base_model"] == "generalist"
    assert meta["base_sha256"] == file_sha256(BUNDLED)
    config = meta["training"]["config"]
    assert (config["optimizer"], config["learning_rate"], config["weight_decay"],
            config["warmup_epochs"]) == ("sgd", 0.1, 1e-4, 0)
    data = meta["training"]["data"]
    assert data["source_format"] == "imagej-roi"
    assert [(i["stem"], i["objects"]) for i in data["images"]] == sorted(objects.items())
    assert data["n_objects"] == sum(objects.values()) and data["n_images"] == 2
    assert data["date"].endswith("+00:00") and "--name lab-r1" in data["command"]
    # two images cannot fit a 256-dimensional size model: the base's is kept, with the
    # diam_labels its first pass runs at (a fitted one sized phase-contrast cells at a third)
    base = json.loads(BUNDLED.with_suffix(".json").read_text())
    assert meta["size_model"] == base["size_model"]
    assert meta["diam_labels"] == base["diam_labels"] and meta["diam_mean"] == 17.0
    assert meta["training"]["size_model"] == "kept from the base model (2 training images)"
    # listed, and it segments
    listed = runner.invoke(main, ["models", "list", "--json"])
    assert any(m["name"] == "lab-r1" and m["origin"] == "user" for m in json.loads(listed.stdout))
    seg = runner.invoke(main, ["segment", str(EXAMPLES / "nuclei.tif"), "--model", "lab-r1",
                               "--out", str(tmp_path / "o"), "-q", "--json"])
    assert seg.exit_code == 0, seg.output
    assert json.loads((tmp_path / "o/summary.json").read_text())["images"][0]["objects"] > 5
    # a second round with the same name is refused, and the first is untouched
    before = (zoo / "lab-r1.pth").read_bytes()
    again = runner.invoke(main, ["train", str(folder), "--base", "generalist", "--name",
                                 "lab-r1", *FAST])
    assert again.exit_code == 1 and "a model named 'lab-r1' exists already" in again.stderr
    assert (zoo / "lab-r1.pth").read_bytes() == before


def test_fine_tune_api_can_be_cancelled_and_saves_nothing(zoo):
    anns = [Annotation(im, lab, stem) for im, lab, stem in _crops()]
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 1  # let one batch run, then cancel

    with pytest.raises(TrainingCancelled, match="training cancelled; no model was saved"):
        fine_tune(anns, "generalist", name="cancelled",
                  config=recipe_config("hitl", epochs=3, patch=64, size_epochs=1),
                  progress=False, should_stop=stop)
    assert not zoo.exists() or not list(zoo.iterdir())


def test_model_names_are_checked(zoo):
    with pytest.raises(CellplugError, match="model name '../x': use letters"):
        new_model_path("../x")
    with pytest.raises(CellplugError, match="a model named 'generalist' exists already"):
        new_model_path("generalist")
    assert new_model_path("ok-1.b") == zoo / "ok-1.b.pth"


def test_epoch_order_gives_replay_its_exact_share():
    from cellplug.train import Sample, epoch_order

    def sample(replay: bool) -> Sample:
        return Sample(np.zeros((2, 4, 4), np.float32), np.zeros((3, 4, 4), np.float32),
                      np.zeros((4, 4), np.int32), 10.0, "s", "", "", replay)

    samples = [sample(False), sample(False), sample(True), sample(True), sample(True)]
    for epoch in range(20):
        order = epoch_order(np.random.default_rng([0, epoch]), samples, 8, None, 0.25)
        assert len(order) == 8 and sum(samples[i].replay for i in order) == 2
    # without a fraction the replay flag changes nothing: the plain draw, same as before
    plain = [sample(False) for _ in samples]
    for flagged, fraction in ((samples, 0.0), (plain, 0.5)):
        assert np.array_equal(epoch_order(np.random.default_rng(3), flagged, 8, None, fraction),
                              np.random.default_rng(3).choice(5, size=8, replace=True))


def test_train_with_replay_records_it_and_keeps_the_new_data_apart(tmp_path, zoo):
    crops = _crops()
    new, old = tmp_path / "new", tmp_path / "old"
    for folder, (image, labels, stem) in zip((new, old), crops, strict=True):
        folder.mkdir()
        tifffile.imwrite(folder / f"{stem}.tif", image)
        tifffile.imwrite(folder / f"{stem}_masks.tif", labels)
    runner = CliRunner()
    r = runner.invoke(main, ["train", str(new), "--base", "generalist", "--name", "lab-replay",
                             "--replay", str(old), "--replay-fraction", "0.25", *FAST])
    assert r.exit_code == 0, r.output
    assert "1 images to rehearse" in r.stderr
    meta = json.loads((zoo / "lab-replay.json").read_text())
    training = meta["training"]
    assert training["config"]["replay_fraction"] == 0.25
    assert training["n_train"] == 2 and training["n_replay"] == 1
    assert training["data"]["replay"] == {"n_images": 1, "stems": ["crop1"]}
    # the lineage's images are the corrections only; the rehearsed image is not one of them
    assert [i["stem"] for i in training["data"]["images"]] == ["crop0"]
    assert training["size_model"] == "kept from the base model (1 training images)"
    bad = runner.invoke(main, ["train", str(new), "--base", "generalist", "--name", "x",
                               "--replay-fraction", "0.5", *FAST])
    assert bad.exit_code == 2 and "--replay-fraction needs --replay" in bad.output
