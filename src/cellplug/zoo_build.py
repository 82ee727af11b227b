"""Building a zoo of style models from annotated images (``cellplug zoo build``).

1. **Styles.** The reference model's style of every training image, from the same pass that
   ``--model auto`` runs (:meth:`cellplug.segmenter.Segmenter.default_scale_style`).
2. **Clusters.** Spherical k-means (cosine) on the styles, K from ``k_range`` chosen by the
   mean silhouette, among the K whose clusters all have at least ``min_cluster`` images.
3. **Models.** One model per cluster, fine-tuned from the reference on that cluster's images;
   its metadata gets the cluster's centroid (in the reference's style space), its spread and
   the similarity below which ``auto`` falls back to the reference (``zoo`` block, see
   :mod:`cellplug.selection`).
4. **Gate** (with ``holdout``). A share of each cluster's images is kept out of its
   fine-tune. On those, the reference model and each candidate (the fine-tune mixed with the
   reference's weights at each of ``mix``) segment every image as ``--model auto`` would
   (the reference's diameter estimate, no diameter given), scored by AP@0.5. The best
   candidate ships; when it does not beat the reference by more than ``gate_margin``, the
   model's metadata says ``route_to_reference``: its cluster keeps its centroid (so its images
   are not sent to a neighbouring cluster's model) but the reference segments them.
5. **Report.** ``report.md`` (clusters, their composition, thresholds, gate) and
   ``clusters.png`` (example thumbnails, one row per cluster).

Every step writes its result into the output folder and is skipped when it is there already
for the same inputs and settings, so an interrupted build resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import io
from .annotations import Annotation
from .errors import CellplugError
from .models import ModelInfo, model_from_path
from .plugins import PluginRegistry, get_registry
from .segmenter import Segmenter, SegmentOptions
from .train import TrainConfig, prepare_samples, train

THRESHOLD_PERCENTILE = 2.0
"""``min_similarity`` of a cluster: this percentile of its own images' similarity to its
centroid. An image less similar than nearly all of the cluster's training images is outside
what the cluster's model was tuned on, and the reference model segments it."""


@dataclass
class Clustering:
    """labels: int (N,) cluster of each style, 0..k-1; centroids: float32 (k, S), unit
    length; silhouettes: mean silhouette for each K tried (``None``: a cluster too small)."""

    k: int
    labels: np.ndarray
    centroids: np.ndarray
    silhouettes: dict[int, float | None]
    seed: int


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def spherical_kmeans(styles: np.ndarray, k: int, seed: int = 0, n_init: int = 10,
                     max_iter: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """k-means on the unit sphere (cosine similarity), k-means++ seeding, best of ``n_init``.

    styles: float (N, S). Returns labels int64 (N,) numbered by decreasing cluster size and
    centroids float32 (k, S) of unit length. Deterministic for a given ``seed``.
    """
    x = _unit(styles)
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"k={k} needs 1 to {n} styles")
    rng = np.random.default_rng(seed)
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for _ in range(n_init):
        centers = [x[rng.integers(n)]]
        for _ in range(1, k):  # k-means++: far points (in cosine distance) more likely
            d = np.clip(1.0 - np.max(x @ np.array(centers).T, axis=1), 0.0, None)
            p = d / d.sum() if d.sum() > 0 else np.full(n, 1.0 / n)
            centers.append(x[rng.choice(n, p=p)])
        c = np.array(centers)
        labels = np.full(n, -1)
        for _ in range(max_iter):
            new = np.argmax(x @ c.T, axis=1)
            if np.array_equal(new, labels):
                break
            labels = new
            for j in range(k):
                members = x[labels == j]
                # an emptied cluster restarts at the point its centre explains worst
                c[j] = _unit(members.sum(0)) if len(members) else x[np.argmin(np.max(x @ c.T, 1))]
        score = float(np.sum(x * c[labels]))  # total cosine similarity: higher is better
        if best is None or score > best[0] + 1e-9:
            best = (score, labels.copy(), c.copy())
    assert best is not None
    _, labels, c = best
    order = np.argsort(-np.bincount(labels, minlength=k), kind="stable")
    rank = np.empty(k, np.int64)
    rank[order] = np.arange(k)
    return rank[labels], c[order].astype(np.float32)


