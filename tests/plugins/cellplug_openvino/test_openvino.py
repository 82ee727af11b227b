"""The cellplug-openvino plugin (plugins/openvino, installed by `nox -s tests`): listed through
its entry point, passes the contract kit, gives the torch path's labels on tests/data images,
rebuilds a stale cache entry, and trains only through its torch base (issue 24)."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

pytest.importorskip("openvino", reason="cellplug-openvino needs openvino (nox -s tests has it)")
runtime = pytest.importorskip("cellplug_openvino.runtime")
engine_module = pytest.importorskip("cellplug_openvino.engine")

from cellplug.cli import main  # noqa: E402
from cellplug.plugins import set_registry  # noqa: E402
from cellplug.testing import BackboneContract, Subject  # noqa: E402

SMALL = {"nbase": [8, 16, 32, 64]}  # a small cellpose-unet: a fast export


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("openvino-cache")


class TestOpenVINOContract(BackboneContract):
    backbone = "openvino"
    options = {**SMALL, "cache_dir": None}

    @pytest.fixture(autouse=True)
    def _cache(self, cache, monkeypatch):
        monkeypatch.setenv("CELLPLUG_CACHE", str(cache))


def test_listed_through_its_entry_point_with_the_models_it_runs():
    set_registry(None)
    rows = json.loads(CliRunner().invoke(main, ["plugins", "list", "--kind", "backbone",
                                                "--json"]).stdout)
    row = next(r for r in rows if r["name"] == "openvino")
    assert (row["plugin"], row["distribution"], row["status"]) == (
        "openvino", "cellplug-openvino", "ok")
    assert "generalist" in row["models"]


@pytest.fixture(scope="module")
def segmenters(cache):
    from cellplug.segmenter import Segmenter

    set_registry(None)
    torch_seg = Segmenter.from_model("generalist")
    ov_seg = Segmenter.from_model("generalist", backbone="openvino",
                                  backbone_options={"cache_dir": str(cache)})
    return torch_seg, ov_seg


@pytest.mark.parametrize("stem", ["dsb2018_fluo", "dsb2018_he", "dsb2018_bf", "usiigaci_phc"])
def test_labels_equal_the_torch_path(segmenters, data_dir, stem):
    from cellplug.io import read_image
    from cellplug.metrics import average_precision

    image = read_image(data_dir / f"{stem}.tif")
    torch_seg, ov_seg = segmenters
    ref = torch_seg.segment(image, diameter=0, precision="fp32")
    if stem == "dsb2018_fluo":  # the size model's passes too (once: they cost 2 passes)
        got = ov_seg.segment(image, diameter=0, precision="fp32")
        assert got.diameter == pytest.approx(ref.diameter, rel=1e-3)
    else:
        got = ov_seg.segment(image, diameter=ref.diameter, precision="fp32")
    assert float(average_precision(ref.labels, got.labels, [0.5])[0]) >= 0.98
    # float32 on both sides: the same labels, up to a few boundary pixels
    assert (ref.labels == got.labels).mean() >= 0.999
    assert ov_seg.model.backbone == "openvino"
    assert ov_seg.plugin_names["backbone_options"]["base"] == "cellpose-unet"


def _small_net(cache, base="example-tiny"):
    # the cache's logic does not depend on the network: the example plugin's two-layer net
    # exports in a fraction of a second
    options = SMALL if base == "cellpose-unet" else {}
    return Subject("backbone", "openvino", {**options, "base": base, "cache_dir": str(cache)})


def test_stale_cache_entry_is_detected_and_rebuilt(tmp_path):
    import torch

    from cellplug.testing import build_backbone

    subject = _small_net(tmp_path)
    net = build_backbone(subject)
    x = torch.zeros(1, 2, 32, 32)
    with torch.inference_mode():
        want = net(x)[0].clone()
    entry = runtime.runner_of(net).entry_dir()
    assert runtime.runner_of(net).stats["cache"] == "miss" and (entry / "model.bin").is_file()

    again = build_backbone(subject)  # same weights: the entry is used as it is
    with torch.inference_mode():
        again(x)
    assert runtime.runner_of(again).stats["cache"] == "hit"

    # the files no longer match what entry.json recorded (a half-written or edited entry)
    with open(entry / "model.bin", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\xff\xff\xff\xff")
    third = build_backbone(subject)
    with pytest.warns(runtime.StaleCacheWarning, match="does not match its recorded sha256"):
        with torch.inference_mode():
            got = third(x)[0]
    assert runtime.runner_of(third).stats["cache"] == "stale"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    # entry.json from other weights under this key
    meta = json.loads((entry / "entry.json").read_text())
    (entry / "entry.json").write_text(json.dumps({**meta, "weights_sha256": "0" * 64}))
    fourth = build_backbone(subject)
    with pytest.warns(runtime.StaleCacheWarning, match="weights_sha256"):
        with torch.inference_mode():
            fourth(x)


def test_changed_weights_get_a_new_entry(tmp_path):
    import torch

    from cellplug.testing import build_backbone

    net = build_backbone(_small_net(tmp_path))
    x = torch.ones(1, 2, 32, 32)
    with torch.inference_mode():
        before = net(x)[0].clone()
    key = runtime.runner_of(net).key
    with torch.no_grad():  # in place, as load_state_dict or an optimiser step does
        dict(net.named_parameters())["head.bias"].add_(0.5)
    with torch.inference_mode():
        after = net(x)[0]
    assert runtime.runner_of(net).key != key
    assert sorted(p.name for p in tmp_path.iterdir() if len(p.name) == 64) == sorted(
        [key, runtime.runner_of(net).key])
    net.__class__ = type(net).__mro__[2]  # the plain torch class: the reference
    with torch.inference_mode():
        torch.testing.assert_close(after, net(x)[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(before, after)


def test_training_falls_back_to_the_torch_base(tmp_path, data_dir):
    """train --backbone openvino trains cellpose-unet in torch and says so; the module's
    training-mode forward is torch's (gradients flow)."""
    import torch

    from cellplug.testing import build_backbone

    net = build_backbone(_small_net(tmp_path, "cellpose-unet")).train()
    raw, _ = net(torch.zeros(2, 2, 32, 32))
    assert raw.requires_grad and runtime.runner_of(net).key is None  # OpenVINO never ran

    src = tmp_path / "src"
    src.mkdir()
    for suffix in ("", "_masks"):
        shutil.copy(data_dir / f"dsb2018_fluo{suffix}.tif", src / f"dsb2018_fluo{suffix}.tif")
    set_registry(None)
    out = tmp_path / "m.pth"
    result = CliRunner().invoke(main, [
        "train", str(src), "--out", str(out), "--backbone", "openvino", "--backbone-option",
        "nbase=[8,16,32,64]", "--epochs", "1", "--patch", "48", "--size-epochs", "1",
        "--threads", "1", "--diam-mean", "17", "-q"])
    assert result.exit_code == 0, result.output
    assert "inference-only: training its torch backbone 'cellpose-unet'" in result.stderr
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["backbone"] == "cellpose-unet" and meta["backbone_options"]["nbase"] == [
        8, 16, 32, 64]
    bad = CliRunner().invoke(main, ["train", str(src), "--out", str(tmp_path / "x.pth"),
                                    "--backbone", "openvino", "--backbone-option",
                                    "precision=f32", "--epochs", "1"])
    assert bad.exit_code == 2 and "options of 'openvino' at run time" in bad.output


