"""The user's model folder (the zoo a user adds to): add, remove, export, describe.

Models in the user's folder (``$CELLPLUG_MODELS``, default ``~/.cellplug/models``) are a
weights file ``<name>.pth`` and its metadata ``<name>.json``. :func:`add_model` checks a file
completely (it is built, as for segmentation) before anything is copied, and records where it
came from and its sha256; a bare Cellpose file gets its metadata written from its state dict
and ``_size.npy``. Models shipped by plugins are listed beside them but never removed.
"""

from __future__ import annotations

import datetime as _dt
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CellplugError
from .models import (
    FORMAT,
    ModelInfo,
    available_models,
    build_network,
    model_from_path,
    user_model_dir,
)
from .plugins import PluginRegistry, get_registry

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def new_model_path(name: str, registry: PluginRegistry | None = None) -> Path:
    """Where model ``name`` goes in the user's folder; an error if the name is taken or unusable.

    Models are never overwritten, so every round of a human-in-the-loop run stays available.
    """
    if not NAME_PATTERN.match(name):
        raise CellplugError(f"model name {name!r}: use letters, digits, '.', '_' and '-' "
                            f"(up to 64 characters, starting with a letter or digit)")
    path = user_model_dir() / f"{name}.pth"
    if path.exists() or name in available_models(registry):
        where = path if path.exists() else "a plugin's model"
        raise CellplugError(f"a model named {name!r} exists already ({where}); choose another "
                            f"name, e.g. {name}-2")
    return path


def add_model(path: str | Path, name: str | None = None,
              registry: PluginRegistry | None = None) -> ModelInfo:
    """Check the model at ``path`` (ours, or a bare Cellpose 2/3 ``.pth`` with its optional
    ``_size.npy``) and copy it into the user's folder as ``name``.

    Nothing is copied when any check fails: unreadable or pickled-code weights, weights that
    do not fit their backbone, metadata that lies. The new JSON records ``added_from`` (the
    original path, its sha256, the date).
    """
    from . import io

    registry = registry or get_registry()
    source = Path(path)
    if not source.exists():
        raise CellplugError(f"{source}: no such file")
    info = model_from_path(source)
    build_network(info, registry)  # the whole check: weights, metadata against them, probe
    name = name or _default_name(info)
    target = new_model_path(name, registry)
    meta = {k: v for k, v in info.metadata.items() if k != "format"}
    meta = {"format": FORMAT, **meta, "name": name, "added_from": {
        "path": str(info.weights.resolve()), "sha256": io.file_sha256(info.weights),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "format": info.metadata.get("format", FORMAT)}}
    json_target = target.with_suffix(".json")
    with io.atomic_paths([target, json_target]) as (tmp_weights, tmp_json):
        shutil.copyfile(info.weights, tmp_weights)
        io.write_json(tmp_json, meta)
    return ModelInfo(name, target, meta, "user")


def _default_name(info: ModelInfo) -> str:
    stem = info.weights.stem if info.weights.suffix == ".pth" else info.weights.name
    candidate = str(info.metadata.get("name") or stem)
    return re.sub(r"[^A-Za-z0-9._-]", "_", candidate)[:64].lstrip("._-") or "model"


def remove_model(name: str, registry: PluginRegistry | None = None) -> Path:
    """Delete user model ``name`` (weights and metadata); plugin models cannot be removed."""
    found = available_models(registry)
    if name not in found:
        raise CellplugError(f"unknown model {name!r}; available: {', '.join(sorted(found))}")
    info = found[name]
    if info.origin != "user":
        raise CellplugError(f"model {name!r} comes with {info.origin}; only models in "
                            f"{user_model_dir()} can be removed")
    info.weights.unlink()
    info.weights.with_suffix(".json").unlink(missing_ok=True)
    return info.weights


def export_model(name: str, folder: str | Path, registry: PluginRegistry | None = None
                 ) -> list[Path]:
    """Copy model ``name`` (weights and metadata) into ``folder``, to share it.

    Existing files in ``folder`` are never overwritten.
    """
    from . import io

    found = available_models(registry)
    if name not in found:
        raise CellplugError(f"unknown model {name!r}; available: {', '.join(sorted(found))}")
    info = found[name]
    folder = Path(folder)
    targets = [folder / f"{name}.pth", folder / f"{name}.json"]
    for t in targets:
        if t.exists():
            raise CellplugError(f"{t} exists; export into another folder (nothing was written)")
    with io.atomic_paths(targets) as (tmp_weights, tmp_json):
        shutil.copyfile(info.weights, tmp_weights)
        io.write_json(tmp_json, {**info.metadata, "name": name})
    return targets


def describe(name: str, registry: PluginRegistry | None = None) -> dict[str, Any]:
    """What ``models info`` shows: architecture, sizes, channels, data and licence, lineage,
    metrics, style centroid, file and sha256."""
    from . import io

    found = available_models(registry)
    if name not in found:
        raise CellplugError(f"unknown model {name!r}; available: {', '.join(sorted(found))}")
    info = found[name]
    meta = info.metadata
    training = meta.get("training") or {}
    centroid = info.style_centroid
    return {
        "name": name,
        "origin": info.origin,
        "weights": str(info.weights),
        "sha256": io.file_sha256(info.weights),
        "architecture": {"backbone": info.backbone,
                         "backbone_options": meta.get("backbone_options", {}),
                         "decoder": info.decoder, "reconstructor": info.reconstructor},
        "diam_mean": meta.get("diam_mean"),
        "diam_labels": meta.get("diam_labels"),
        "size_model": bool(meta.get("size_model")),
        "channels": meta.get("channels"),
        "n_channels": meta.get("n_channels"),
        "training_data": training.get("data"),
        "license": meta.get("license"),
        "base_model": meta.get("base_model"),
        "base_sha256": meta.get("base_sha256"),
        "added_from": meta.get("added_from"),
        "metrics": meta.get("metrics"),
        "style_centroid": None if centroid is None else {
            "length": int(centroid.size),
            "first": [round(float(v), 4) for v in np.asarray(centroid)[:4]]},
    }
