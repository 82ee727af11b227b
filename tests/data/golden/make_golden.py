"""Make the golden fixtures: what Cellpose 3.1.1.2 computes on the test images.

Made once and committed; the default test run compares cellplug against them without
Cellpose installed. Run in an environment with cellpose==3.1.1.2 and torch==2.13.0 (CPU,
float32: Cellpose's defaults there, MKL-DNN included), from the repository root:

    nox -s golden
    # or, in such an environment (cellplug itself is not needed):
    python tests/data/golden/make_golden.py

It overwrites ``*.npz`` and ``manifest.json`` beside this file; the manifest repeats the
command, the versions and every setting. One torch thread, about two minutes on 2 cores.

Models: the bundled generalist (``plugins/cellplug_zoo/weights/generalist.pth``, loaded as
``CellposeModel(pretrained_model=...)``, with its size model from ``generalist.json`` written
to a ``_size.npy`` for ``SizeModel``, as ``benchmarks/parity_model.py`` does), and a random
CPnet (``golden_support.random_state_dict``: numpy-seeded weights, ``diam_mean`` 30,
``diam_labels`` 23; its output layer calibrated here on ``dsb2018_fluo`` so that it predicts
flow fields with sinks, and stored in ``random_model.npz``) saved as a bare Cellpose file.

Images: ``tests/data/{dsb2018_fluo,dsb2018_he,dsb2018_bf,usiigaci_phc}`` and
``examples/nuclei.tif`` with their ``_masks``, grayscale (channels [0, 0]) unless stated.

Records (float16 where the tests' tolerance allows it, else float32; labels uint16):

- ``network.npz``: ``core.run_net`` at scale 1 on the normalised image: raw output (3, Y, X)
  and style, tiled (224-px tiles, Cellpose's default) and whole (one tile the size of the
  padded image, i.e. tiling off: ``bsize`` = padded size), per model, on ``dsb2018_fluo``
  (one tile either way: one plain forward pass) and ``usiigaci_crop`` (rows 0-255,
  columns 0-143 of ``usiigaci_phc``: two tiles along Y).
- ``flows.npz``: ``dynamics.masks_to_flows`` (and the centres of ``masks_to_flows_cpu``)
  of every label image; ``dynamics.resize_and_compute_masks`` on recorded network flows
  (``dP`` and ``cellprob`` rounded to float16 *before* Cellpose runs on them, so both sides
  see the same input), with and without interpolation.
- ``segment.npz``: ``CellposeModel.eval`` at given diameters (masks, style; ``dP`` and
  ``cellprob`` where also used by ``flows.npz``), ``Cellpose.eval`` with ``diameter=0``
  (size model, then ``CellposeModel.eval`` at its estimate: masks, diameter), the size
  model's style and first guess (``diam_style``), one ``augment=True`` case (generalist)
  and one two-channel case (random model).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import platform
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import golden_support as gs  # noqa: E402

CELLPOSE_VERSION = "3.1.1.2"
COMMAND = "nox -s golden  (or: python tests/data/golden/make_golden.py)"
WEIGHTS = gs.REPO / "plugins" / "cellplug_zoo" / "weights" / "generalist.pth"
GIVEN_DIAMETER = 30.0  # the generalist's "given diameter" records (diam_mean is 17)
RANDOM_DIAMETER = 40.0  # the random model's (diam_mean 30)
RANDOM_FLOW_THRESHOLD = 0.0  # random fields rarely pass the flow check (parity_backbone.py)


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez_compressed``, but the same arrays always give the same bytes (fixed
    timestamps, sorted names), so regenerating unchanged fixtures changes no file."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def f16(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float32).astype(np.float16)


def normalized(img: np.ndarray, channels=(0, 0)) -> np.ndarray:
    """Cellpose's network input: (1, Y, X, 2) float32, as ``CellposeModel.eval`` makes it."""
    from cellpose import models, transforms

    x = transforms.convert_image(img, list(channels), nchan=2)
    x = x[np.newaxis] if x.ndim < 4 else x
    params = {**models.normalize_default, "normalize": True, "invert": False}
    return transforms.normalize_img(np.asarray(x), **params)


def run_net(net, x: np.ndarray, whole: bool) -> tuple[np.ndarray, np.ndarray]:
    """``core.run_net`` at scale 1: raw (3, Y, X), style (256,). ``whole``: one tile."""
    from cellpose import core, transforms

    bsize = 224
    if whole:
        t, b, left, r = transforms.get_pad_yx(x.shape[1], x.shape[2])
        bsize = max(x.shape[1] + t + b, x.shape[2] + left + r, 224)
    y, style = core.run_net(net, x, bsize=bsize)
    return y[0].transpose(2, 0, 1), style[0]


