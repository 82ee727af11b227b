"""`cellplug train` from the command line: a folder source, validation split, sampling groups."""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner

from cellplug.cli import main
from cellplug.inference import bf16_supported


def _folder(tmp_path, data_dir, with_metadata=True):
    src = tmp_path / "src"
    src.mkdir()
    for stem in ("dsb2018_fluo", "dsb2018_he", "usiigaci_phc"):
        for suffix in ("", "_masks"):
            shutil.copy(data_dir / f"{stem}{suffix}.tif", src / f"{stem}{suffix}.tif")
    if with_metadata:
        (src / "metadata.csv").write_text(
            "stem,modality\ndsb2018_fluo,fluorescence\ndsb2018_he,histology\n"
            "usiigaci_phc,phase\n"
        )
    return src


def test_train_cli_with_groups_and_validation_list(tmp_path, data_dir, monkeypatch):
    import dataclasses

    import numpy as np
    import tifffile

    from cellplug.segmenter import Segmenter, median_diameter

    # the validation segmentation is replaced by a known answer: the truth minus one object,
    # so the stored metrics must be 12/13 at every IoU threshold
    truth = tifffile.imread(data_dir / "usiigaci_phc_masks.tif").astype(np.int64)
    n = len(np.unique(truth)) - 1
    known = np.where(truth == 1, 0, truth)
    diameters = []
    real = Segmenter.segment

    def known_answer(self, image, options=None, **overrides):
        result = real(self, image, options, **overrides)  # the real pipeline still runs
        diameters.append(overrides.get("diameter"))
        assert result.labels.shape == known.shape
        return dataclasses.replace(result, labels=known.astype(np.uint32))

    monkeypatch.setattr(Segmenter, "segment", known_answer)
    src = _folder(tmp_path, data_dir)
    val = tmp_path / "val.txt"
    val.write_text("usiigaci_phc\n")
    out = tmp_path / "m.pth"
    args = ["train", str(src), "--out", str(out), "--val-list", str(val), "--epochs", "2",
            "--patch", "48", "--diam-mean", "17", "--sampling", "sqrt", "--group-by", "modality",
            "--eval-every", "1", "--size-epochs", "1", "--threads", "1", "--precision", "auto",
            "-q"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    meta = json.loads(out.with_suffix(".json").read_text())
    training = meta["training"]
    assert training["n_train"] == 2 and training["n_val"] == 1
    assert training["data"]["groups"] == ["src/fluorescence", "src/histology"]
    assert "val" in training["history"][-1]  # AP on the held-out image was computed
    assert n == 13 and diameters == [max(5.0, median_diameter(truth))] * 2  # once per epoch
    assert meta["metrics"]["ap"] == [round((n - 1) / n, 4)] * 10
    assert meta["metrics"]["ap50_pooled"] == meta["metrics"]["ap50_mean"] == (n - 1) / n
    assert meta["metrics"] == training["history"][-1]["val"]
    # auto: bfloat16 only where the CPU has it natively (emulated it is many times slower)
    assert training["config"]["bf16"] is bf16_supported()


def test_train_cli_group_by_needs_metadata(tmp_path, data_dir):
    src = _folder(tmp_path, data_dir, with_metadata=False)
    r = CliRunner().invoke(main, ["train", str(src), "--out", str(tmp_path / "m.pth"),
                                  "--group-by", "modality", "--epochs", "1"])
    assert r.exit_code == 1
    assert "metadata.csv" in r.output
