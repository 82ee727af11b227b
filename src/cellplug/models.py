"""Models: weights + metadata, found by name or path, loaded without unpickling code.

A cellplug model is two files side by side:

- ``<name>.pth``: a state dict (tensors only) saved with ``torch.save``, in the layout of
  the backbone it belongs to. For the default backbone this is exactly a Cellpose 2/3
  ``.pth`` file, so Cellpose loads ours and we load Cellpose's.
- ``<name>.json``: metadata (:data:`METADATA_KEYS`): backbone, decoder, channels,
  ``diam_mean``, ``diam_labels``, size model, style centroid, training description, metrics.

A bare Cellpose ``.pth`` (no JSON) is recognised from its state-dict layout; its size model
is read from ``<file>_size.npy`` when present.

Models are looked up by: an existing path; a name registered by a plugin
(``register_models``); a file in the user's model directory (``$CELLPLUG_MODELS``, default
``~/.cellplug/models``).
"""

from __future__ import annotations

import io as _io
import json
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CellplugError
from .plugins import PluginRegistry, get_registry

DEFAULT_MODEL = "generalist"
FORMAT = "cellplug-model/1"
METADATA_KEYS = (
    "format", "name", "backbone", "backbone_options", "decoder", "reconstructor",
    "channels", "n_channels", "diam_mean", "diam_labels", "size_model", "style_centroid",
    "training", "metrics", "base_model",
)


def user_model_dir() -> Path:
    """Where ``cellplug train`` saves models and where names are looked up last."""
    return Path(os.environ.get("CELLPLUG_MODELS", Path.home() / ".cellplug" / "models"))