def make_random_model(folder: Path, calibration_image: np.ndarray) -> tuple[Path, dict]:
    """The random CPnet: numpy weights, output layer calibrated on ``calibration_image``."""
    import torch
    from cellpose import resnet_torch

    net = resnet_torch.CPnet([2, 32, 64, 128, 256], 3, sz=3, mkldnn=False)
    template = net.state_dict()
    state = gs.random_state_dict(template)
    full = {k: torch.from_numpy(v.copy()) for k, v in state.items()}
    for k, v in template.items():  # num_batches_tracked: as a fresh network has them
        full.setdefault(k, v.clone())
    net.load_state_dict(full)
    net.eval()
    # centre and scale the last 1x1 convolution: raw flows with sd 2.5 (0.5 px per step),
    # cell probability with sd 3 and 30 % of pixels above 0 (as parity_backbone.py does)
    raw, _ = run_net(net, normalized(calibration_image), whole=False)
    flat = raw.reshape(3, -1).astype(np.float64)
    mean, std = flat.mean(axis=1), flat.std(axis=1)
    scale = np.array([2.5, 2.5, 3.0]) / std
    shift = -np.quantile((flat[2] - mean[2]) * scale[2], 1 - 0.3)
    w = state["output.2.weight"].astype(np.float64) * scale[:, None, None, None]
    bias = (state["output.2.bias"].astype(np.float64) - mean) * scale + [0.0, 0.0, shift]
    stored = {"output.2.weight": w.astype(np.float32), "output.2.bias": bias.astype(np.float32)}
    state.update(stored)
    full.update({k: torch.from_numpy(v.copy()) for k, v in stored.items()})
    path = folder / "random_cpnet"  # a bare Cellpose model file (no .json beside it)
    torch.save(full, path)
    return path, {"stored": stored, "digest": gs.state_digest(state)}