def test_precision_follows_bf16_autocast_and_bad_options_are_refused(tmp_path):
    import torch

    from cellplug.testing import build_backbone

    net = build_backbone(_small_net(tmp_path))
    x = torch.rand(1, 2, 32, 32)
    with torch.inference_mode():
        f32 = net(x)[0].clone()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # what --precision bf16 does
            assert runtime.runner_of(net).resolved_precision() == "bf16"
            bf16 = net(x)[0]
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    torch.testing.assert_close(bf16, f32, rtol=0.05, atol=0.05)
    with pytest.raises(ValueError, match="precision must be"):
        build_backbone(Subject("backbone", "openvino", {"base": "example-tiny",
                                                        "precision": "fp16"}))
    with pytest.raises(ValueError, match="runtime backbone"):
        build_backbone(Subject("backbone", "openvino", {"base": "openvino"}))


def test_int8_is_quantised_once_per_calibration_and_needs_images(tmp_path, data_dir):
    pytest.importorskip("nncf", reason="int8 needs cellplug-openvino[int8] (nncf)")
    import torch

    from cellplug.testing import build_backbone

    calib = tmp_path / "calib"
    calib.mkdir()
    shutil.copy(data_dir / "usiigaci_phc.tif", calib / "a.tif")  # 256 px: one 224 px tile set
    shutil.copy(data_dir / "usiigaci_phc_masks.tif", calib / "a_masks.tif")  # not an image
    options = {"base": "example-tiny", "cache_dir": str(tmp_path / "cache"),
               "precision": "int8", "calibration": str(calib)}
    assert [p.name for p in runtime.calibration_files(calib)] == ["a.tif"]
    net = build_backbone(Subject("backbone", "openvino", options))
    x = torch.rand(2, 2, 64, 64)
    with torch.inference_mode():
        got = net(x)[0]
    runner = runtime.runner_of(net)
    assert runner.stats["quantise_seconds"] > 0
    (int8_dir,) = runner.entry_dir().glob("int8-*")
    entry = json.loads((int8_dir / "entry.json").read_text())
    assert entry["calibration_tiles_used"] == 4 and entry["files"][0][0] == "a.tif"
    net.__class__ = type(net).__mro__[2]  # the plain torch class: the float32 reference
    with torch.inference_mode():
        want = net(x)[0]
    assert torch.isfinite(got).all() and not torch.equal(got, want)  # quantised, not f32
    assert (got - want).abs().mean() < 0.05 * want.abs().mean() + 1e-3
    again = build_backbone(Subject("backbone", "openvino", options))
    with torch.inference_mode():
        again(x)
    assert "quantise_seconds" not in runtime.runner_of(again).stats  # from the cache
    with pytest.raises(ValueError, match="precision 'int8' needs calibration"):
        build_backbone(Subject("backbone", "openvino", {**options, "calibration": None}))
    with pytest.raises(ValueError, match="no images in it"):
        runtime.calibration_files(tmp_path / "cache")


