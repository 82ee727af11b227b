"""Training: a short fine-tune on two small real images lowers the loss and saves a usable model."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import tifffile

from cellplug.annotations import Annotation
from cellplug.models import load_state_dict, resolve_model
from cellplug.plugins import get_registry
from cellplug.segmenter import Segmenter
from cellplug.train import (
    TrainConfig,
    fixed_batch_loss,
    lr_schedule,
    prepare_samples,
    random_patch,
    train,
)


@pytest.fixture(scope="module")
def samples(data_dir):
    decoder = get_registry().get("decoder", "cellpose-flows")
    anns = [
        Annotation(
            tifffile.imread(data_dir / f"{s}.tif"), tifffile.imread(data_dir / f"{s}_masks.tif"), s
        )
        for s in ("dsb2018_fluo", "dsb2018_he")
    ]
    return prepare_samples(anns, decoder, (0, 0), 2, group="test")


def test_fine_tune_lowers_loss_and_saves_a_model_that_segments(samples, random_model, tmp_path):
    registry = get_registry()
    decoder = registry.get("decoder", "cellpose-flows")
    base = resolve_model(str(random_model))
    config = TrainConfig(
        epochs=12,
        batch_size=2,
        patch=64,
        learning_rate=0.005,
        warmup_epochs=2,
        eval_every=0,
        size_epochs=1,
        size_patch=64,
        seed=3,
        threads=1,
    )
    from cellplug.models import build_network

    before = fixed_batch_loss(build_network(base), samples, decoder, config)
    result = train(
        samples, samples[:1], tmp_path / "tuned.pth", config, base_model=base, progress=False
    )
    tuned = resolve_model(str(result.model_path))
    after = fixed_batch_loss(build_network(tuned), samples, decoder, config)
    assert after < 0.9 * before, (before, after)

    # weights are a plain state dict, metadata is JSON with the training record
    state = load_state_dict(result.model_path)
    assert "output.2.weight" in state
    meta = json.loads(result.model_path.with_suffix(".json").read_text())
    assert meta["base_model"] == "random"
    assert meta["base_sha256"] == hashlib.sha256(base.weights.read_bytes()).hexdigest()
    assert "averaged_from" not in meta["training"]  # only for a base made by averaging
    assert meta["diam_mean"] == pytest.approx(17.0)
    # the recorded config is the effective one (the base's object size), not the option default
    assert config.diam_mean == 30.0
    assert meta["training"]["config"]["diam_mean"] == pytest.approx(17.0)
    assert len(meta["size_model"]["A"]) == 256 and len(meta["style_centroid"]) == 256
    assert len(meta["training"]["history"]) == 12

    seg = Segmenter.from_model(str(result.model_path))
    out = seg.segment(np.moveaxis(samples[0].x, 0, -1), diameter=0)
    assert out.labels.shape == samples[0].labels.shape and out.labels.dtype == np.uint32


def test_training_is_deterministic_with_a_seed(samples, tmp_path):
    config = TrainConfig(
        epochs=2,
        batch_size=2,
        patch=48,
        warmup_epochs=1,
        eval_every=0,
        size_epochs=1,
        size_patch=48,
        seed=7,
        threads=1,
        diam_mean=17.0,
    )
    a = train(samples, [], tmp_path / "a.pth", config, progress=False)
    b = train(samples, [], tmp_path / "b.pth", config, progress=False)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    sa, sb = load_state_dict(a.model_path), load_state_dict(b.model_path)
    assert all(np.array_equal(sa[k].numpy(), sb[k].numpy()) for k in sa)


def test_resume_continues_the_same_run(samples, tmp_path):
    config = TrainConfig(
        epochs=4,
        batch_size=2,
        patch=48,
        warmup_epochs=1,
        eval_every=0,
        checkpoint_every=2,
        size_epochs=1,
        size_patch=48,
        seed=5,
        threads=1,
    )
    full = train(samples, [], tmp_path / "full.pth", config, progress=False)
    ck = tmp_path / "ck"

    # interrupt the same run after its second epoch (its checkpoint is written), then resume
    class Stop(Exception):
        pass

    calls = []

    def log_and_stop(msg):
        if msg.startswith("{"):  # one JSON record per epoch (other lines: the time estimate)
            calls.append(msg)
        if len(calls) == 2:
            raise Stop

    with pytest.raises(Stop):
        train(
            samples,
            [],
            tmp_path / "x.pth",
            config,
            checkpoint_dir=ck,
            progress=False,
            log_fn=log_and_stop,
        )
    resumed = train(
        samples,
        [],
        tmp_path / "resumed.pth",
        config,
        checkpoint_dir=ck,
        resume=True,
        progress=False,
        log_fn=lambda m: None,
    )
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history])


def test_random_patch_rotates_flows_with_the_image(samples):
    """Warped flow targets agree with flows recomputed from the warped labels."""
    from cellplug_flows.heat import masks_to_flows

    decoder = get_registry().get("decoder", "cellpose-flows")
    s = samples[0]

    class WithLabels:
        vector_channels = decoder.vector_channels
        target_interpolation = (*decoder.target_interpolation, "nearest")

    s2 = type(s)(
        s.x,
        np.concatenate([s.targets, s.labels[None].astype(np.float32)]),
        s.labels,
        s.diameter,
        s.stem,
        s.source,
    )
    rng = np.random.default_rng(0)
    cos = []
    for _ in range(6):
        _, t, _ = random_patch(s2, rng, 128, 17.0, 0.5, WithLabels)
        lab = t[3].astype(np.int32)
        border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
        inside = (lab > 0) & ~np.isin(lab, border)  # objects cut by the crop have other centres
        flows = masks_to_flows(lab)
        cos.append((flows[0] * t[1] + flows[1] * t[2])[inside])
    cos = np.concatenate(cos)
    assert cos.size > 500
    assert cos.mean() > 0.8  # a wrong rotation sign gives ~0 on average


def test_lr_schedule_warms_up_and_decays():
    s = lr_schedule(100, 0.01, 10, 0.2)
    assert s[0] == pytest.approx(0.001) and s[4] == pytest.approx(0.005)
    assert s[9] == pytest.approx(0.01) and s[50] == pytest.approx(0.01)
    assert lr_schedule(1, 0.01, 10, 0.2).tolist() == [pytest.approx(0.01)]  # never all zero
    assert s[-1] == pytest.approx(0.01 / 2**10) and np.all(np.diff(s[80:]) <= 0)
