"""Backbone and inference parity with Cellpose 3.1.1.2: same weights, same outputs, same masks.

One randomly initialised Cellpose-layout network (batch-norm running statistics and affine
parameters randomised too, so they matter; ``diam_labels`` = 23 != ``diam_mean`` = 17 so that
"no diameter" rescales) is saved as a bare Cellpose ``.pth``. Both cellplug
(``Segmenter``, ``tile=True, precision="fp32"``: the Cellpose-identical mode) and
``cellpose.models.CellposeModel(pretrained_model=path).eval`` segment three real dsb2018
images (held out of the generalist's training) in several channel/diameter settings:

- ``fluo``: fluorescence, grayscale, 520 x 696 (12 tiles);
- ``bf``: brightfield, grayscale, 1024 x 1024 cropped to 512 x 600 (rows 0-511, cols 0-599);
- ``he``: H&E, RGB, 256 x 320; and ``he2``, a two-channel image made of its red and blue
  channels (Y, X, 2), for channels [0,0], [2,1] and [1,0].

Compared per case: flows (cellplug's unit flows x 5 against Cellpose's ``dP``), cell
probability and style (max abs difference, must be <= 1e-3), and masks (AP@0.5, must be
>= 0.98):

- ``AP e2e``: cellplug's masks against Cellpose's masks (everything differs: network run,
  resampling, mask reconstruction);
- ``AP net``: Cellpose's own mask step run on cellplug's flows and cell probability, against
  Cellpose's masks: isolates the backbone and inference (this module's subject);
- ``AP rec``: cellplug's reconstructor on Cellpose's flows, against Cellpose's masks:
  isolates the mask reconstruction (the flows plugin), for diagnosis only.

Random weights make near-constant outputs. The last 1x1 convolution is therefore centred
and scaled on the ``fluo`` image (flows about 0.5 px per step, cell probability spread
around 0, ~30 % of pixels above 0), which turns the random features into flow fields with
sinks, i.e. many small masks. Those random fields rarely pass Cellpose's flow-consistency
check, so masks are compared with ``flow_threshold=0`` (check off). One extra row uses the
default 0.4 for information only: the few masks that survive all have flow errors near the
threshold, so differences of 1e-4 decide them either way. Object counts are reported.

A case passes when the outputs match (<= 1e-3), ``AP net`` >= 0.98 and ``AP e2e`` >= 0.98.
When only ``AP e2e`` falls short, and by no more than the backbone's own shortfall
(``AP net``, within spec) plus the reconstructor's (``AP rec``) plus 0.005, the case is
reported as ``rec``: the extra disagreement comes from the mask reconstruction, not from the
backbone; ``--strict`` counts those as failures.

Cellpose on CPU converts the network to MKL-DNN (``mkldnn=True``, its default here); both
sides run in float32 with one torch thread. The first case is repeated against Cellpose with
``mkldnn=False`` to show the MKL-DNN path is not what limits agreement.

Run: ``python benchmarks/parity_backbone.py`` (in an environment with cellplug and Cellpose
3.1.1.2, e.g. ``nox -s parity``). Data: ``$CELLPLUG_DATA`` or ``../shared/data`` beside
the repository (skips cleanly when absent). Writes benchmarks/results/parity_backbone.json;
exits 1 if any case fails.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MAX_DIFF = 1e-3
MIN_AP = 0.98
DIAM_MEAN, DIAM_LABELS = 17.0, 23.0

IMAGES = {
    "fluo": ("4d2cff9a0c8df3a7ef6100fda6f66e865a7670af6a18564767d8019b9ed2fd7b", None),
    "bf": (
        "1b44d22643830cd4f23c9deadb0bd499fb392fb2cd9526d81547d93077d983df",
        (slice(0, 512), slice(0, 600)),
    ),
    "he": ("0d3640c1f1b80f24e94cc9a5f3e1d9e8db7bf6af7d4aba920265f46cadc25e37", None),
}

# (image, channels, diameter (None: Cellpose's default / cellplug's 0), flow_threshold)
CASES = [
    ("fluo", (0, 0), None, 0.0),
    ("fluo", (0, 0), 25.0, 0.0),
    ("bf", (0, 0), None, 0.0),
    ("bf", (0, 0), 12.0, 0.0),
    ("he", (0, 0), None, 0.0),
    ("he", (2, 3), 20.0, 0.0),
    ("he", (1, 0), None, 0.0),
    ("he2", (0, 0), None, 0.0),
    ("he2", (2, 1), 20.0, 0.0),
    ("he2", (2, 1), None, 0.0),
    ("he2", (1, 0), 30.0, 0.0),
]


def data_dir() -> Path:
    """The folder holding ``dsb2018/``: ``$CELLPLUG_DATA`` or ``<repo>/../shared/data``."""
    env = os.environ.get("CELLPLUG_DATA")
    return Path(env) if env else (ROOT.parent / "shared" / "data")


def load_images(folder: Path) -> dict[str, np.ndarray]:
    import tifffile

    out = {}
    for key, (stem, crop) in IMAGES.items():
        img = tifffile.imread(folder / "dsb2018" / f"{stem}.tif")
        out[key] = img[crop] if crop else img
    out["he2"] = np.ascontiguousarray(out["he"][:, :, [0, 2]])
    return out


def randomise(net, seed: int) -> None:
    """Random batch-norm running statistics and affine parameters (they matter at eval)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)


