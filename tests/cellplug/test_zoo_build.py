"""Building a style zoo: clustering, thresholds, and `cellplug zoo build` end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cellplug.cli import main
from cellplug.plugins import set_registry
from cellplug.zoo_build import (
    cluster_styles,
    silhouette,
    spherical_kmeans,
    split_holdout,
    spread,
)

DATA = Path(__file__).resolve().parents[2] / "tests/data"


def planted(seed: int = 0, n: tuple[int, ...] = (40, 25, 15), dim: int = 32, noise: float = 0.15):
    """Styles around three random unit directions, and which direction each came from."""
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(len(n), dim))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    x = np.concatenate([d + noise * rng.normal(size=(m, dim))
                        for d, m in zip(dirs, n, strict=True)])
    truth = np.repeat(np.arange(len(n)), n)
    perm = rng.permutation(len(x))
    return x[perm].astype(np.float32), truth[perm]


def test_kmeans_recovers_planted_clusters_and_numbers_them_by_size():
    x, truth = planted()
    labels, cents = spherical_kmeans(x, 3, seed=0)
    # the same partition, clusters numbered largest first (40, 25, 15)
    assert np.bincount(labels).tolist() == [40, 25, 15]
    for j in range(3):
        assert len(np.unique(truth[labels == j])) == 1
    assert np.allclose(np.linalg.norm(cents, axis=1), 1.0, atol=1e-5)


def test_clustering_is_deterministic_with_a_seed_and_picks_k_by_silhouette():
    x, _ = planted(noise=0.1)
    a, b = cluster_styles(x, seed=7), cluster_styles(x, seed=7)
    assert a.k == b.k == 3
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert max(a.silhouettes, key=lambda k: a.silhouettes[k] or -1) == 3


def test_k_whose_cluster_is_too_small_is_not_chosen():
    x, _ = planted(n=(40, 30, 4))
    c = cluster_styles(x, min_cluster=10, seed=0)
    assert c.silhouettes[3] is None and c.k == 2


def test_silhouette_matches_the_definition():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(12, 5))
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2])
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = 1 - u @ u.T
    s = []
    for i in range(len(x)):
        own = [j for j in range(len(x)) if labels[j] == labels[i] and j != i]
        a = d[i, own].mean()
        b = min(d[i, labels == k].mean() for k in set(labels) if k != labels[i])
        s.append((b - a) / max(a, b))
    assert silhouette(x, labels) == pytest.approx(np.mean(s))


def test_threshold_is_a_low_percentile_of_the_clusters_own_similarities():
    x, _ = planted()
    labels, cents = spherical_kmeans(x, 3, seed=0)
    sp = spread(x, labels, cents)
    for j, s in enumerate(sp):
        u = x[labels == j] / np.linalg.norm(x[labels == j], axis=1, keepdims=True)
        sims = u @ cents[j]
        assert s["min"] <= s["min_similarity"] <= s["p05"] <= s["mean"]
        assert s["min"] == pytest.approx(sims.min(), abs=1e-4)
        # at most the percentile (2 %) of its own images fall below, one image for rounding
        assert np.sum(sims < s["min_similarity"]) <= 0.02 * len(sims) + 1


@pytest.fixture
def source(tmp_path) -> Path:
    """Six small annotated images of two kinds (fluorescence crops, phase-contrast crops)."""
    import tifffile

    src = tmp_path / "src"
    src.mkdir()
    rows = ["stem,modality"]
    # crops with 5 or more objects each (training's minimum)
    for name, kind, side in (("dsb2018_fluo", "fluorescence", 128), ("usiigaci_phc", "phase", 192)):
        img = tifffile.imread(DATA / f"{name}.tif")
        lab = tifffile.imread(DATA / f"{name}_masks.tif")
        for i, (y, x) in enumerate(((0, 0), (16, 16), (32, 32))):
            stem = f"{name}_{i}"
            tifffile.imwrite(src / f"{stem}.tif", img[y : y + side, x : x + side])
            tifffile.imwrite(src / f"{stem}_masks.tif", lab[y : y + side, x : x + side])
            rows.append(f"{stem},{kind}")
    (src / "metadata.csv").write_text("\n".join(rows) + "\n")
    return src


def test_zoo_build_end_to_end_resumes_and_feeds_auto(source, tmp_path, monkeypatch):
    zoo_dir = tmp_path / "zoo"
    monkeypatch.setenv("CELLPLUG_MODELS", str(tmp_path / "models"))
    set_registry(None)
    args = ["zoo", "build", str(source), "--out", str(zoo_dir), "--k", "2", "--min-cluster", "1",
            "--epochs", "1", "--images-per-epoch", "8", "--patch", "64", "--group-by",
            "modality", "--precision", "fp32", "--seed", "3", "-q"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    clusters = json.loads((zoo_dir / "clusters.json").read_text())
    # the two image types fall into the two clusters
    kinds = [{s.rsplit("_", 1)[0] for s in c["images"]} for c in clusters["clusters"]]
    assert sorted(len(k) for k in kinds) == [1, 1] and kinds[0] != kinds[1]
    meta = json.loads((zoo_dir / "style-1.json").read_text())
    assert meta["zoo"]["reference"] == "generalist" and meta["zoo"]["n_images"] == 3
    assert meta["base_model"] == "generalist" and len(meta["style_centroid"]) == 256
    assert (zoo_dir / "clusters.png").stat().st_size > 0
    assert "| style-1 | 3 |" in (zoo_dir / "report.md").read_text()
    assert not list(zoo_dir.glob(".*partial*"))
    assert meta["zoo"]["mix"] == 1.0
    # rerun: styles and both models are reused, nothing retrained
    before = {p.name: p.stat().st_mtime_ns for p in zoo_dir.glob("style-*.pth")}
    r = CliRunner().invoke(main, [*args, "--add"])
    assert r.exit_code == 0, r.output
    assert "styles: reused" in r.output and r.output.count("fine-tune already done") == 2
    assert {p.name: p.stat().st_mtime_ns for p in zoo_dir.glob("style-*.pth")} == before
    assert json.loads((zoo_dir / "clusters.json").read_text()) == clusters  # deterministic
    # --add put them in the user's folder, and auto uses them
    out = tmp_path / "seg"
    img = next(iter(sorted(source.glob("usiigaci_phc_0.tif"))))
    r = CliRunner().invoke(main, ["segment", str(img), "--model", "auto", "--out", str(out),
                                  "--json", "-q"])
    assert r.exit_code == 0, r.output
    choice = json.loads(r.stdout)["images"][0]["choice"]
    phase_model = next(c["model"] for c in clusters["clusters"]
                       if any(s.startswith("usiigaci") for s in c["images"]))
    assert choice["model"] == phase_model
    set_registry(None)


def test_split_holdout_is_seeded_bounded_and_never_takes_everything():
    stems = [f"s{i}" for i in range(50)]
    train, held = split_holdout(stems, 0.2, 16, seed=4)
    assert len(held) == 10 and sorted(train + held) == sorted(stems)
    assert not set(train) & set(held)
    assert split_holdout(stems, 0.2, 16, seed=4) == (train, held)  # deterministic
    assert split_holdout(stems, 0.2, 16, seed=5)[1] != held
    assert len(split_holdout(stems, 0.9, 16, seed=0)[1]) == 16  # capped
    assert split_holdout(["a", "b"], 0.01, 16, seed=0)[1] in (["a"], ["b"])  # at least one
    assert split_holdout(["a"], 0.5, 16, seed=0) == (["a"], [])  # never all
    assert split_holdout(stems, 0.0, 16, seed=0) == (stems, [])


def test_zoo_build_gate_ships_the_winner_or_routes_to_the_reference(source, tmp_path,
                                                                    monkeypatch):
    """With --holdout, each cluster's model is scored against the reference on held-out
    images it was not fine-tuned on; the margin decides whether it ships or routes."""
    zoo_dir = tmp_path / "zoo"
    monkeypatch.setenv("CELLPLUG_MODELS", str(tmp_path / "models"))
    set_registry(None)
    base = ["zoo", "build", str(source), "--out", str(zoo_dir), "--k", "2", "--min-cluster", "1",
            "--epochs", "1", "--images-per-epoch", "8", "--patch", "64", "--precision", "fp32",
            "--seed", "3", "--holdout", "0.34", "--mix", "0.5", "--mix", "1.0", "-q"]
    r = CliRunner().invoke(main, [*base, "--gate-margin", "-1"])  # any candidate passes
    assert r.exit_code == 0, r.output
    for name in ("style-1", "style-2"):
        meta = json.loads((zoo_dir / f"{name}.json").read_text())
        gate = meta["zoo"]["gate"]
        assert len(gate["images"]) == 1 and gate["passed"] and not meta["zoo"][
            "route_to_reference"]
        assert set(gate["ap50"]) == {"reference", "0.50", "1.00"}
        assert meta["zoo"]["mix"] == gate["mix"] == max(
            (0.5, 1.0), key=lambda m: gate["ap50"][f"{m:.2f}"])
        # the held-out image was not trained on
        assert gate["images"][0] not in meta["training"]["data"]["images"]
        assert gate["images"][0] in json.loads((zoo_dir / "clusters.json").read_text())[
            "clusters"][int(name[-1]) - 1]["images"]
    assert "Gate: mean AP@0.5" in (zoo_dir / "report.md").read_text()
    assert not list(zoo_dir.glob(".*mix*"))  # candidates are not left behind
    # a margin nobody can beat: the same fine-tunes and gate scores, now routed
    r = CliRunner().invoke(main, [*base, "--gate-margin", "1", "--add"])
    assert r.exit_code == 0, r.output
    assert r.output.count("fine-tune already done") == 2 and "gate on" not in r.output
    assert r.output.count("routes to generalist (gate)") == 2
    out = tmp_path / "seg"
    r = CliRunner().invoke(main, ["segment", str(source / "usiigaci_phc_0.tif"), "--model",
                                  "auto", "--out", str(out), "--json", "-q"])
    assert r.exit_code == 0, r.output
    choice = json.loads(r.stdout)["images"][0]["choice"]
    assert choice["model"] == "generalist" and choice["routed"]
    assert "did not beat the reference" in choice["reason"]
    set_registry(None)


def test_several_mixes_need_a_holdout(source, tmp_path):
    r = CliRunner().invoke(main, ["zoo", "build", str(source), "--out", str(tmp_path / "z"),
                                  "--k", "2", "--mix", "0.5", "--mix", "1", "-q"])
    assert r.exit_code == 1 and "several mix values need a holdout" in r.output


def test_zoo_build_refuses_duplicate_stems(source, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(source, other)
    r = CliRunner().invoke(main, ["zoo", "build", str(source), str(other), "--out",
                                  str(tmp_path / "z"), "--k", "2", "-q"])
    assert r.exit_code == 1 and "two training images have the stem" in r.output


def test_mix_interpolates_the_weights(tmp_path):
    """mix_with_reference: 0.5 x fine-tune + 0.5 x reference, parameter by parameter."""
    import torch

    from cellplug.models import load_state_dict, model_from_path, resolve_model, save_model
    from cellplug.zoo_build import mix_with_reference

    ref = resolve_model("generalist")
    sd = load_state_dict(ref.weights)
    torch.manual_seed(0)
    from cellplug.models import build_network

    net = build_network(ref)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    meta = dict(model_from_path(ref.weights).metadata, zoo={"reference": "generalist"})
    meta.pop("format")
    tuned = save_model(tmp_path / ".c.finetuned.pth", net, meta, half=True)
    out = mix_with_reference(tuned, ref, 0.5, tmp_path / "c.pth")
    a, m = load_state_dict(tuned), load_state_dict(out)
    key = next(k for k in sd if sd[k].is_floating_point() and sd[k].numel() > 100)
    expected = 0.5 * a[key].float() + 0.5 * sd[key].float()
    assert torch.allclose(m[key].float(), expected, atol=2e-3)
    assert not torch.allclose(m[key].float(), a[key].float(), atol=1e-4)
    zoo = model_from_path(out).metadata["zoo"]
    assert zoo["mix"] == 0.5 and len(zoo["finetuned_sha256"]) == 64
