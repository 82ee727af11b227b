"""--model auto: choosing a zoo model per image from its style, and the fallback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from cellplug.cli import main
from cellplug.errors import CellplugError
from cellplug.segmenter import Segmenter, SegmentOptions
from cellplug.selection import AutoSegmenter, Choice, cosine

REPO = Path(__file__).resolve().parents[2]
BUNDLED = REPO / "plugins/cellplug_zoo/weights/generalist.pth"
DATA = REPO / "tests/data"
FLUO, PHC = DATA / "dsb2018_fluo.tif", DATA / "usiigaci_phc.tif"


@pytest.fixture(autouse=True)
def user_zoo(user_models) -> Path:
    """The empty user model folder of every test here (conftest's ``user_models``)."""
    user_models.mkdir()
    return user_models


@pytest.fixture(scope="module")
def styles() -> dict[str, np.ndarray]:
    """The generalist's default-scale style of the fluorescence and phase-contrast crops."""
    ref = Segmenter.from_model("generalist")
    opts = SegmentOptions()
    return {p.stem: ref.default_scale_style(ref.prepare(tifffile.imread(p), opts), opts)
            for p in (FLUO, PHC)}


def zoo_model(folder: Path, name: str, centroid: np.ndarray, min_similarity: float = 0.5,
              reference: str = "generalist", **zoo: object) -> Path:
    """A zoo member: the generalist's weights with a zoo block (plus ``zoo``) and a centroid."""
    shutil.copy(BUNDLED, folder / f"{name}.pth")
    meta = json.loads(BUNDLED.with_suffix(".json").read_text())
    meta.update(name=name, style_centroid=[float(v) for v in centroid],
                zoo={"reference": reference, "cluster": 1, "min_similarity": min_similarity,
                     **zoo})
    (folder / f"{name}.json").write_text(json.dumps(meta))
    return folder / f"{name}.pth"


def test_an_image_whose_style_matches_a_cluster_selects_that_clusters_model(user_zoo, styles):
    zoo_model(user_zoo, "fluo-like", styles["dsb2018_fluo"])
    zoo_model(user_zoo, "phase-like", styles["usiigaci_phc"])
    zoo_model(user_zoo, "other-zoo", styles["usiigaci_phc"], reference="another-model")
    auto = AutoSegmenter.from_zoo()
    assert sorted(auto.candidates) == ["fluo-like", "phase-like"]  # only generalist's zoo
    for path, expected in ((FLUO, "fluo-like"), (PHC, "phase-like")):
        seg, choice = auto.segment(tifffile.imread(path))
        assert choice.model == expected and not choice.fallback
        assert choice.similarity == pytest.approx(1.0, abs=1e-4)
        assert seg.n_objects > 0
    # the two crops' styles differ enough that the test means something
    assert cosine(styles["dsb2018_fluo"], styles["usiigaci_phc"]) < 0.95


def test_fallback_to_the_reference_when_no_centroid_is_close(user_zoo, styles):
    far = -styles["dsb2018_fluo"]  # the opposite direction: similarity -1
    zoo_model(user_zoo, "far", far, min_similarity=0.9)
    auto = AutoSegmenter.from_zoo()
    image = tifffile.imread(FLUO)
    seg, choice = auto.segment(image)
    assert choice.model == "generalist" and choice.fallback and choice.nearest == "far"
    assert choice.similarity == pytest.approx(-1.0, abs=1e-4)
    assert "below its threshold 0.900" in choice.reason
    # the reference model, chosen, gives exactly what it gives alone
    plain = Segmenter.from_model("generalist").segment(image)
    np.testing.assert_array_equal(seg.labels, plain.labels)
    assert seg.diameter == plain.diameter


@pytest.fixture
def network_calls(monkeypatch) -> list[str]:
    """The model name of every network pass run from here on (Segmenter.network counted)."""
    calls: list[str] = []
    original = Segmenter.network

    def counting(self, *args, **kwargs):
        calls.append(self.model.name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Segmenter, "network", counting)
    return calls


def test_a_gated_out_cluster_routes_its_images_to_the_reference(user_zoo, styles,
                                                                network_calls):
    """A cluster whose model lost its gate keeps its centroid: its images go to the
    reference, not to the next-nearest model, and that model's network never runs."""
    gate = {"images": ["a", "b", "c"], "ap50": {"reference": 0.8, "0.50": 0.78, "1.00": 0.75},
            "mix": 0.5, "margin": 0.0, "passed": False}
    zoo_model(user_zoo, "fluo-like", styles["dsb2018_fluo"], gate=gate,
              route_to_reference=True)
    zoo_model(user_zoo, "phase-like", styles["usiigaci_phc"], min_similarity=-1.0)
    image = tifffile.imread(FLUO)
    seg, choice = AutoSegmenter.from_zoo().segment(image)
    assert choice.model == "generalist" and choice.nearest == "fluo-like"
    assert choice.routed and not choice.fallback
    assert choice.to_dict()["routed"] is True
    assert "3 held-out images (AP@0.5 0.780 vs 0.800)" in choice.reason
    assert set(network_calls) == {"generalist"}
    plain = Segmenter.from_model("generalist").segment(image)
    np.testing.assert_array_equal(seg.labels, plain.labels)
    # the other cluster's model, which passed (no gate), still segments its own images
    _, choice = AutoSegmenter.from_zoo().segment(tifffile.imread(PHC))
    assert choice.model == "phase-like" and not choice.routed


def test_the_reference_pass_is_done_once(user_zoo, styles, network_calls):
    """auto runs exactly the network passes of one plain segmentation: the reference's style
    and size passes are reused by the chosen model (and by the reference itself)."""
    zoo_model(user_zoo, "fluo-like", styles["dsb2018_fluo"])
    image = tifffile.imread(FLUO)
    calls = network_calls
    Segmenter.from_model("generalist").segment(image)
    plain = list(calls)
    calls.clear()
    seg, choice = AutoSegmenter.from_zoo().segment(image)
    assert choice.model == "fluo-like"
    assert len(calls) == len(plain) == 3  # style, size, main pass
    assert calls == ["generalist", "generalist", "fluo-like"]
    # a given diameter: one style pass by the reference, one main pass by the chosen model
    calls.clear()
    AutoSegmenter.from_zoo().segment(image, diameter=17.0)
    assert calls == ["generalist", "fluo-like"]


def test_no_zoo_is_a_one_line_error(tmp_path):
    r = CliRunner().invoke(main, ["segment", str(FLUO), "--model", "auto", "--out",
                                  str(tmp_path / "o")])
    assert r.exit_code == 1
    assert "no zoo models for reference model 'generalist'" in r.output
    assert not (tmp_path / "o").exists()


def test_a_selector_that_chooses_a_stranger_is_refused(user_zoo, styles):
    zoo_model(user_zoo, "fluo-like", styles["dsb2018_fluo"])
    auto = AutoSegmenter.from_zoo()
    auto.select = lambda s, models: ["nobody"] * len(s)
    with pytest.raises(CellplugError, match="chose 'nobody', which is not a candidate"):
        auto.choose(styles["dsb2018_fluo"][None])


def test_cli_reports_the_choice_per_image(user_zoo, styles, tmp_path):
    zoo_model(user_zoo, "fluo-like", styles["dsb2018_fluo"])
    zoo_model(user_zoo, "phase-like", styles["usiigaci_phc"])
    out = tmp_path / "o"
    r = CliRunner().invoke(main, ["segment", str(FLUO), str(PHC), "--model", "auto",
                                  "--out", str(out), "--json", "-q"])
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "summary.json").read_text())
    assert doc["model"] == "auto (zoo of generalist)"
    chosen = {Path(e["image"]).stem: e["choice"] for e in doc["images"]}
    assert chosen["dsb2018_fluo"]["model"] == "fluo-like"
    assert chosen["usiigaci_phc"]["model"] == "phase-like"
    assert chosen["usiigaci_phc"]["similarity"] == pytest.approx(1.0, abs=1e-3)
    assert "nearest-centroid" in chosen["usiigaci_phc"]["reason"]