def silhouette(styles: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette of ``labels`` (int (N,)) with cosine distance; 0 for one cluster."""
    x = _unit(styles)
    d = np.clip(1.0 - x @ x.T, 0.0, None)
    ks = np.unique(labels)
    if len(ks) < 2:
        return 0.0
    mean_to = np.stack([d[:, labels == j].mean(1) for j in ks], axis=1)  # (N, K)
    counts = np.array([(labels == j).sum() for j in ks])
    own = np.searchsorted(ks, labels)
    n_own = counts[own]
    # a point's own-cluster mean excludes itself (distance 0), as the definition says
    a = np.where(n_own > 1, mean_to[np.arange(len(x)), own] * n_own / np.maximum(n_own - 1, 1), 0)
    other = mean_to.copy()
    other[np.arange(len(x)), own] = np.inf
    b = other.min(1)
    s = np.where(n_own > 1, (b - a) / np.maximum(np.maximum(a, b), 1e-12), 0.0)
    return float(s.mean())


def cluster_styles(styles: np.ndarray, k: int | None = None,
                   k_range: Sequence[int] = (2, 3, 4, 5, 6), min_cluster: int = 10,
                   seed: int = 0) -> Clustering:
    """Cluster ``styles`` (float (N, S)); ``k=None`` picks K from ``k_range`` by the mean
    silhouette among the K whose every cluster has ``min_cluster`` or more styles."""
    tried: dict[int, float | None] = {}
    results: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for kk in ([k] if k else list(k_range)):
        if kk > len(styles):
            continue
        labels, cents = spherical_kmeans(styles, kk, seed)
        results[kk] = (labels, cents)
        ok = np.bincount(labels, minlength=kk).min() >= min_cluster or k is not None
        tried[kk] = silhouette(styles, labels) if ok else None
    scored = {kk: s for kk, s in tried.items() if s is not None}
    if not scored:
        raise CellplugError(f"no K in {list(k_range)} gives clusters of {min_cluster} or more "
                            f"of the {len(styles)} images; give --k or --min-cluster")
    best = k or max(scored, key=lambda kk: (scored[kk], -kk))
    labels, cents = results[best]
    return Clustering(best, labels, cents, tried, seed)


def spread(styles: np.ndarray, labels: np.ndarray, centroids: np.ndarray) -> list[dict[str, float]]:
    """Per cluster: its images' cosine similarity to its centroid (mean, min, percentiles)
    and ``min_similarity``, the fallback threshold (:data:`THRESHOLD_PERCENTILE`)."""
    x = _unit(styles)
    out = []
    for j, c in enumerate(_unit(centroids)):
        sims = x[labels == j] @ c
        out.append({
            "n_images": int(len(sims)),
            "mean": round(float(sims.mean()), 4),
            "min": round(float(sims.min()), 4),
            "p05": round(float(np.percentile(sims, 5)), 4),
            # rounded down: a stored threshold never leaves out more than the percentile
            "min_similarity": float(np.floor(np.percentile(sims, THRESHOLD_PERCENTILE) * 1e4)
                                    / 1e4),
        })
    return out


def reference_styles(reference: Segmenter, annotations: Sequence[Annotation],
                     opts: SegmentOptions | None = None, progress: bool = True) -> np.ndarray:
    """float32 (N, S): the reference model's default-scale style of each annotated image,
    exactly as ``--model auto`` computes it for an image to segment."""
    from tqdm import tqdm

    opts = opts or SegmentOptions()
    out = []
    for ann in tqdm(annotations, desc="styles", unit="image", disable=not progress):
        prepared = reference.prepare(ann.image, opts)
        out.append(reference.default_scale_style(prepared, opts))
    return np.asarray(out, np.float32)


def thumbnail_grid(images_by_cluster: Sequence[Sequence[np.ndarray]], size: int = 96,
                   gap: int = 4) -> np.ndarray:
    """uint8 RGB (H, W, 3): one row of thumbnails (``size`` px) per cluster."""
    from .render import to_display
    from .transforms import resize

    cols = max((len(r) for r in images_by_cluster), default=1) or 1
    rows = len(images_by_cluster)
    grid = np.full((rows * (size + gap) + gap, cols * (size + gap) + gap, 3), 255, np.uint8)
    for r, imgs in enumerate(images_by_cluster):
        for c, img in enumerate(imgs):
            rgb = to_display(np.asarray(img))
            if rgb.ndim == 2:
                rgb = np.repeat(rgb[..., None], 3, axis=2)
            rgb = rgb[..., :3]
            side = min(rgb.shape[:2])  # centre square crop, then resize
            y0, x0 = (rgb.shape[0] - side) // 2, (rgb.shape[1] - side) // 2
            sq = rgb[y0 : y0 + side, x0 : x0 + side].astype(np.float32).transpose(2, 0, 1)
            small = np.clip(resize(sq, (size, size)), 0, 255).astype(np.uint8).transpose(1, 2, 0)
            y, x = gap + r * (size + gap), gap + c * (size + gap)
            grid[y : y + size, x : x + size] = small
    return grid


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class ZooBuild:
    """What :func:`build_zoo` made: the clustering and the model files, in cluster order."""

    clustering: Clustering
    models: list[Path]
    report: Path


def build_zoo(
    annotations: Sequence[Annotation],
    out_dir: str | Path,
    reference: ModelInfo,
    config: TrainConfig,
    prefix: str = "style",
    k: int | None = None,
    k_range: Sequence[int] = (2, 3, 4, 5, 6),
    min_cluster: int = 10,
    groups: Mapping[str, str] | None = None,
    registry: PluginRegistry | None = None,
    progress: bool = True,
    log_fn: Callable[[str], None] | None = None,
    command: str | None = None,
    mix: float | Sequence[float] = 1.0,
    holdout: float = 0.0,
    holdout_max: int = 16,
    gate_margin: float = 0.0,
) -> ZooBuild:
    """Cluster ``annotations`` by the ``reference`` model's styles and fine-tune one model per
    cluster from it (``config``: the fine-tune's settings, ``config.seed`` also seeds the
    clustering). Writes into ``out_dir``: ``styles.npz``, ``clusters.json``, ``report.md``,
    ``clusters.png`` and ``<prefix>-<i>.pth/.json`` (i = 1..K, largest cluster first).
    ``groups`` (stem -> label, e.g. modality) only describes the clusters in the report.
    ``mix``: each shipped model's weights are ``mix`` x its fine-tune + (1 - ``mix``) x the
    reference's (weight-space interpolation, as WiSE-FT, Wortsman et al. 2022: a fine-tune on a
    subset keeps more of what the reference knows); 1.0 ships the fine-tunes as they are.
    Several values need ``holdout``: the gate picks one per cluster.
    ``holdout``: share of each cluster's images (at most ``holdout_max``, at least one, never
    all) kept out of its fine-tune for the gate (module doc, step 4); 0: no gate.
    """
    mixes = tuple(float(m) for m in (mix if isinstance(mix, Sequence) else [mix]))
    if not mixes or any(not 0.0 < m <= 1.0 for m in mixes):
        raise CellplugError(f"mix must be in (0, 1], got {list(mixes)}")
    if len(mixes) > 1 and holdout <= 0:
        raise CellplugError("several mix values need a holdout (the gate chooses among them)")
    if not 0.0 <= holdout < 1.0:
        raise CellplugError(f"holdout must be in [0, 1), got {holdout}")
    say = log_fn or (lambda m: None)
    registry = registry or get_registry()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stems = [a.stem for a in annotations]
    if len(set(stems)) != len(stems):
        dup = next(s for s, n in Counter(stems).items() if n > 1)
        raise CellplugError(f"two training images have the stem {dup!r}; stems must be unique")
    ref_sha = io.file_sha256(reference.weights)

    # 1. styles (cached for these images and this reference)
    styles_key = _key({"stems": stems, "reference": ref_sha})
    styles_path = out / "styles.npz"
    styles = None
    if styles_path.exists():
        with np.load(styles_path, allow_pickle=False) as z:
            if str(z["key"]) == styles_key:
                styles = z["styles"]
                say(f"styles: reused {styles_path}")
    if styles is None:
        ref = Segmenter.from_info(reference, registry, threads=config.threads)
        styles = reference_styles(ref, annotations, progress=progress)
        with io.atomic_path(styles_path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, styles=styles, stems=np.array(stems), key=np.array(styles_key))

    # 2. clusters (cheap: always recomputed, deterministic with the seed)
    clus = cluster_styles(styles, k, k_range, min_cluster, config.seed)
    spreads = spread(styles, clus.labels, clus.centroids)
    names = [f"{prefix}-{j + 1}" for j in range(clus.k)]
    members = {names[j]: [s for s, lab in zip(stems, clus.labels, strict=True) if lab == j]
               for j in range(clus.k)}
    scores = ", ".join(f"{kk}: {'-' if v is None else f'{v:.3f}'}"
                       for kk, v in clus.silhouettes.items())
    sizes = ", ".join(str(len(v)) for v in members.values())
    say(f"clusters: K={clus.k} (mean silhouette by K: {scores}); sizes {sizes}")
    io.write_json(out / "clusters.json", {
        "reference": reference.name, "reference_sha256": ref_sha, "k": clus.k,
        "silhouettes": {str(kk): s for kk, s in clus.silhouettes.items()},
        "criterion": f"mean silhouette (cosine), clusters of >= {min_cluster} images",
        "seed": clus.seed, "clusters": [
            {"model": names[j], **spreads[j], "images": members[names[j]]}
            for j in range(clus.k)
        ],
    })

    # 3. report (before the long part, so it can be looked at while the models train)
    by_stem = {a.stem: a for a in annotations}
    rng = np.random.default_rng(config.seed)
    thumbs = [[by_stem[s].image for s in rng.permutation(members[n])[:8]] for n in names]
    io.write_png(out / "clusters.png", thumbnail_grid(thumbs))
    report = _write_report(out, reference, clus, names, members, spreads, groups)

    # 4. one model per cluster, fine-tuned from the reference (kept in a hidden file, reused
    # when its build key matches), then mixed with the reference's weights (``mix``) and,
    # with a holdout, gated on the cluster's held-out images
    models = []
    gates: dict[str, dict[str, Any]] = {}
    gate_opts = SegmentOptions(channels=tuple(config.channels))
    ref_seg: Segmenter | None = None
    for j, name in enumerate(names):
        path = out / f"{name}.pth"
        tuned = out / f".{name}.finetuned.pth"
        train_stems, held = split_holdout(members[name], holdout, holdout_max,
                                          config.seed + j)
        cluster_anns = [by_stem[s] for s in train_stems]
        cfg = replace(config, seed=config.seed + j)
        zoo = {
            "reference": reference.name, "reference_sha256": ref_sha, "cluster": j + 1,
            "k": clus.k, "n_images": len(members[name]),
            "min_similarity": spreads[j]["min_similarity"],
            "spread": {kk: v for kk, v in spreads[j].items() if kk != "min_similarity"},
            "composition": _composition(members[name], groups),
        }
        build_key = _key({"zoo": zoo, "config": asdict(cfg), "stems": train_stems})
        try:
            done = model_from_path(tuned).metadata.get("zoo", {}).get("build_key")
        except CellplugError:  # missing or unreadable: train it
            done = None
        if done == build_key:
            say(f"{name}: fine-tune already done ({tuned})")
        else:
            _fine_tune_cluster(name, cluster_anns, tuned, reference, cfg, registry, progress,
                               say, {"zoo_cluster": j + 1, "images": train_stems,
                                     "held_out": held, "command": command},
                               clus.centroids[j], {**zoo, "build_key": build_key})
        chosen, gate = mixes[0], None
        if held:
            if ref_seg is None:
                ref_seg = Segmenter.from_info(reference, registry, threads=config.threads)
            gate = _gate(name, tuned, reference, ref_seg, mixes, [by_stem[s] for s in held],
                         out, gate_opts, gate_margin, registry, progress, say)
            chosen = gate["mix"]
            gates[name] = gate
        try:
            shipped = model_from_path(path).metadata.get("zoo", {})
        except CellplugError:
            shipped = {}
        if (shipped.get("mix") != chosen or shipped.get("gate") != gate
                or shipped.get("finetuned_sha256") != io.file_sha256(tuned)):
            mix_with_reference(tuned, reference, chosen, path, registry,
                               extra={} if gate is None else {
                                   "gate": gate, "route_to_reference": not gate["passed"]})
        say(f"{name}: {path} ({chosen:.2f} fine-tuned + {1 - chosen:.2f} {reference.name} "
            f"weights)" + ("" if gate is None or gate["passed"]
                           else f"; routes to {reference.name} (gate)"))
        models.append(path)
    if gates:
        report = _write_report(out, reference, clus, names, members, spreads, groups, gates)
    return ZooBuild(clus, models, report)


def _fine_tune_cluster(name: str, annotations: Sequence[Annotation], target: Path,
                       reference: ModelInfo, cfg: TrainConfig, registry: PluginRegistry,
                       progress: bool, say: Callable[[str], None], description: dict[str, Any],
                       centroid: np.ndarray, zoo: dict[str, Any]) -> None:
    say(f"{name}: fine-tuning on {len(annotations)} images "
        f"({_describe(zoo['composition'])})")
    decoder = registry.get("decoder", reference.decoder)
    samples = prepare_samples(annotations, decoder, cfg.channels, reference.n_channels,
                              name, cfg.min_train_masks, progress)
    if not samples:
        raise CellplugError(f"cluster {name}: none of its {len(annotations)} images has "
                            f"{cfg.min_train_masks} or more objects to train on")
    partial = target.with_name(f".{name}.partial.pth")
    result = train(samples, [], partial, cfg, base_model=reference, registry=registry,
                   progress=progress, log_fn=say, data_description=description)
    meta = model_from_path(result.model_path).metadata
    meta["name"] = name
    # auto compares the reference's styles: the centroid is in the reference's space
    meta["style_centroid"] = [round(float(v), 6) for v in centroid]
    meta["zoo"] = zoo
    io.write_json(partial.with_suffix(".json"), meta)
    with io.atomic_paths([target, target.with_suffix(".json")]) as (tw, tj):
        partial.replace(tw)
        partial.with_suffix(".json").replace(tj)


def split_holdout(stems: Sequence[str], fraction: float, max_n: int,
                  seed: int) -> tuple[list[str], list[str]]:
    """(train, held out): ``fraction`` of ``stems`` (rounded, at least one, at most ``max_n``,
    never all), drawn with ``seed``; both keep the order of ``stems``. ``fraction`` 0: none."""
    if fraction <= 0 or len(stems) < 2:
        return list(stems), []
    n = min(max_n, max(1, round(fraction * len(stems))), len(stems) - 1)
    pick = set(np.random.default_rng(seed).permutation(len(stems))[:n].tolist())
    return ([s for i, s in enumerate(stems) if i not in pick],
            [s for i, s in enumerate(stems) if i in pick])


def gate_scores(reference: Segmenter, candidates: Mapping[str, Segmenter],
                annotations: Sequence[Annotation], opts: SegmentOptions,
                progress: bool = True) -> dict[str, list[float]]:
    """AP@0.5 per image of the reference and of each candidate on ``annotations``, each image
    segmented as ``--model auto`` does it: the reference's diameter estimate (or
    ``opts.diameter``) for every model. Keys: ``"reference"`` and the candidates' keys."""
    from tqdm import tqdm

    from .metrics import match_counts

    out: dict[str, list[float]] = {"reference": [], **{k: [] for k in candidates}}
    for ann in tqdm(annotations, desc="gate", unit="image", disable=not progress):
        prepared = reference.prepare(ann.image, opts)
        if opts.diameter is None or opts.diameter <= 0:
            diameter, _ = reference.size_and_style(prepared, opts)
        else:
            diameter = float(opts.diameter)
        for key, seg in (("reference", reference), *candidates.items()):
            labels = seg.segment_prepared(prepared, opts, diameter).labels
            out[key].append(float(match_counts(ann.labels, labels).ap[0]))
    return out