def calibrate_output(
    net, image: np.ndarray, flow_std: float = 2.5, prob_std: float = 3.0, inside: float = 0.3
) -> None:
    """Centre and scale the last 1x1 convolution so that ``image`` gives usable outputs:
    raw flows with standard deviation ``flow_std`` (= 5x unit flow), cell probability with
    ``prob_std`` and a fraction ``inside`` of pixels above 0."""
    import torch

    from cellplug.inference import run_network
    from cellplug.transforms import prepare_image

    raw = run_network(net, prepare_image(image), tile=False, precision="fp32").raw
    flat = raw.reshape(raw.shape[0], -1).astype(np.float64)
    mean, std = flat.mean(axis=1), flat.std(axis=1)
    scale = np.array([flow_std, flow_std, prob_std]) / std
    shift = -np.quantile((flat[2] - mean[2]) * scale[2], 1 - inside)
    conv = net.output[2]
    with torch.no_grad():
        conv.weight.mul_(torch.tensor(scale, dtype=torch.float32)[:, None, None, None])
        bias = (conv.bias.double().numpy() - mean) * scale + np.array([0.0, 0.0, shift])
        conv.bias.copy_(torch.tensor(bias, dtype=torch.float32))


def make_weights(path: Path, calibration_image: np.ndarray, seed: int = 0) -> Path:
    """A random Cellpose-layout network saved as a bare Cellpose state dict at ``path``."""
    import torch

    from cellplug.plugins import get_registry

    torch.manual_seed(seed)
    net = get_registry().get("backbone", "cellpose-unet")(
        n_channels=2, n_outputs=3, diam_mean=DIAM_MEAN
    )
    randomise(net, seed)
    net.diam_labels.data.fill_(DIAM_LABELS)
    net.eval()
    calibrate_output(net, calibration_image)
    torch.save(net.state_dict(), path)
    return path


def ap50(true: np.ndarray, pred: np.ndarray) -> float:
    from cellplug.metrics import average_precision

    return float(average_precision(true, pred, [0.5])[0])