def test_a_toy_selector_plugin_is_used_with_selector(user_zoo, styles, tmp_path):
    pytest.importorskip("cellplug_example", reason="the example test plugin is not installed")
    # first by name; far from fluo, but with no threshold to fall back at
    zoo_model(user_zoo, "a-first", styles["usiigaci_phc"], min_similarity=-1.0)
    zoo_model(user_zoo, "b-fluo", styles["dsb2018_fluo"])
    out = tmp_path / "o"
    base = ["segment", str(FLUO), "--model", "auto", "--out", str(out), "--json", "-q"]
    r = CliRunner().invoke(main, base)
    assert json.loads(r.stdout)["images"][0]["choice"]["model"] == "b-fluo"
    r = CliRunner().invoke(main, [*base, "--selector", "first-model"])
    assert r.exit_code == 0, r.output
    choice = json.loads(r.stdout)["images"][0]["choice"]
    assert choice["model"] == "a-first" and "first-model" in choice["reason"]


def test_selector_without_auto_is_a_usage_error(tmp_path):
    r = CliRunner().invoke(main, ["segment", str(FLUO), "--selector", "nearest-centroid",
                                  "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--model auto" in r.output


def test_eval_reports_the_chosen_model_per_group(user_zoo, styles, tmp_path):
    zoo_model(user_zoo, "fluo-like", styles["dsb2018_fluo"])
    zoo_model(user_zoo, "phase-like", styles["usiigaci_phc"])
    images = tmp_path / "images"
    images.mkdir()
    for p in (FLUO, PHC):
        shutil.copy(p, images / p.name)
    groups = tmp_path / "meta.csv"
    groups.write_text("stem,modality\ndsb2018_fluo,fluorescence\nusiigaci_phc,phase\n")
    report = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["eval", str(images), "--masks", str(DATA), "--model", "auto",
                                  "--group-by", f"{groups}:modality", "--out", str(report),
                                  "-q"])
    assert r.exit_code == 0, r.output
    assert "chosen model x group" in r.stdout
    doc = json.loads(report.read_text())
    assert doc["by_model"]["fluo-like"]["fluorescence"]["n_images"] == 1
    assert doc["by_model"]["phase-like"]["phase"]["n_images"] == 1
    assert "fluorescence" not in doc["by_model"]["phase-like"]
    rows = {r["image"]: r for r in doc["images"]}
    assert rows["usiigaci_phc"]["model"] == "phase-like"


def test_choice_reason_texts():
    c = Choice("m", "m", 0.95, 0.9, False, "nearest-centroid")
    assert c.reason == "nearest-centroid: similarity 0.950 (threshold 0.900)"
    assert c.to_dict() == {"model": "m", "similarity": 0.95, "fallback": False,
                           "routed": False, "reason": c.reason}
    assert Choice("m", "m", None, None, False, "toy").reason == "chosen by selector 'toy'"