@dataclass
class SizeModel:
    """Linear regression from style vector to log object diameter (Cellpose's size model).

    ``diameter = exp(A . (style - smean) + ymean) * diam_mean``, at least 5 pixels.
    """

    A: np.ndarray
    smean: np.ndarray
    ymean: float
    diam_mean: float

    def predict(self, style: np.ndarray) -> float:
        """Object diameter (pixels, original image) from one style vector (S,)."""
        d = float(np.exp(self.A @ (style - self.smean) + np.log(self.diam_mean) + self.ymean))
        return max(5.0, d) if np.isfinite(d) else self.diam_mean

    def to_dict(self) -> dict[str, Any]:
        return {
            "A": self.A.tolist(), "smean": self.smean.tolist(),
            "ymean": float(self.ymean), "diam_mean": float(self.diam_mean),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SizeModel:
        return cls(
            np.asarray(d["A"], np.float64), np.asarray(d["smean"], np.float64),
            float(d["ymean"]), float(d["diam_mean"]),
        )


@dataclass
class ModelInfo:
    """A model that can be built: where its weights are and what its metadata says."""

    name: str
    weights: Path
    metadata: dict[str, Any] = field(default_factory=dict)
    origin: str = "path"  # "plugin:<plugin name>", "path" or "user"

    @property
    def backbone(self) -> str:
        return self.metadata.get("backbone", "cellpose-unet")

    @property
    def decoder(self) -> str:
        return self.metadata.get("decoder", "cellpose-flows")

    @property
    def reconstructor(self) -> str:
        return self.metadata.get("reconstructor", "cellpose-dynamics")

    @property
    def diam_mean(self) -> float:
        return float(self.metadata.get("diam_mean", 30.0))

    @property
    def diam_labels(self) -> float:
        return float(self.metadata.get("diam_labels", self.diam_mean))

    @property
    def n_channels(self) -> int:
        return int(self.metadata.get("n_channels", 2))

    @property
    def size_model(self) -> SizeModel | None:
        sm = self.metadata.get("size_model")
        return SizeModel.from_dict(sm) if sm else None

    @property
    def style_centroid(self) -> np.ndarray | None:
        c = self.metadata.get("style_centroid")
        return None if c is None else np.asarray(c, np.float32)


# -- safe loading ------------------------------------------------------------------------
def load_state_dict(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a state dict of tensors with ``torch.load(weights_only=True)``.

    Raises :class:`CellplugError` naming the file when it is missing, is not a torch file,
    holds pickled code, or is not a state dict.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CellplugError(f"{path}: model file not found")
    if not zipfile.is_zipfile(path):
        raise CellplugError(
            f"{path}: not a model weights file (expected a PyTorch state dict saved with "
            f"torch.save, e.g. a Cellpose 2/3 model)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CellplugError(
            f"{path}: refused to load: the file contains pickled objects other than tensors "
            f"(only plain state dicts are accepted) [{first}]"
        ) from None
    except Exception as exc:
        raise CellplugError(
            f"{path}: cannot read model weights ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CellplugError(
            f"{path}: expected a state dict (parameter name -> tensor), got {type(state).__name__}"
        )
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CellplugError(f"{path}: expected a state dict of tensors only")
    return state


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, scalars and plain containers; refuses everything else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("builtins", "dict"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def load_cellpose_size_model(path: str | os.PathLike[str]) -> SizeModel:
    """Read a Cellpose ``*_size.npy`` (a pickled dict of arrays) without running code."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        buf = _io.BytesIO(raw)
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            _shape, _fortran, dtype = np.lib.format.read_array_header_1_0(buf)
        elif version == (2, 0):
            _shape, _fortran, dtype = np.lib.format.read_array_header_2_0(buf)
        else:
            raise CellplugError(f"{path}: unsupported .npy format version {version}")
        if dtype != np.dtype(object):
            raise CellplugError(f"{path}: expected a Cellpose size model (a pickled dict)")
        obj = _ArrayOnlyUnpickler(buf).load()
    except CellplugError:
        raise
    except Exception as exc:
        raise CellplugError(f"{path}: not a readable Cellpose size model ({exc})") from None
    if isinstance(obj, np.ndarray):
        obj = obj.item() if obj.shape == () else obj
    if not isinstance(obj, dict) or not {"A", "smean", "ymean", "diam_mean"} <= set(obj):
        raise CellplugError(f"{path}: size model must hold A, smean, ymean and diam_mean")
    return SizeModel(
        np.asarray(obj["A"], np.float64).ravel(), np.asarray(obj["smean"], np.float64).ravel(),
        float(np.asarray(obj["ymean"])), float(np.asarray(obj["diam_mean"])),
    )


# -- finding models ------------------------------------------------------------------------
def _metadata_path(weights: Path) -> Path:
    if weights.suffix == ".pth":
        return weights.with_suffix(".json")
    return Path(str(weights) + ".json")


def read_metadata(weights: Path) -> dict[str, Any]:
    meta_path = _metadata_path(weights)
    if not meta_path.exists():
        return {}
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CellplugError(f"{meta_path}: unreadable model metadata ({exc})") from None
    if not isinstance(meta, dict):
        raise CellplugError(f"{meta_path}: model metadata must be a JSON object")
    return meta


def model_from_path(path: Path, name: str | None = None, origin: str = "path") -> ModelInfo:
    """A :class:`ModelInfo` for a weights file (ours or Cellpose's) or a folder holding one."""
    if path.is_dir():
        candidates = sorted(path.glob("*.pth"))
        if len(candidates) != 1:
            raise CellplugError(
                f"{path}: a model folder must hold exactly one .pth weights file "
                f"(found {len(candidates)})"
            )
        path = candidates[0]
    meta = read_metadata(path)
    if not meta:
        # no metadata: a Cellpose file; architecture comes from the state dict at build time
        meta = {"format": "cellpose", "backbone": "cellpose-unet", "decoder": "cellpose-flows"}
        for size_path in (Path(str(path) + "_size.npy"), path.with_name(path.stem + "_size.npy")):
            if size_path.exists():
                meta["size_model"] = load_cellpose_size_model(size_path).to_dict()
                break
    return ModelInfo(name or meta.get("name") or path.stem, path, meta, origin)


def available_models(registry: PluginRegistry | None = None) -> dict[str, ModelInfo]:
    """Models by name: those plugins register, then the user's model directory."""
    registry = registry or get_registry()
    found: dict[str, ModelInfo] = {}
    for name, reg in registry.registrations("model").items():
        weights = Path(reg.obj)
        found[name] = ModelInfo(name, weights, read_metadata(weights), f"plugin:{reg.plugin}")
    udir = user_model_dir()
    if udir.is_dir():
        for f in sorted(udir.glob("*.pth")):
            found.setdefault(f.stem, ModelInfo(f.stem, f, read_metadata(f), "user"))
    return found


def resolve_model(
    ref: str | os.PathLike[str] | None, registry: PluginRegistry | None = None
) -> ModelInfo:
    """Find a model by path or name (``None``: the default, :data:`DEFAULT_MODEL`)."""
    ref = DEFAULT_MODEL if ref is None else ref
    path = Path(ref)
    if path.exists():
        info = model_from_path(path)
    else:
        models = available_models(registry)
        if str(ref) not in models:
            looks_like_path = os.sep in str(ref) or path.suffix in (".pth", ".pt")
            if looks_like_path:
                raise CellplugError(f"{ref}: model file not found")
            names = ", ".join(sorted(models)) or "none installed"
            raise CellplugError(f"unknown model {str(ref)!r}; available: {names}")
        info = models[str(ref)]
        if not info.weights.exists():
            raise CellplugError(f"{info.weights}: weights of model {info.name!r} are missing")
    return info


def build_network(info: ModelInfo, registry: PluginRegistry | None = None) -> Any:
    """Instantiate the model's backbone and load its weights (eval mode, float32)."""
    registry = registry or get_registry()
    factory = registry.get("backbone", info.backbone)
    state = load_state_dict(info.weights)
    options = dict(info.metadata.get("backbone_options", {}))
    accepts = getattr(factory, "accepts_state_dict", None)
    if accepts is not None:
        inferred = accepts(state)
        if inferred is None:
            raise CellplugError(
                f"{info.weights}: weights do not match backbone {info.backbone!r} "
                f"(expected a Cellpose 2/3 CPnet state dict)"
            )
        options = {**inferred, **options}
    net = factory(**options)
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        msg = " ".join(str(exc).split())[:300]
        raise CellplugError(
            f"{info.weights}: weights do not fit backbone {info.backbone!r}: {msg}"
        ) from None
    missing = [k for k in missing if k not in ("diam_mean", "diam_labels")]
    if missing or unexpected:
        raise CellplugError(
            f"{info.weights}: weights do not fit backbone {info.backbone!r} "
            f"(missing {missing[:3]}, unexpected {list(unexpected)[:3]})"
        )
    # Cellpose files carry the diameters in the state dict; metadata, when present, wins
    for key in ("diam_mean", "diam_labels"):
        if key not in info.metadata and key in state:
            info.metadata[key] = float(state[key].reshape(-1)[0])
    info.metadata.setdefault("n_channels", int(options.get("n_channels", 2)))
    net.float().eval()
    return net


def save_model(
    path: str | os.PathLike[str], net: Any, metadata: dict[str, Any], half: bool = False
) -> Path:
    """Save ``net``'s state dict (optionally as float16) and ``metadata`` beside it.

    ``path`` ends in ``.pth`` (added if missing). Both files are written atomically.
    """
    import torch

    from .io import atomic_path, write_json

    path = Path(path)
    if path.suffix != ".pth":
        path = path.with_name(path.name + ".pth")
    keep = ("diam_mean", "diam_labels")
    state = {
        k: (v.half() if half and v.is_floating_point() and k not in keep else v)
        .detach().cpu().clone()
        for k, v in net.state_dict().items()
    }
    # saved through a file object: torch.save(state, tmp) would put the random temporary name
    # into the archive, so the same weights would give a different file (and sha256) each time
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(state, fh)
    meta = {"format": FORMAT, **metadata}
    write_json(_metadata_path(path), meta)
    return path