def _gate(name: str, tuned: Path, reference: ModelInfo, ref_seg: Segmenter,
          mixes: Sequence[float], held: Sequence[Annotation], out: Path,
          opts: SegmentOptions, margin: float, registry: PluginRegistry, progress: bool,
          say: Callable[[str], None]) -> dict[str, Any]:
    """The gate of one cluster (module doc, step 4); cached in ``.<name>.gate.json``."""
    stems = [a.stem for a in held]
    key = _key({"tuned": io.file_sha256(tuned), "reference": io.file_sha256(reference.weights),
                "mixes": list(mixes), "images": stems, "opts": asdict(opts)})
    cache = out / f".{name}.gate.json"
    scores = None
    if cache.exists():
        try:
            saved = json.loads(cache.read_text())
            scores = saved["scores"] if saved.get("key") == key else None
        except (ValueError, KeyError):
            scores = None
    if scores is None:
        say(f"{name}: gate on {len(held)} held-out images (reference and mix "
            f"{', '.join(f'{m:.2f}' for m in mixes)})")
        cands = {}
        for m in mixes:
            path = mix_with_reference(tuned, reference, m, out / f".{name}.mix{m:.2f}.pth",
                                      registry)
            cands[f"{m:.2f}"] = Segmenter.from_info(model_from_path(path), registry,
                                                    threads=ref_seg.threads)
        scores = gate_scores(ref_seg, cands, held, opts, progress)
        for m in mixes:
            for suffix in (".pth", ".json"):
                (out / f".{name}.mix{m:.2f}{suffix}").unlink(missing_ok=True)
        io.write_json(cache, {"key": key, "images": stems, "scores": scores})
    mean = {k: round(float(np.mean(v)), 4) for k, v in scores.items()}
    best = max((f"{m:.2f}" for m in mixes), key=lambda k: mean[k])
    passed = mean[best] > mean["reference"] + margin
    say(f"{name}: gate AP@0.5 reference {mean['reference']:.4f}, "
        + ", ".join(f"mix {k} {mean[k]:.4f}" for k in mean if k != "reference")
        + (f": mix {best} ships" if passed else f": no mix beats {reference.name} by more "
           f"than {margin:.3f}, the cluster routes to it"))
    return {"images": stems, "ap50": mean, "mix": float(best), "margin": margin,
            "passed": bool(passed)}