def run_case(cp_model, segmenter, image, channels, diameter, flow_threshold) -> dict:
    from cellpose import dynamics

    from cellplug.segmenter import SegmentOptions

    t0 = time.perf_counter()
    cp_masks, cp_flows, cp_style = cp_model.eval(
        image,
        channels=list(channels),
        diameter=diameter,
        flow_threshold=flow_threshold,
    )[:3]
    t_cp = time.perf_counter() - t0
    cp_dP, cp_prob = cp_flows[1], cp_flows[2]
    opts = SegmentOptions(
        diameter=diameter or 0.0,
        channels=channels,
        tile=True,
        precision="fp32",
        flow_threshold=flow_threshold,
    )
    t0 = time.perf_counter()
    ours = segmenter.segment(image, opts)
    t_ours = time.perf_counter() - t0
    rescale = DIAM_MEAN / (diameter or DIAM_LABELS)
    niter = int(1.0 / rescale * 200.0)
    # Cellpose's mask step on cellplug's network outputs: isolates the backbone
    net_masks = dynamics.resize_and_compute_masks(
        (5.0 * ours.flows).astype(np.float32),
        ours.cellprob,
        niter=niter,
        flow_threshold=flow_threshold,
        cellprob_threshold=0.0,
        min_size=15,
    )
    # cellplug's reconstructor on Cellpose's network outputs: isolates the reconstructor
    rec_masks = segmenter.reconstruct((cp_dP / 5.0).astype(np.float32), cp_prob, niter, opts)
    return {
        "flow_max_abs": float(np.abs(5.0 * ours.flows - cp_dP).max()),
        "cellprob_max_abs": float(np.abs(ours.cellprob - cp_prob).max()),
        "style_max_abs": float(np.abs(ours.style - cp_style).max()),
        "flow_scale": float(np.abs(cp_dP).max()),
        "ap_e2e": ap50(cp_masks, ours.labels),
        "ap_net": ap50(cp_masks, net_masks),
        "ap_rec": ap50(cp_masks, rec_masks),
        "n_cellpose": int(cp_masks.max()),
        "n_cellplug": int(ours.labels.max()),
        "n_tiles": ours.n_tiles,
        "diameter_used": ours.diameter,
        "niter": niter,
        "seconds_cellpose": round(t_cp, 2),
        "seconds_cellplug": round(t_ours, 2),
    }


def _status(r: dict, strict: bool) -> str:
    outputs_ok = max(r["flow_max_abs"], r["cellprob_max_abs"], r["style_max_abs"]) <= MAX_DIFF
    if not outputs_ok or r["ap_net"] < MIN_AP:
        return "FAIL"
    if r["ap_e2e"] >= MIN_AP:
        return "ok"
    # disagreements add up: the end-to-end shortfall may be the sum of the backbone's
    # (AP net) and the reconstructor's (AP rec) own shortfalls, not more
    if not strict and 1.0 - r["ap_e2e"] <= (1.0 - r["ap_net"]) + (1.0 - r["ap_rec"]) + 0.005:
        return "rec"
    return "FAIL"


