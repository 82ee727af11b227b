"""`cellplug eval`: scoring predictions or a model against ground truth."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from cellplug.cli import main


def _predictions(tmp_path, data_dir, drop_one: bool = False):
    pred = tmp_path / "pred"
    pred.mkdir()
    for stem in ("dsb2018_fluo", "dsb2018_he"):
        m = tifffile.imread(data_dir / f"{stem}_masks.tif")
        if drop_one and stem == "dsb2018_fluo":
            m = np.where(m == 1, 0, m).astype(m.dtype)  # one object missed
        tifffile.imwrite(pred / f"{stem}_masks.tif", m)
    return pred


def test_eval_predictions_perfect_and_with_a_missed_object(tmp_path, data_dir):
    runner = CliRunner()
    perfect = runner.invoke(
        main,
        [
            "eval",
            str(_predictions(tmp_path, data_dir)),
            "--masks",
            str(data_dir),
            "--out",
            str(tmp_path / "r.json"),
            "-q",
        ],
    )
    assert perfect.exit_code == 0, perfect.output
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["overall"]["mean_ap"]["0.50"] == 1.0 and doc["overall"]["n_images"] == 2

    other = tmp_path / "b"
    other.mkdir()
    r = runner.invoke(
        main,
        [
            "eval",
            str(_predictions(other, data_dir, drop_one=True)),
            "--masks",
            str(data_dir),
            "--out",
            str(tmp_path / "r.csv"),
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    rows = {row["image"]: row for row in csv.DictReader(open(tmp_path / "r.csv"))}
    n = int(rows["dsb2018_fluo"]["n_true"])
    assert float(rows["dsb2018_fluo"]["ap@0.50"]) == round((n - 1) / n, 4)  # TP/(TP+FN)
    assert float(rows["dsb2018_he"]["ap@0.50"]) == 1.0
    assert float(rows["dsb2018_fluo"]["recall@0.50"]) < 1.0
    assert float(rows["dsb2018_fluo"]["precision@0.50"]) == 1.0
    assert "overall" in rows


def test_eval_groups_and_stems(tmp_path, data_dir):
    meta = tmp_path / "meta.csv"
    meta.write_text("stem,kind\ndsb2018_fluo,fluo\ndsb2018_he,he\n")
    stems = tmp_path / "stems.txt"
    stems.write_text("dsb2018_he\n")
    pred = _predictions(tmp_path, data_dir)
    r = CliRunner().invoke(
        main,
        [
            "eval",
            str(pred),
            "--masks",
            str(data_dir),
            "--group-by",
            f"{meta}:kind",
            "--out",
            str(tmp_path / "g.json"),
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "g.json").read_text())
    assert set(doc["groups"]) == {"fluo", "he"}
    r = CliRunner().invoke(
        main,
        [
            "eval",
            str(pred),
            "--masks",
            str(data_dir),
            "--stems",
            str(stems),
            "--out",
            str(tmp_path / "s.json"),
            "-q",
        ],
    )
    assert json.loads((tmp_path / "s.json").read_text())["overall"]["n_images"] == 1


def test_eval_segments_images_with_a_model(tmp_path, data_dir, random_model):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    (img_dir / "dsb2018_fluo.tif").write_bytes((data_dir / "dsb2018_fluo.tif").read_bytes())
    r = CliRunner().invoke(
        main,
        [
            "eval",
            str(img_dir),
            "--masks",
            str(data_dir),
            "--model",
            str(random_model),
            "--diameter",
            "17",
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    # the printed scores are those of the model's own masks (same options) against the truth
    from cellplug.metrics import match_counts
    from cellplug.segmenter import Segmenter

    image = tifffile.imread(data_dir / "dsb2018_fluo.tif")
    labels = Segmenter.from_model(str(random_model)).segment(image, diameter=17.0).labels
    truth = tifffile.imread(data_dir / "dsb2018_fluo_masks.tif").astype(np.int64)
    mc = match_counts(truth, labels.astype(np.int64))
    expected = [mc.ap[0], mc.ap[5], mc.ap[8], mc.precision[0], mc.recall[0], mc.f1[0]]
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("overall")]
    assert line.split()[1:] == ["1"] + [f"{v:.3f}" for v in expected]


def test_eval_true_diameter_segments_at_the_ground_truth_diameter(
    tmp_path, data_dir, random_model, monkeypatch
):
    from cellplug.segmenter import Segmenter, median_diameter

    used = []
    real = Segmenter.segment

    def spy(self, image, options=None, **overrides):
        used.append(overrides.get("diameter"))
        return real(self, image, options, **overrides)

    monkeypatch.setattr(Segmenter, "segment", spy)
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for stem in ("dsb2018_fluo", "dsb2018_he"):
        (img_dir / f"{stem}.tif").write_bytes((data_dir / f"{stem}.tif").read_bytes())
    r = CliRunner().invoke(
        main,
        ["eval", str(img_dir), "--masks", str(data_dir), "--model", str(random_model),
         "--true-diameter", "-q"],
    )
    assert r.exit_code == 0, r.output
    expected = [
        median_diameter(tifffile.imread(data_dir / f"{s}_masks.tif"))
        for s in ("dsb2018_fluo", "dsb2018_he")
    ]
    assert used == expected
    assert expected[0] != expected[1]


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_eval_precision_reaches_the_segmenter(tmp_path, data_dir, random_model, monkeypatch,
                                              precision):
    from cellplug.segmenter import Segmenter

    used = []
    real = Segmenter.segment

    def spy(self, image, options=None, **overrides):
        used.append(options.precision)
        return real(self, image, options, **overrides)

    monkeypatch.setattr(Segmenter, "segment", spy)
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    (img_dir / "dsb2018_fluo.tif").write_bytes((data_dir / "dsb2018_fluo.tif").read_bytes())
    r = CliRunner().invoke(
        main,
        ["eval", str(img_dir), "--masks", str(data_dir), "--model", str(random_model),
         "--diameter", "17", "--precision", precision, "-q"],
    )
    assert r.exit_code == 0, r.output
    assert used == [precision]


def test_eval_missing_ground_truth_is_an_error(tmp_path, data_dir):
    pred = tmp_path / "p"
    pred.mkdir()
    tifffile.imwrite(pred / "nothere_masks.tif", np.ones((8, 8), np.uint16))
    r = CliRunner().invoke(main, ["eval", str(pred), "--masks", str(data_dir), "-q"])
    assert r.exit_code == 1
    assert "nothere" in r.output and "ground truth" in r.output


def test_eval_a_segment_output_folder(tmp_path, data_dir):
    """The folder `segment --save overlay flows` wrote is read as predictions (extras ignored)."""
    out = _predictions(tmp_path, data_dir)
    tifffile.imwrite(out / "dsb2018_fluo_flows.tif", np.zeros((2, 160, 160), np.float32))
    (out / "dsb2018_fluo_overlay.png").write_bytes(b"\x89PNG not really")
    r = CliRunner().invoke(main, ["eval", str(out), "--masks", str(data_dir), "-q"])
    assert r.exit_code == 0, r.output
    # both images scored, perfectly (the predictions are the truth): AP, precision, recall, F1
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("overall")]
    assert line.split()[1:] == ["2"] + ["1.000"] * 6