def mix_with_reference(tuned: Path, reference: ModelInfo, mix: float, out: Path,
                       registry: PluginRegistry | None = None,
                       extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``out``: the weights ``mix`` x ``tuned`` + (1 - ``mix``) x ``reference`` (same
    architecture), with ``tuned``'s metadata plus ``zoo.mix``, the fine-tune's sha256 and
    ``extra`` (more ``zoo`` keys)."""
    import torch

    from .models import build_network, load_state_dict, save_model

    meta = dict(model_from_path(tuned).metadata)
    a, b = load_state_dict(tuned), load_state_dict(reference.weights)
    if a.keys() != b.keys():
        raise CellplugError(f"{tuned}: its layers differ from {reference.name}'s; cannot mix")
    mixed = {k: (mix * a[k].float() + (1 - mix) * b[k].float()) if a[k].is_floating_point()
             else a[k] for k in a}
    net = build_network(reference, registry)
    net.load_state_dict(mixed)
    meta.pop("format", None)
    meta["name"] = out.stem
    meta["zoo"] = {**meta["zoo"], "mix": mix,
                   "finetuned_sha256": io.file_sha256(tuned), **(extra or {})}
    with torch.no_grad():
        path = save_model(out, net.eval(), meta, half=True)
    model_from_path(path)  # what was written loads
    return path


def _composition(stems: Sequence[str], groups: Mapping[str, str] | None) -> dict[str, int]:
    if not groups:
        return {}
    return dict(Counter(groups.get(s, "?") for s in stems).most_common())


def _describe(comp: Mapping[str, int]) -> str:
    return ", ".join(f"{n} {g}" for g, n in comp.items()) or "no groups given"


def _write_report(out: Path, reference: ModelInfo, clus: Clustering, names: Sequence[str],
                  members: Mapping[str, Sequence[str]], spreads: Sequence[Mapping[str, Any]],
                  groups: Mapping[str, str] | None,
                  gates: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    lines = [
        f"# Style zoo of `{reference.name}`",
        "",
        f"{sum(len(v) for v in members.values())} training images, clustered by the style "
        f"vector of `{reference.name}` (spherical k-means, seed {clus.seed}).",
        "",
        "K by mean silhouette (cosine; `-`: a cluster was too small): "
        + ", ".join(f"K={kk}: {'-' if s is None else f'{s:.3f}'}"
                    for kk, s in clus.silhouettes.items()) + f". Chosen: **K={clus.k}**.",
        "",
        "| model | images | composition | similarity to centroid: mean / p05 / min "
        "| fallback below |",
        "|---|---|---|---|---|",
    ]
    for j, name in enumerate(names):
        s = spreads[j]
        lines.append(f"| {name} | {s['n_images']} | "
                     f"{_describe(_composition(members[name], groups)) if groups else ''} | "
                     f"{s['mean']:.3f} / {s['p05']:.3f} / {s['min']:.3f} | "
                     f"{s['min_similarity']:.3f} |")
    if gates:
        lines += ["", "Gate: mean AP@0.5 on each cluster's held-out images (not trained on by "
                  "its model), segmented as `--model auto` does:", "",
                  "| model | held out | reference | candidates (mix) | ships |",
                  "|---|---|---|---|---|"]
        for name, g in gates.items():
            ap = g["ap50"]
            cands = ", ".join(f"{k}: {v:.4f}" for k, v in ap.items() if k != "reference")
            ships = (f"mix {g['mix']:.2f}" if g["passed"]
                     else f"routes to `{reference.name}`")
            lines.append(f"| {name} | {len(g['images'])} | {ap['reference']:.4f} | {cands} | "
                         f"{ships} |")
    lines += ["", "Examples (one row per model, in the order above):", "",
              "![clusters](clusters.png)", ""]
    path = out / "report.md"
    with io.atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))
    return path
