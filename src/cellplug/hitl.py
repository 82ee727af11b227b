"""Human-in-the-loop fine-tuning: a few corrected images -> a new model in the user's zoo.

The Python API behind ``cellplug train --base MODEL SOURCE... --name NEW`` and the bridges'
"train on corrections" commands: the recipe for a handful of images, the model's lineage,
and saving under a new name that never overwrites an earlier round.

A round of the loop, from the command line::

    cellplug segment new_images/ --model generalist --save roi       # or --save seg-npy
    # correct the ROIs in Fiji (or the masks in the Cellpose GUI), save them beside the images
    cellplug train new_images/ --base generalist --name mylab-r1     # the corrected images
    cellplug segment more_images/ --model mylab-r1 --save roi        # the rest, next round
"""

from __future__ import annotations

import datetime as _dt
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .annotations import Annotation
from .errors import CellplugError
from .models import ModelInfo, resolve_model
from .plugins import PluginRegistry, get_registry
from .train import TrainConfig, TrainResult, prepare_samples, train
from .zoo import new_model_path

RECIPES: dict[str, dict[str, Any]] = {
    # Cellpose's recipe for a model trained from many images (AdamW, warm-up, decay)
    "scratch": {"epochs": 100, "learning_rate": 0.005, "weight_decay": 1e-5,
                "warmup_epochs": 10, "optimizer": "adamw", "batch_size": 8},
    # Cellpose 2.0's human-in-the-loop recipe for 1-10 corrected images (Pachitariu &
    # Stringer 2022): SGD with momentum 0.9, lr 0.1, weight decay 1e-4, 100 epochs, no warm-up
    # An epoch is one batch of 8 augmented patches drawn from the few images, as Cellpose's
    # GUI trains (nimg_per_epoch=8): one-image batches would break batch normalisation.
    "hitl": {"epochs": 100, "learning_rate": 0.1, "weight_decay": 1e-4, "warmup_epochs": 0,
             "optimizer": "sgd", "batch_size": 8, "images_per_epoch": 8},
}
# The same with replay (train --replay): half of each batch rehearses old images, so the new
# ones get half the patches; 150 epochs give them back most of it. Measured
# (benchmarks/results/hitl.md, 5 phase-contrast images, 16 replayed nuclei images): 100
# epochs +0.24 AP@0.5 on the new type, 150 epochs +0.37, the old type -0.02 with both.
RECIPES["hitl-replay"] = {**RECIPES["hitl"], "epochs": 150}


# the share of each batch that rehearses the replay images: half, so that the old type is
# seen as often as the new (measured in benchmarks/results/hitl.md)
REPLAY_FRACTION = 0.5


def replay_description(replay: Sequence[Annotation]) -> dict[str, Any]:
    """The lineage entry of the rehearsed images: how many, which."""
    return {"n_images": len(replay), "stems": [a.stem for a in replay][:100]}


def recipe_config(recipe: str, **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` from ``RECIPES[recipe]``, with ``overrides`` (None = keep)."""
    if recipe not in RECIPES:
        raise CellplugError(f"unknown recipe {recipe!r}; use one of {', '.join(RECIPES)}")
    values = {**RECIPES[recipe], **{k: v for k, v in overrides.items() if v is not None}}
    return TrainConfig(**values)


def lineage(annotations: Sequence[Annotation], source_format: str | None,
            command: str | None = None) -> dict[str, Any]:
    """What a fine-tune was made from: images, object (ROI) counts, format, date, command."""
    images = [{"stem": a.stem, "file": Path(a.source).name if a.source else a.stem,
               "objects": int(np.unique(a.labels[a.labels > 0]).size)} for a in annotations]
    return {
        "images": images,
        "n_images": len(images),
        "n_objects": sum(i["objects"] for i in images),
        "source_format": source_format,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": command if command is not None else shlex.join(sys.argv),
    }


def fine_tune(
    annotations: Sequence[Annotation],
    base: str | ModelInfo,
    name: str | None = None,
    out_path: Path | None = None,
    config: TrainConfig | None = None,
    source_format: str | None = None,
    registry: PluginRegistry | None = None,
    progress: bool = True,
    log_fn: Callable[[str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    replay: Sequence[Annotation] = (),
    replay_fraction: float | None = None,
) -> TrainResult:
    """Fine-tune ``base`` on ``annotations`` and save it as ``name`` in the user's zoo
    (or to ``out_path``), with its lineage in the metadata.

    ``config`` defaults to the ``hitl`` recipe (``hitl-replay`` with ``replay``). Images
    with fewer objects than ``config.min_train_masks`` are left out, as in Cellpose. Returns the
    :class:`~cellplug.train.TrainResult`; ``should_stop`` can cancel (nothing is saved).

    ``replay`` are annotated images of what the base model already segments (a few of its
    training images, or earlier rounds' corrections): ``replay_fraction`` of every batch
    (default ``REPLAY_FRACTION``) rehearses them, so that the new model does not forget them.
    """
    registry = registry or get_registry()
    info = base if isinstance(base, ModelInfo) else resolve_model(base, registry)
    if (name is None) == (out_path is None):
        raise CellplugError("give either a model name or an output path")
    target = new_model_path(name) if name is not None else Path(out_path)  # type: ignore[arg-type]
    config = config or recipe_config("hitl-replay" if replay else "hitl")
    decoder = registry.get("decoder", info.decoder)
    samples = prepare_samples(annotations, decoder, config.channels, info.n_channels,
                              min_masks=config.min_train_masks, progress=progress)
    if not samples:
        raise CellplugError(f"none of the {len(annotations)} annotated image(s) has "
                            f"{config.min_train_masks} or more objects to train on")
    description = lineage(annotations, source_format)
    if replay:
        samples += prepare_samples(replay, decoder, config.channels, info.n_channels,
                                   group="replay", min_masks=config.min_train_masks,
                                   progress=progress, replay=True)
        config = replace(config, replay_fraction=REPLAY_FRACTION if replay_fraction is None
                         else replay_fraction)
        description["replay"] = replay_description(replay)
    return train(samples, [], target, replace(config), base_model=info, registry=registry,
                 progress=progress, data_description=description, log_fn=log_fn,
                 should_stop=should_stop)