def test_a_warm_cache_segments_without_torch(segmenters, cache, data_dir, tmp_path):
    """Once the generalist is exported (by the segmenters fixture), a new process runs
    `cellplug segment --backbone openvino` without importing torch, with the labels of the
    in-process OpenVINO path; a damaged entry sends it back through torch, which rebuilds."""
    import subprocess
    import sys

    from cellplug.io import read_image, read_labels

    image = data_dir / "dsb2018_he.tif"
    _, ov_seg = segmenters
    want = ov_seg.segment(read_image(image), diameter=0, precision="fp32").labels
    script = ("import sys; from cellplug.cli import main\n"
              "try:\n    main(sys.argv[1:], standalone_mode=False)\n"
              "finally:\n    print('TORCH', 'torch' in sys.modules)\n")

    def run(out):
        args = [sys.executable, "-c", script, "segment", str(image), "--out", str(out),
                "--backbone", "openvino", "--backbone-option", f"cache_dir={cache}",
                "--precision", "fp32", "-q"]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout, read_labels(out / "dsb2018_he_masks.tif")

    stdout, got = run(tmp_path / "warm")
    assert "TORCH False" in stdout
    # the same compiled model; only the thread count may differ (torch's default vs the
    # CPUs this process may use), which can move a boundary pixel
    assert (got == want).mean() >= 0.999

    # the generalist's entry: the largest export in this module's cache
    entry = max((p for p in cache.iterdir() if (p / "model.bin").is_file()),
                key=lambda p: (p / "model.bin").stat().st_size)
    with open(entry / "model.bin", "r+b") as fh:  # damaged: the fast path must not use it
        fh.seek(100)
        fh.write(b"\xff\xff\xff\xff")
    stdout, got = run(tmp_path / "damaged")
    assert "TORCH True" in stdout and (got == want).mean() >= 0.999
    stdout, got = run(tmp_path / "rebuilt")  # the torch run rebuilt the entry
    assert "TORCH False" in stdout and (got == want).mean() >= 0.999


