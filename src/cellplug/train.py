"""Training a backbone on (image, labels) pairs: the Cellpose recipe, on CPU or GPU.

Defaults follow Cellpose 3: targets from the flow decoder, random rotation, flip, scale
(objects rescaled to ``diam_mean``, then +-50 %) and crop to square patches, loss from the
decoder (flow MSE x 5 + BCE), AdamW with a linear warm-up and step decay at the end. After
segmentation training a size model (style -> diameter) is fitted, and the style centroid of
the training images is recorded for style-based model selection.

Everything random derives from ``seed`` and the epoch number, so a run resumed from a
checkpoint continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from . import io, metrics, transforms
from .annotations import Annotation
from .errors import CellplugError
from .models import ModelInfo, SizeModel, build_network, save_model
from .plugins import PluginRegistry, get_registry
from .segmenter import Segmenter, SegmentOptions, median_diameter

log = logging.getLogger("cellplug.train")


@dataclass
class TrainConfig:
    """Training settings (all serialised into the model's metadata)."""

    epochs: int = 100
    batch_size: int = 8
    patch: int = 224
    learning_rate: float = 0.005
    weight_decay: float = 1e-5
    warmup_epochs: int = 10
    optimizer: str = "adamw"  # or "sgd" (with momentum): Cellpose 2.0's human-in-the-loop recipe
    momentum: float = 0.9
    decay_fraction: float = 0.2  # the last 20 % of epochs halve the LR ten times
    scale_range: float = 0.5
    diam_mean: float = 30.0
    min_train_masks: int = 5
    images_per_epoch: int | None = None  # default: number of training images
    sampling: str = "uniform"  # or "sqrt": each source weighted by sqrt(its size)
    # share of every batch drawn from the replay samples (Sample.replay: images of the types
    # the base model already segments, rehearsed so that a fine-tune does not forget them)
    replay_fraction: float = 0.0
    seed: int = 0
    eval_every: int = 10
    eval_images: int | None = None  # validation images scored per evaluation (None: all)
    checkpoint_every: int = 5
    bf16: bool = False  # bfloat16 autocast (fast on CPUs with AVX512-BF16 / AMX)
    threads: int | None = None
    device: str = "auto"  # "auto": a CUDA GPU when torch sees one, else the CPU
    channels: tuple[int, int] = (0, 0)
    backbone: str = "cellpose-unet"
    # factory options of a new network (train --backbone-option); recorded in the metadata
    backbone_options: dict[str, Any] = field(default_factory=dict)
    decoder: str = "cellpose-flows"
    size_epochs: int = 4
    # "fit": fit a size model on the training images; "keep": the base model's (fine-tuning);
    # "auto": keep the base's when fine-tuning on fewer than MIN_SIZE_FIT_IMAGES images, where a
    # 256-dimensional regression on a handful of styles would be worse than the base's
    size_model: str = "auto"
    size_patch: int = 224


@dataclass
class Sample:
    """A training image prepared once: normalised input, targets, diameter."""

    x: np.ndarray  # float32 (C, Y, X)
    targets: np.ndarray  # float32 (T, Y, X)
    labels: np.ndarray  # (Y, X) int32
    diameter: float
    stem: str
    source: str
    group: str = ""
    replay: bool = False  # rehearsal of what the base already knows, not the new data


def prepare_samples(
    annotations: Sequence[Annotation],
    decoder: Any,
    channels: Sequence[int],
    n_channels: int,
    group: str = "",
    min_masks: int = 0,
    progress: bool = False,
    replay: bool = False,
) -> list[Sample]:
    """Normalise images and compute targets and diameters (objects < ``min_masks`` skipped);
    ``replay`` marks them as rehearsal samples (see ``TrainConfig.replay_fraction``)."""
    from tqdm import tqdm

    out = []
    for ann in tqdm(
        annotations, desc=f"preparing {group or 'images'}", disable=not progress, leave=False
    ):
        labels = np.asarray(ann.labels).astype(np.int32)
        n_obj = np.unique(labels[labels > 0]).size
        if n_obj < min_masks:
            continue
        x = transforms.prepare_image(ann.image, channels, n_channels)
        out.append(
            Sample(
                x,
                decoder.targets(labels),
                labels,
                max(5.0, median_diameter(labels)),
                ann.stem,
                ann.source,
                group,
                replay,
            )
        )
    return out


def random_patch(
    sample: Sample,
    rng: np.random.Generator,
    patch: int,
    diam_mean: float,
    scale_range: float,
    decoder: Any,
    rescale: bool = True,
    with_targets: bool = True,
) -> tuple[np.ndarray, np.ndarray | None, float]:
    """One augmented patch: flip, rotate, scale objects to ``diam_mean`` (x random factor), crop.

    Returns ``(x (C, patch, patch), targets (T, patch, patch) or None, scale)``.
    """
    c, ly, lx = sample.x.shape
    flip = rng.random() > 0.5
    theta = rng.random() * 2 * np.pi
    scale = (1 - scale_range / 2) + scale_range * rng.random()
    if rescale:
        scale *= diam_mean / sample.diameter
    shift = (rng.random(2) - 0.5) * np.maximum(
        0, np.array([ly * scale - patch, lx * scale - patch])
    )
    x, t = sample.x, sample.targets
    vec = getattr(decoder, "vector_channels", ())
    if flip:
        x = x[:, :, ::-1]
        t = t[:, :, ::-1].copy()
        if vec:
            t[vec[1]] *= -1
    # output pixel o maps to input pixel  R(-theta) (o - oc) / scale + ic   (y, x order)
    cos, sin = math.cos(theta), math.sin(theta)
    matrix = np.array([[cos, -sin], [sin, cos]]) / scale
    in_c = np.array([ly / 2, lx / 2])
    out_c = np.array([patch / 2, patch / 2]) + shift
    offset = in_c - matrix @ out_c
    interp = getattr(decoder, "target_interpolation", ("linear",) * t.shape[0])
    xo = np.empty((c, patch, patch), np.float32)
    to = np.empty((t.shape[0], patch, patch), np.float32)
    for k in range(c):
        ndimage.affine_transform(
            x[k], matrix, offset, (patch, patch), output=xo[k], order=1, mode="constant"
        )
    if not with_targets:
        return xo, None, scale
    for k in range(t.shape[0]):
        ndimage.affine_transform(
            t[k],
            matrix,
            offset,
            (patch, patch),
            output=to[k],
            order=0 if interp[k] == "nearest" else 1,
            mode="constant",
        )
    if vec:
        vy, vx = to[vec[0]].copy(), to[vec[1]].copy()
        # rotate vectors with the image: (y, x) -> (sin * x + cos * y, cos * x - sin * y)
        to[vec[0]] = sin * vx + cos * vy
        to[vec[1]] = cos * vx - sin * vy
    return xo, to, scale


def lr_schedule(epochs: int, lr: float, warmup: int, decay_fraction: float) -> np.ndarray:
    """Per-epoch learning rate: linear warm-up, constant, then 10 halvings.

    The warm-up over ``w = min(warmup, epochs)`` epochs gives epoch ``e`` the rate
    ``lr * (e + 1) / w``. (Cellpose's starts at 0, so its first epoch, and the only epoch of
    a one-epoch run, trained nothing; cellplug's did too before 2026-12-01.)
    """
    sched = np.full(epochs, lr, dtype=np.float64)
    w = min(warmup, epochs)
    sched[:w] = lr * np.arange(1, w + 1) / max(w, 1)
    n_decay = int(round(epochs * decay_fraction))
    if n_decay >= 10:
        start = epochs - n_decay
        step = n_decay / 10
        for e in range(start, epochs):
            sched[e] = lr / 2 ** (1 + int((e - start) / step))
    return sched


def sampling_probabilities(samples: Sequence[Sample], mode: str) -> np.ndarray | None:
    if mode == "uniform":
        return None
    if mode != "sqrt":
        raise CellplugError(f"unknown sampling {mode!r}; use 'uniform' or 'sqrt'")
    groups: dict[str, int] = {}
    for s in samples:
        groups[s.group] = groups.get(s.group, 0) + 1
    total = sum(math.sqrt(n) for n in groups.values())
    p = np.array([math.sqrt(groups[s.group]) / total / groups[s.group] for s in samples])
    return p / p.sum()


def epoch_order(
    rng: np.random.Generator,
    samples: Sequence[Sample],
    n: int,
    probs: np.ndarray | None,
    replay_fraction: float = 0.0,
) -> np.ndarray:
    """Indices of the ``n`` samples of one epoch.

    With replay samples and ``replay_fraction`` > 0, exactly ``round(n * fraction)`` of
    them are replay samples (drawn uniformly), the rest new ones, shuffled together: a
    fixed share per epoch, not a binomial one, so that no epoch is all old or all new.
    """
    replay = np.array([s.replay for s in samples], bool)
    if replay_fraction > 0 and replay.any() and (~replay).any():
        n_old = int(round(n * replay_fraction))
        old, new = np.flatnonzero(replay), np.flatnonzero(~replay)
        order = np.concatenate([rng.choice(new, size=n - n_old, replace=True),
                                rng.choice(old, size=n_old, replace=True)])
        return rng.permutation(order)
    if probs is not None:
        return rng.choice(len(samples), size=n, replace=True, p=probs)
    if n > len(samples):  # a few images, full batches: draw repeatedly
        return rng.choice(len(samples), size=n, replace=True)
    return rng.permutation(len(samples))[:n]


def data_fingerprint(samples: Sequence[Sample]) -> str:
    h = hashlib.sha256()
    for s in sorted(samples, key=lambda s: (s.group, s.stem)):
        h.update(f"{s.group}/{s.stem}".encode())
        h.update(hashlib.sha256(s.labels.tobytes()).digest())
    return h.hexdigest()[:16]


@dataclass
class TrainResult:
    model_path: Path
    history: list[dict[str, Any]] = field(default_factory=list)


def _set_lr(opt: Any, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def evaluate(
    segmenter: Segmenter,
    samples: Sequence[Sample],
    true_diameter: bool = True,
    opts: SegmentOptions | None = None,
) -> dict[str, Any]:
    """AP at IoU 0.5..0.95 (summed counts and mean per-image AP@0.5) on prepared samples.

    Images are given as already normalised input; ``true_diameter`` uses each image's
    label diameter, otherwise the size model estimates it.
    """
    opts = opts or SegmentOptions()
    total = None
    per_image = []
    for s in samples:
        d = s.diameter if true_diameter else 0.0
        img = np.moveaxis(s.x, 0, -1)  # already normalised: normalising again is a no-op
        seg = segmenter.segment(
            img, opts, diameter=d, channels=(1, 2) if img.shape[2] > 1 else (0, 0)
        )
        mc = metrics.match_counts(s.labels, seg.labels)
        total = mc if total is None else total + mc
        per_image.append(float(mc.ap[0]))
    if total is None:
        return {}
    return {
        "ap50_mean": float(np.mean(per_image)),
        "ap": total.ap.round(4).tolist(),
        "ap50_pooled": float(total.ap[0]),
    }


def train(
    train_samples: Sequence[Sample],
    val_samples: Sequence[Sample],
    out_path: Path,
    config: TrainConfig,
    base_model: ModelInfo | None = None,
    registry: PluginRegistry | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    data_description: dict[str, Any] | None = None,
    log_fn: Callable[[str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train and save a model to ``out_path`` (``.pth`` + ``.json``).

    ``base_model`` starts from its weights (fine-tuning); otherwise from random weights.
    With ``checkpoint_dir``, a checkpoint is written every ``checkpoint_every`` epochs and
    ``resume`` continues from the latest one. ``should_stop`` is asked before every batch
    (a GUI's cancel button); when it says yes, :class:`TrainingCancelled` is raised and no
    model is saved.
    """
    import torch
    from tqdm import tqdm

    say = log_fn or (lambda m: log.info(m))
    registry = registry or get_registry()
    if base_model is not None:
        # a fine-tune keeps the base's architecture and object size; record those, not the
        # options' defaults, so the saved training config says what was actually used
        config = replace(
            config,
            backbone=base_model.backbone,
            decoder=base_model.decoder,
            diam_mean=base_model.diam_mean,
        )
    decoder = registry.get("decoder", config.decoder)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    if base_model is not None:
        net = build_network(base_model, registry)
    else:
        factory = registry.get("backbone", config.backbone)
        net = factory(n_channels=2, n_outputs=decoder.n_outputs, diam_mean=config.diam_mean,
                      **config.backbone_options)
    diam_mean = config.diam_mean  # the base's when fine-tuning (see above)
    if not train_samples:
        raise CellplugError("no training images (with enough objects) to train on")
    # the new data, without the rehearsed old: what the size model and style centroid describe
    new_samples = [s for s in train_samples if not s.replay]
    if not new_samples:
        raise CellplugError("only replay images: nothing new to train on")
    keep_size = _keeps_base_size_model(config, base_model, len(new_samples))
    # the size model's first pass runs at diam_mean / diam_labels: a kept size model needs the
    # diam_labels it was fitted with, not the mean diameter of a few new images
    diam_labels = (base_model.diam_labels if keep_size and base_model is not None
                   else float(np.mean([s.diameter for s in new_samples])))
    with torch.no_grad():
        net.diam_mean.fill_(diam_mean)
        net.diam_labels.fill_(diam_labels)
    device = torch.device(
        "cuda" if config.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    )
    net = net.to(device, memory_format=torch.channels_last)
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=config.learning_rate,
                              momentum=config.momentum, weight_decay=config.weight_decay)
    elif config.optimizer == "adamw":
        opt = torch.optim.AdamW(
            net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
    else:
        raise CellplugError(f"unknown optimizer {config.optimizer!r}; use 'adamw' or 'sgd'")
    sched = lr_schedule(
        config.epochs, config.learning_rate, config.warmup_epochs, config.decay_fraction
    )
    probs = sampling_probabilities(train_samples, config.sampling)
    n_per_epoch = config.images_per_epoch or len(train_samples)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    ckpt_path = checkpoint_dir / "checkpoint.pt" if checkpoint_dir else None
    if resume:
        if ckpt_path is None or not ckpt_path.exists():
            raise CellplugError(f"{ckpt_path}: no checkpoint to resume from")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        net.load_state_dict(
            {k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
        )
        if "optimizer" in ckpt:
            opt.load_state_dict(ckpt["optimizer"])
        start_epoch = int(ckpt["epoch"]) + 1
        history = (
            json.loads(ckpt_path.with_suffix(".json").read_text())["history"]
            if ckpt_path.with_suffix(".json").exists()
            else []
        )
        say(f"resumed from {ckpt_path} at epoch {start_epoch}")

    def make_segmenter() -> Segmenter:
        info = ModelInfo(
            "training",
            out_path,
            {
                "diam_mean": diam_mean,
                "diam_labels": diam_labels,
                "n_channels": 2,
                "decoder": config.decoder,
            },
        )
        recon = registry.get("reconstructor", "cellpose-dynamics")
        return Segmenter(info, net, decoder, recon)

    if start_epoch < config.epochs:
        step = estimate_step_seconds(net, train_samples, decoder, config, device)
        n_steps = (config.epochs - start_epoch) * math.ceil(n_per_epoch / config.batch_size)
        say(f"training: {config.epochs - start_epoch} epochs x "
            f"{math.ceil(n_per_epoch / config.batch_size)} steps of {config.batch_size} "
            f"patches, about {_minutes(n_steps * step)} here ({step:.2f} s per step)")
    t_start = time.time()
    for epoch in range(start_epoch, config.epochs):
        rng = np.random.default_rng([config.seed, epoch])
        torch.manual_seed(config.seed * 100003 + epoch)
        order = epoch_order(rng, train_samples, n_per_epoch, probs, config.replay_fraction)
        _set_lr(opt, float(sched[epoch]))
        net.train()
        losses = []
        bar = tqdm(
            range(0, len(order), config.batch_size),
            desc=f"epoch {epoch}",
            disable=not progress,
            leave=False,
        )
        for b in bar:
            if should_stop is not None and should_stop():
                raise TrainingCancelled("training cancelled; no model was saved")
            idx = order[b : b + config.batch_size]
            xs, ts = zip(
                *[
                    random_patch(
                        train_samples[i], rng, config.patch, diam_mean, config.scale_range, decoder
                    )[:2]
                    for i in idx
                ],
                strict=True,
            )
            x = torch.from_numpy(np.stack(xs)).to(device, memory_format=torch.channels_last)
            t = torch.from_numpy(np.stack(ts)).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
                raw, _ = net(x)
            loss = decoder.loss(raw.float(), t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.item()))
            bar.set_postfix(loss=f"{np.mean(losses):.3f}")
        record: dict[str, Any] = {
            "epoch": epoch,
            "lr": float(sched[epoch]),
            "loss": float(np.mean(losses)),
            "seconds": round(time.time() - t_start, 1),
        }
        last = epoch == config.epochs - 1
        if val_samples and config.eval_every and ((epoch + 1) % config.eval_every == 0 or last):
            net.eval().cpu()  # inference code takes numpy arrays on the CPU
            step = max(1, len(val_samples) // config.eval_images) if config.eval_images else 1
            subset = list(val_samples)[::step][: config.eval_images or None]
            record["val"] = evaluate(make_segmenter(), subset, true_diameter=True)
            net = net.to(device, memory_format=torch.channels_last)
        history.append(record)
        if ckpt_path is not None and ((epoch + 1) % config.checkpoint_every == 0 or last):
            ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save(
                {"model": net.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch}, tmp
            )
            tmp.replace(ckpt_path)
            ckpt_path.with_suffix(".json").write_text(
                json.dumps({"epoch": epoch, "history": history})
            )
            record["checkpoint"] = str(ckpt_path)
        say(json.dumps(record))

    net.eval().cpu()
    if keep_size and base_model is not None and base_model.size_model is not None:
        size_model = base_model.size_model
        size_note = f"kept from the base model ({len(new_samples)} training images)"
    else:
        size_model = fit_size_model(net, new_samples, diam_mean, config)
        size_note = f"fitted on {len(new_samples)} training images"
    centroid = style_centroid(net, new_samples)
    seg_time = time.time() - t_start
    meta: dict[str, Any] = {
        "name": out_path.stem,
        "backbone": config.backbone,
        "backbone_options": {"n_channels": 2, "n_outputs": decoder.n_outputs,
                             **(config.backbone_options if base_model is None else
                                base_model.metadata.get("backbone_options") or {})},
        "decoder": config.decoder,
        "reconstructor": "cellpose-dynamics",
        "channels": list(config.channels),
        "n_channels": 2,
        "diam_mean": diam_mean,
        "diam_labels": diam_labels,
        "size_model": size_model.to_dict(),
        "style_centroid": centroid.tolist(),
        "base_model": base_model.name if base_model else None,
        # which weights exactly: a name like "generalist" changes meaning between releases
        "base_sha256": io.file_sha256(base_model.weights) if base_model else None,
        "training": {
            "config": {
                k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()
            },
            "data": data_description or {},
            "n_train": len(train_samples),
            "n_replay": len(train_samples) - len(new_samples),
            "n_val": len(val_samples),
            "data_hash": data_fingerprint(train_samples),
            "seconds": round(seg_time, 1),
            "size_model": size_note,
            "history": history,
        },
        "metrics": history[-1].get("val", {}) if history else {},
    }
    # a base made by weight averaging (training/average_weights.py) names its inputs
    base_training = base_model.metadata.get("training", {}) if base_model else {}
    if "averaged_from" in base_training:
        meta["training"]["averaged_from"] = base_training["averaged_from"]
    path = save_model(out_path, net, meta, half=True)
    return TrainResult(path, history)


class TrainingCancelled(CellplugError):
    """Training was stopped by ``should_stop``; nothing was saved."""


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def estimate_step_seconds(
    net: Any, samples: Sequence[Sample], decoder: Any, config: TrainConfig, device: Any
) -> float:
    """Seconds of one training step, timed on one batch (forward and backward, no update).

    The gradients it leaves are cleared; weights, optimizer state and the random streams of
    training are not touched (its patches come from a generator of their own).
    """
    import torch

    rng = np.random.default_rng(987654321)
    idx = rng.integers(0, len(samples), min(config.batch_size, max(len(samples), 1)))
    dm = float(net.diam_mean.item())
    xs, ts = zip(*[random_patch(samples[i], rng, config.patch, dm, config.scale_range,
                                decoder)[:2] for i in idx], strict=True)
    x = torch.from_numpy(np.stack(xs)).to(device, memory_format=torch.channels_last)
    t = torch.from_numpy(np.stack(ts)).to(device)
    was_training = net.training
    net.train()
    state = {k: v.clone() for k, v in net.state_dict().items() if "running" in k or
             "num_batches" in k}  # batch-norm statistics move in a forward pass in train mode
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
        raw, _ = net(x)
    decoder.loss(raw.float(), t).backward()
    seconds = time.perf_counter() - t0
    net.zero_grad(set_to_none=True)
    with torch.no_grad():
        for k, v in state.items():
            net.state_dict()[k].copy_(v)
    net.train(was_training)
    return seconds


MIN_SIZE_FIT_IMAGES = 10


def _keeps_base_size_model(config: TrainConfig, base: ModelInfo | None, n_train: int) -> bool:
    """Whether training keeps the base model's size model (see ``TrainConfig.size_model``)."""
    mode = config.size_model
    if mode not in ("fit", "keep", "auto"):
        raise CellplugError(f"unknown size_model {mode!r}; use 'fit', 'keep' or 'auto'")
    has = base is not None and base.size_model is not None
    if mode == "keep" and not has:
        raise CellplugError("size_model 'keep' needs a base model with a size model")
    return has and (mode == "keep" or (mode == "auto" and n_train < MIN_SIZE_FIT_IMAGES))


def _styles_of_patches(
    net: Any,
    samples: Sequence[Sample],
    config: TrainConfig,
    diam_mean: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Styles of randomly scaled crops and their log-diameter targets (Cellpose's recipe)."""
    import torch

    styles, targets = [], []
    for epoch in range(config.size_epochs):
        rng = np.random.default_rng([config.seed, 7919, epoch])
        for i in rng.permutation(len(samples)):
            s = samples[i]
            x, _, scale = random_patch(
                s, rng, config.size_patch, diam_mean, 1.0, None, rescale=False, with_targets=False
            )
            with torch.inference_mode():
                _, st = net(torch.from_numpy(x[None]))
            styles.append(st[0].float().numpy())
            targets.append(np.log(s.diameter) - np.log(diam_mean) + np.log(scale))
    return np.asarray(styles, np.float64), np.asarray(targets, np.float64)


def fit_size_model(
    net: Any, samples: Sequence[Sample], diam_mean: float, config: TrainConfig, l2: float = 1.0
) -> SizeModel:
    """Ridge regression from style to log diameter, on random crops of the training images."""
    styles, y = _styles_of_patches(net, samples, config, diam_mean)
    smean = styles.mean(axis=0)
    X = (styles - smean).T
    ymean = float(y.mean())
    A = np.linalg.solve(X @ X.T + l2 * np.eye(X.shape[0]), X @ (y - ymean))
    return SizeModel(A, smean, ymean, diam_mean)


def style_centroid(
    net: Any, samples: Sequence[Sample], max_images: int = 200, crop: int = 224, seed: int = 0
) -> np.ndarray:
    """Mean (L2-normalised) style of the training images at ``diam_mean`` scale.

    Each image (at most ``max_images``, drawn with ``seed``) is rescaled so its objects have
    the model's ``diam_mean`` and its central ``crop`` x ``crop`` region (one tile) is run once.
    """
    import torch

    from . import tiling

    dm = float(net.diam_mean.item())
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(samples))[:max_images]
    styles = []
    for i in chosen:
        s = samples[i]
        x = transforms.resize(s.x, transforms.rescaled_shape(s.x.shape[1:], dm / s.diameter))
        y0 = max(0, (x.shape[1] - crop) // 2)
        x0 = max(0, (x.shape[2] - crop) // 2)
        x, _ = tiling.pad_image(x[:, y0 : y0 + crop, x0 : x0 + crop])
        with torch.inference_mode():
            _, st = net(torch.from_numpy(np.ascontiguousarray(x[None])))
        styles.append(st[0].float().numpy())
    c = np.mean(styles, axis=0)
    return (c / np.linalg.norm(c)).astype(np.float32)


def fixed_batch_loss(
    net: Any,
    samples: Sequence[Sample],
    decoder: Any,
    config: TrainConfig,
    seed: int = 12345,
    batch_norm_batch_stats: bool = True,
) -> float:
    """The decoder loss on one reproducible batch of augmented patches (no weight update).

    With ``batch_norm_batch_stats`` the network normalises with the batch's own statistics
    (as during training) on a copy, so running statistics are not touched.
    """
    import copy

    import torch

    rng = np.random.default_rng(seed)
    xs, ts = zip(
        *[
            random_patch(
                s, rng, config.patch, float(net.diam_mean.item()), config.scale_range, decoder
            )[:2]
            for s in samples
        ],
        strict=True,
    )
    model = copy.deepcopy(net)
    model.train(batch_norm_batch_stats)
    with torch.no_grad():
        raw, _ = model(torch.from_numpy(np.stack(xs)))
        return float(decoder.loss(raw.float(), torch.from_numpy(np.stack(ts))).item())