def main() -> int:
    import cellpose
    import torch
    from cellpose import dynamics, models
    from scipy.ndimage import find_objects

    if cellpose.version != CELLPOSE_VERSION:
        print(f"make_golden: needs cellpose {CELLPOSE_VERSION}, found {cellpose.version}")
        return 2
    logging.getLogger("cellpose").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    out = gs.GOLDEN
    images = {name: gs.image(name) for name in [*gs.IMAGES, *gs.CROPS]}
    masks = {name: gs.labels(name) for name in gs.IMAGES}
    network: dict[str, np.ndarray] = {}
    flows: dict[str, np.ndarray] = {}
    segment: dict[str, np.ndarray] = {}
    cases: dict[str, list] = {"network": [], "masks_to_flows": [], "compute_masks": [],
                              "segment": []}
    tmp = Path(tempfile.mkdtemp())

    # -- models ------------------------------------------------------------------------------
    meta = json.loads(WEIGHTS.with_suffix(".json").read_text())
    sm = meta["size_model"]
    size_path = tmp / "generalist_size.npy"
    np.save(size_path, {k: np.asarray(sm[k]) if k in ("A", "smean") else sm[k]
                        for k in ("A", "smean", "ymean", "diam_mean")})
    generalist = models.CellposeModel(pretrained_model=str(WEIGHTS))
    size_model = models.SizeModel(generalist, pretrained_size=str(size_path))
    # Cellpose.eval without downloading a built-in model: its cp and sz are ours
    wrapper = models.Cellpose.__new__(models.Cellpose)
    wrapper.cp, wrapper.sz = generalist, size_model
    wrapper.pretrained_size, wrapper.diam_mean = str(size_path), generalist.diam_mean
    random_path, random_info = make_random_model(tmp, images["dsb2018_fluo"])
    random = models.CellposeModel(pretrained_model=str(random_path))
    assert abs(float(random.diam_labels) - gs.RANDOM_DIAM_LABELS) < 1e-6
    assert abs(float(random.diam_mean) - gs.RANDOM_DIAM_MEAN) < 1e-6
    save_npz(out / "random_model.npz", random_info["stored"])
    cps = {"generalist": generalist, "random": random}

    # -- inputs: cellplug's prepare_image must give these exact float32 values -----------------
    inputs = []
    for name, channels in [*((n, (0, 0)) for n in images), ("dsb2018_he", (2, 3))]:
        x = normalized(images[name], channels)[0].transpose(2, 0, 1)
        inputs.append({"image": name, "channels": list(channels),
                       "shape": list(images[name].shape), "dtype": str(images[name].dtype),
                       "normalized_sha256": _sha(np.ascontiguousarray(x, np.float32))})

    # -- network.npz: core.run_net, tiled and whole ------------------------------------------
    for model, cp in cps.items():
        for name in ("dsb2018_fluo", "usiigaci_crop"):
            x = normalized(images[name])
            for mode in ("tiled", "whole"):
                if name == "dsb2018_fluo" and mode == "tiled":
                    continue  # a single tile: the same single pass as "whole"
                raw, style = run_net(cp.net, x, whole=mode == "whole")
                key = f"{model}/{name}/{mode}"
                network[f"{key}/raw"] = f16(raw)
                network[f"{key}/style"] = style.astype(np.float32)
                cases["network"].append({"key": key, "model": model, "image": name,
                                         "mode": mode, "rescale": 1.0})
                print(key, raw.shape, flush=True)

    # -- flows.npz: masks_to_flows ------------------------------------------------------------
    for name, lab in masks.items():
        mu = dynamics.masks_to_flows(lab)
        # masks_to_flows_cpu's centres are relative to each object's bounding box
        _, meds = dynamics.masks_to_flows_cpu(lab)
        boxes = [b for b in find_objects(lab) if b is not None]
        centers = [(b[0].start + m[0], b[1].start + m[1]) for b, m in zip(boxes, meds,
                                                                          strict=True)]
        flows[f"masks_to_flows/{name}/flows"] = f16(mu)
        flows[f"masks_to_flows/{name}/centers"] = np.asarray(centers, np.int32)
        cases["masks_to_flows"].append({"key": f"masks_to_flows/{name}", "image": name,
                                        "n_objects": int(len(np.unique(lab)) - 1)})

    # -- segment.npz: CellposeModel.eval / Cellpose.eval ----------------------------------------
    def record_eval(model, name, tag, *, diameter, channels=(0, 0), augment=False,
                    flow_threshold=0.4, keep_flows=False, mask_step=None):
        cp = cps[model]
        m, fl, style = cp.eval(images[name], channels=list(channels), diameter=diameter,
                               augment=augment, flow_threshold=flow_threshold)[:3]
        key = f"{model}/{name}/{tag}"
        rescale = float(cp.diam_mean) / (diameter if diameter else float(cp.diam_labels))
        case = {"key": key, "model": model, "image": name, "diameter": diameter,
                "channels": list(channels), "augment": augment,
                "flow_threshold": flow_threshold, "rescale": rescale,
                "niter": int(np.uint32(200.0 / rescale)), "n_objects": int(m.max()),
                "has_flows": keep_flows}
        segment[f"{key}/masks"] = m.astype(np.uint16)
        segment[f"{key}/style"] = np.asarray(style, np.float32)
        if keep_flows:
            dP, cellprob = f16(fl[1]), f16(fl[2])
            segment[f"{key}/dP"], segment[f"{key}/cellprob"] = dP, cellprob
            if keep_flows if mask_step is None else mask_step:
                record_compute_masks(key, dP, cellprob, case["niter"], flow_threshold)
        cases["segment"].append(case)
        print(key, case["n_objects"], "objects", flush=True)

    def record_compute_masks(key, dP, cellprob, niter, flow_threshold):
        """Cellpose's mask step on the float16-rounded flows (what eval runs, no resize)."""
        dP32, cp32 = dP.astype(np.float32), cellprob.astype(np.float32)
        case = {"key": key, "niter": niter, "flow_threshold": flow_threshold,
                "cellprob_threshold": 0.0, "min_size": 15, "max_size_fraction": 0.4}
        for interp in (True, False):
            m = dynamics.resize_and_compute_masks(
                dP32, cp32, niter=niter, cellprob_threshold=0.0, flow_threshold=flow_threshold,
                interp=interp, min_size=15, max_size_fraction=0.4)
            suffix = "masks" if interp else "masks_nointerp"
            flows[f"compute_masks/{key}/{suffix}"] = m.astype(np.uint16)
            case[f"n_objects_{suffix}"] = int(m.max())
        cases["compute_masks"].append(case)

    for name in gs.IMAGES:
        record_eval("generalist", name, f"d{GIVEN_DIAMETER:g}", diameter=GIVEN_DIAMETER,
                    keep_flows=name != "nuclei")
    # diameter 0: the size model, then eval at its estimate (Cellpose.eval)
    for name in gs.IMAGES:
        img = images[name]
        diam, diam_style = size_model.eval(img, channels=[0, 0])
        style = generalist.eval(img, channels=[0, 0], resample=False, compute_masks=False)[-1]
        m, _, _, diams = wrapper.eval(img, channels=[0, 0], diameter=0)
        assert float(diams) == float(diam)
        key = f"generalist/{name}/d0"
        segment[f"{key}/masks"] = m.astype(np.uint16)
        segment[f"{key}/diameter"] = np.float64(diam)
        segment[f"{key}/diameter_style"] = np.float64(np.asarray(diam_style).reshape(-1)[0])
        segment[f"{key}/style_size"] = np.asarray(style, np.float32)  # the size model's style
        cases["segment"].append({
            "key": key, "model": "generalist", "image": name, "diameter": 0,
            "channels": [0, 0], "augment": False, "flow_threshold": 0.4,
            "size_model": True, "estimated_diameter": float(diam),
            "diameter_style": float(segment[f"{key}/diameter_style"]),
            "style_rescale": float(generalist.diam_mean) / float(generalist.diam_labels),
            "n_objects": int(m.max()), "has_flows": False})
        print(key, f"diameter {float(diam):.3f} (style {float(diam_style):.3f})", flush=True)
    dm = float(generalist.diam_mean)
    record_eval("generalist", "dsb2018_fluo", "augment", diameter=dm, augment=True,
                keep_flows=True)
    # no size model: diameter 0 means diam_labels; the H&E image as two channels (green
    # to segment, blue as the nuclear channel), which the grayscale generalist does not take
    record_eval("random", "dsb2018_fluo", "d0", diameter=0,
                flow_threshold=RANDOM_FLOW_THRESHOLD, keep_flows=True)
    record_eval("random", "dsb2018_he", "channels23", diameter=0, channels=(2, 3),
                flow_threshold=RANDOM_FLOW_THRESHOLD)
    # its masks are too sensitive to float rounding to compare (see test_golden_segmenter.py),
    # so its flows are kept instead, without a mask-step record
    record_eval("random", "usiigaci_phc", f"d{RANDOM_DIAMETER:g}", diameter=RANDOM_DIAMETER,
                flow_threshold=RANDOM_FLOW_THRESHOLD, keep_flows=True, mask_step=False)

    # -- write ---------------------------------------------------------------------------------
    files = {"network": network, "flows": flows, "segment": segment}
    for stem, arrays in files.items():
        save_npz(out / f"{stem}.npz", arrays)
    sizes = {p.name: p.stat().st_size for p in sorted(out.glob("*.npz"))}
    doc = {
        "description": "Cellpose 3.1.1.2 outputs on the test images; see make_golden.py",
        "cellpose": cellpose.version,
        "command": COMMAND,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": {"cellpose": cellpose.version, "torch": torch.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "machine": platform.platform(),
        "settings": {
            "precision": "float32 (CPU)", "cellpose_mkldnn": bool(generalist.mkldnn),
            "torch_threads": 1, "tile_overlap": 0.1, "bsize": 224,
            "cellprob_threshold": 0.0, "min_size": 15, "max_size_fraction": 0.4,
            "interp": True, "resample": True,
        },
        "models": {
            "generalist": {"weights": str(WEIGHTS.relative_to(gs.REPO)),
                           "weights_sha256": gs.file_sha256(WEIGHTS),
                           "size_model_sha256": gs.size_model_sha256(meta),
                           "diam_mean": float(generalist.diam_mean),
                           "diam_labels": float(generalist.diam_labels),
                           "size_model": "generalist.json size_model -> _size.npy"},
            "random": {"weights": "golden_support.random_state_dict + random_model.npz",
                       "seed": gs.RANDOM_SEED, "diam_mean": gs.RANDOM_DIAM_MEAN,
                       "diam_labels": gs.RANDOM_DIAM_LABELS,
                       "state_sha256": random_info["digest"],
                       "flow_threshold": RANDOM_FLOW_THRESHOLD},
        },
        "crops": {k: [base, [[s.start, s.stop] for s in crop]]
                  for k, (base, crop) in gs.CROPS.items()},
        "inputs": inputs,
        "cases": cases,
        "file_bytes": sizes,
    }
    (out / "manifest.json").write_text(json.dumps(doc, indent=1) + "\n")
    print("written", sizes, "total", sum(sizes.values()))
    return 0


def _sha(a: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


if __name__ == "__main__":
    sys.exit(main())