def test_an_engine_shared_by_threads_gives_each_caller_its_own_output(tmp_path):
    """Segmenter threads (--workers, block-wise dask threads) share one engine: concurrent
    batches, run on the shared streams, must come back whole and to the right caller."""
    import threading

    import numpy as np
    import torch

    from cellplug.testing import build_backbone

    net = build_backbone(_small_net(tmp_path))
    with torch.inference_mode():
        net(torch.zeros(1, 2, 32, 32))  # exports
    engine = runtime.runner_of(net)._engine
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(5, 2, 48, 48)).astype(np.float32) for _ in range(6)]
    want = [engine.run(b, "f32", 2)[0] for b in batches]
    got: dict[int, np.ndarray] = {}

    def call(i):
        for _ in range(3):
            got[i] = engine.run(batches[i], "f32", 2)[0]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, w in enumerate(want):
        np.testing.assert_array_equal(got[i], w)


def test_a_request_that_never_reports_fails_the_batch(tmp_path, monkeypatch):
    """A batch runs one image per asynchronous request; if one request's result never
    arrives the batch must fail, not come back shorter (its tiles would be blended into the
    wrong places)."""
    import numpy as np
    import torch

    from cellplug.testing import build_backbone

    net = build_backbone(_small_net(tmp_path))
    with torch.inference_mode():
        net(torch.zeros(1, 2, 32, 32))  # exports
    engine = runtime.runner_of(net)._engine
    real = engine_module.ov().AsyncInferQueue

    class LosesOne:
        def __init__(self, compiled, n):
            self.queue = real(compiled, n)

        def set_callback(self, callback):
            self.queue.set_callback(lambda request, i: None if i == 2 else callback(request, i))

        def start_async(self, inputs, userdata):
            self.queue.start_async(inputs, userdata=userdata)

        def wait_all(self):
            self.queue.wait_all()

    monkeypatch.setattr(engine_module.ov(), "AsyncInferQueue", LosesOne)
    x = np.random.default_rng(0).normal(size=(4, 2, 32, 32)).astype(np.float32)
    with pytest.raises(RuntimeError, match=r"no output for image\(s\) \[2\] of a batch of 4"):
        engine.run(x, "f32", 2)


def test_export_and_quantisation_send_no_telemetry(tmp_path, data_dir):
    """OpenVINO's converter and NNCF send usage telemetry by default (a forked process
    posting to Google Analytics) and write a client id under ~/intel: a fresh process with
    its own home exports and quantises, and neither forks nor writes there; the telemetry
    package works again after the block."""
    pytest.importorskip("nncf", reason="int8 needs cellplug-openvino[int8] (nncf)")
    import os
    import subprocess
    import sys

    calib = tmp_path / "calib"
    calib.mkdir()
    shutil.copy(data_dir / "usiigaci_phc.tif", calib / "a.tif")
    home = tmp_path / "home"
    home.mkdir()
    script = (
        "import os, sys, torch\n"
        "forks = []\n"
        "os.register_at_fork(before=lambda: forks.append(1))\n"
        "from cellplug.testing import Subject, build_backbone\n"
        "options = {'base': 'example-tiny', 'cache_dir': sys.argv[1], 'precision': 'int8',\n"
        "           'calibration': sys.argv[2]}\n"
        "net = build_backbone(Subject('backbone', 'openvino', options))\n"
        "with torch.inference_mode():\n"
        "    net(torch.rand(1, 2, 64, 64))\n"
        "import openvino_telemetry, nncf\n"
        "print('FORKS', len(forks), 'RESTORED', hasattr(openvino_telemetry, 'Telemetry'))\n"
    )
    env = {k: v for k, v in os.environ.items()  # as on a user's machine: not a CI job
           if k not in ("CI", "TF_BUILD", "JENKINS_URL", "NNCF_CI", "NNCF_DEV")}
    env["HOME"] = str(home)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "cache"), str(calib)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "FORKS 0 RESTORED True" in proc.stdout
    assert list(home.iterdir()) == []  # no ~/intel/openvino_ga_cid, no stats file
    assert any((tmp_path / "cache").glob("*/int8-*/model.xml"))  # it did quantise