def main() -> int:
    strict = "--strict" in sys.argv[1:]
    folder = data_dir()
    if not (folder / "dsb2018").is_dir():
        print(f"parity_backbone: skipped, no dsb2018 data under {folder}")
        return 0
    try:
        import cellpose
        from cellpose import models as cp_models
    except ImportError:
        print("parity_backbone: skipped, Cellpose 3.1.1.2 is not installed")
        return 0
    import torch

    from cellplug.segmenter import Segmenter

    torch.set_num_threads(1)
    images = load_images(folder)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = make_weights(Path(tmp) / "parity_random", images["fluo"])
        cp_model = cp_models.CellposeModel(pretrained_model=str(weights))
        assert abs(cp_model.diam_labels - DIAM_LABELS) < 1e-6, "diam_labels not loaded"
        segmenter = Segmenter.from_model(str(weights))
        for key, channels, diameter, ft in CASES:
            res = run_case(cp_model, segmenter, images[key], channels, diameter, ft)
            res.update(
                image=key,
                shape=list(images[key].shape),
                channels=list(channels),
                diameter=diameter,
                flow_threshold=ft,
            )
            res["status"] = _status(res, strict)
            rows.append(res)
            _print_row(res, header=len(rows) == 1)
        # information only: the default flow threshold on random fields (see the docstring)
        info = run_case(cp_model, segmenter, images["fluo"], (0, 0), 25.0, 0.4)
        info.update(
            image="fluo",
            shape=list(images["fluo"].shape),
            channels=[0, 0],
            diameter=25.0,
            flow_threshold=0.4,
            status="info",
        )
        _print_row(info, header=False)
        # the MKL-DNN path: the first case against Cellpose without it
        plain = cp_models.CellposeModel(pretrained_model=str(weights), mkldnn=False)
        key, channels, diameter, ft = CASES[0]
        no_mkldnn = run_case(plain, segmenter, images[key], channels, diameter, ft)
    ok = all(r["status"] != "FAIL" for r in rows)
    doc = {
        "benchmark": "parity_backbone",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {
            "cpu": _cpu_model(),
            "logical_cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "versions": {
            "cellpose": cellpose.version,
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
        "cellpose_mkldnn": bool(cp_model.mkldnn),
        "weights": {
            "kind": "random, batch-norm statistics randomised, output calibrated",
            "seed": 0,
            "diam_mean": DIAM_MEAN,
            "diam_labels": DIAM_LABELS,
        },
        "images": {k: v[0] for k, v in IMAGES.items()},
        "criteria": {"max_abs_diff": MAX_DIFF, "min_ap50": MIN_AP},
        "cases": rows,
        "info_default_flow_threshold": info,
        "first_case_cellpose_without_mkldnn": {
            k: no_mkldnn[k]
            for k in ("flow_max_abs", "cellprob_max_abs", "style_max_abs", "ap_e2e", "ap_net")
        },
        "strict": strict,
        "pass": ok,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "parity_backbone.json").write_text(json.dumps(doc, indent=2) + "\n")
    worst = {
        k: max(r[k] for r in rows) for k in ("flow_max_abs", "cellprob_max_abs", "style_max_abs")
    }
    print(
        f"\nworst max abs diffs: {worst}; min AP e2e {min(r['ap_e2e'] for r in rows):.4f}, "
        f"min AP net {min(r['ap_net'] for r in rows):.4f}"
    )
    print(
        "first case against Cellpose with mkldnn=False: "
        f"flow {no_mkldnn['flow_max_abs']:.2e}, cellprob {no_mkldnn['cellprob_max_abs']:.2e}"
    )
    print(f"parity_backbone: {'PASS' if ok else 'FAIL'} -> {RESULTS / 'parity_backbone.json'}")
    return 0 if ok else 1


def _print_row(r: dict, header: bool) -> None:
    if header:
        print(
            f"{'image':<5} {'channels':<8} {'diam':>5} {'ft':>4} {'tiles':>5} {'flow':>9} "
            f"{'cellprob':>9} {'style':>9} {'AP e2e':>7} {'AP net':>7} {'AP rec':>7} "
            f"{'n cp/ours':>10} {'s cp/ours':>11}  status"
        )
    d = "none" if r["diameter"] is None else f"{r['diameter']:.0f}"
    print(
        f"{r['image']:<5} {str(tuple(r['channels'])):<8} {d:>5} {r['flow_threshold']:>4} "
        f"{r['n_tiles']:>5} {r['flow_max_abs']:>9.2e} {r['cellprob_max_abs']:>9.2e} "
        f"{r['style_max_abs']:>9.2e} {r['ap_e2e']:>7.4f} {r['ap_net']:>7.4f} "
        f"{r['ap_rec']:>7.4f} {r['n_cellpose']:>4}/{r['n_cellplug']:<5} "
        f"{r['seconds_cellpose']:>5.1f}/{r['seconds_cellplug']:<5.1f} "
        f"{r['status']}",
        flush=True,
    )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
