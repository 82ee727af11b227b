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

import json
import math
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable
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


class ModelWarning(UserWarning):
    """A model in the user's model directory cannot be used; it is skipped."""


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
    def from_dict(cls, d: dict[str, Any], source: object = "size model") -> SizeModel:
        """Build from ``{"A", "smean", "ymean", "diam_mean"}``, checking every field.

        Raises :class:`CellplugError` naming ``source`` and the field when a key is missing,
        ``A`` and ``smean`` are not vectors of one length, or a number is not finite
        (``diam_mean`` must also be positive).
        """
        if not isinstance(d, dict):
            raise CellplugError(f"{source}: size model must be a mapping, got {type(d).__name__}")
        missing = [k for k in ("A", "smean", "ymean", "diam_mean") if k not in d]
        if missing:
            raise CellplugError(f"{source}: size model lacks {', '.join(missing)}")
        vectors = {}
        for key in ("A", "smean"):
            try:
                v = np.asarray(d[key], np.float64)
            except (TypeError, ValueError):
                raise CellplugError(f"{source}: size model field {key!r} is not numeric") from None
            v = v.reshape(-1) if v.ndim == 2 and 1 in v.shape else v  # Cellpose stores (1, S)
            if v.ndim != 1 or v.size == 0 or not np.isfinite(v).all():
                raise CellplugError(
                    f"{source}: size model field {key!r} must be a finite vector, got shape "
                    f"{v.shape}"
                )
            vectors[key] = v
        if vectors["A"].shape != vectors["smean"].shape:
            raise CellplugError(
                f"{source}: size model fields 'A' {vectors['A'].shape} and 'smean' "
                f"{vectors['smean'].shape} differ in length"
            )
        ymean = _number(d["ymean"], f"{source}: size model field 'ymean'")
        dm = _number(d["diam_mean"], f"{source}: size model field 'diam_mean'", positive=True)
        return cls(vectors["A"], vectors["smean"], ymean, dm)


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
        return SizeModel.from_dict(sm, self.weights) if sm else None

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
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        # torch's message is a page long; the line naming the refused global is what matters
        first = next((ln for ln in lines if "global" in ln.lower()), lines[0] if lines else "")
        first = first[:160]
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


def load_cellpose_size_model(path: str | os.PathLike[str]) -> SizeModel:
    """Read a Cellpose ``*_size.npy`` (a pickled dict of arrays) without running code."""
    from .safeload import load_pickled_npy

    path = Path(path)
    obj = load_pickled_npy(path, what="Cellpose size model")
    if isinstance(obj, np.ndarray):
        obj = obj.item() if obj.shape == () else obj
    if not isinstance(obj, dict):
        raise CellplugError(f"{path}: size model must hold A, smean, ymean and diam_mean")
    return SizeModel.from_dict(obj, path)


# -- metadata schema ----------------------------------------------------------------------
def _number(value: Any, what: str, positive: bool = False) -> float:
    """``value`` as a finite float (positive if asked), else a CellplugError about ``what``."""
    ok = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
    if not ok and isinstance(value, np.ndarray) and value.size == 1:
        value, ok = value.reshape(-1)[0].item(), True
    if not ok or not math.isfinite(float(value)) or (positive and float(value) <= 0):
        kind = "a positive number" if positive else "a finite number"
        raise CellplugError(f"{what} must be {kind}, got {value!r}")
    return float(value)


def _check_text(value: Any, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise CellplugError(f"{what} must be a non-empty string, got {value!r}")


def _check_channels(value: Any, what: str) -> None:
    if not (
        isinstance(value, list | tuple) and len(value) == 2
        and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 8 for c in value)
    ):
        raise CellplugError(f"{what} must be two integers in 0..8, got {value!r}")


def _check_n_channels(value: Any, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 8:
        raise CellplugError(f"{what} must be an integer in 1..8, got {value!r}")


def _check_mapping(value: Any, what: str) -> None:
    if not isinstance(value, dict):
        raise CellplugError(f"{what} must be a JSON object, got {type(value).__name__}")


def _check_vector(value: Any, what: str) -> None:
    try:
        v = np.asarray(value, np.float64)
    except (TypeError, ValueError):
        v = None
    if v is None or v.ndim != 1 or v.size == 0 or not np.isfinite(v).all():
        raise CellplugError(f"{what} must be a list of finite numbers, got {str(value)[:60]}")


# field -> check(value, what); a field absent from the file takes the documented default
_METADATA_CHECKS: dict[str, Callable[[Any, str], Any]] = {
    "format": _check_text,
    "name": _check_text,
    "backbone": _check_text,
    "decoder": _check_text,
    "reconstructor": _check_text,
    "backbone_options": _check_mapping,
    "channels": _check_channels,
    "n_channels": _check_n_channels,
    "diam_mean": lambda v, what: _number(v, what, positive=True),
    "diam_labels": lambda v, what: _number(v, what, positive=True),
    "size_model": lambda v, what: SizeModel.from_dict(v, what),
    "style_centroid": _check_vector,
    "training": _check_mapping,
    "metrics": _check_mapping,
}


def validate_metadata(meta: dict[str, Any], source: object) -> dict[str, Any]:
    """Check each known field of a model's metadata (types, ranges, size-model shapes).

    ``None`` is accepted for optional fields. Unknown fields are kept (a newer version may
    add some). Raises :class:`CellplugError` ``"<source>: field '<name>' must be ..."``.
    Checks that need the weights (``n_channels``, style length) are in :func:`build_network`.
    """
    for key, check in _METADATA_CHECKS.items():
        value = meta.get(key)
        if value is None:
            continue
        if key == "size_model" and not value:
            continue
        check(value, f"{source}: field {key!r}")
    return meta


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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CellplugError(f"{meta_path}: unreadable model metadata ({exc})") from None
    if not isinstance(meta, dict):
        raise CellplugError(f"{meta_path}: model metadata must be a JSON object")
    return validate_metadata(meta, meta_path)


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
        try:  # a plugin's mistake (not a path, broken JSON) hides only its own model
            weights = Path(reg.obj)
            found[name] = ModelInfo(name, weights, read_metadata(weights), f"plugin:{reg.plugin}")
        except (TypeError, CellplugError) as exc:
            warnings.warn(f"skipped model {name!r} of plugin {reg.plugin!r}: {exc}", ModelWarning,
                          stacklevel=2)
    udir = user_model_dir()
    if udir.is_dir():
        for f in sorted(udir.glob("*.pth")):
            if f.stem in found or f.name.startswith("."):  # hidden: temporary or partial files
                continue
            try:
                found[f.stem] = ModelInfo(f.stem, f, read_metadata(f), "user")
            except CellplugError as exc:  # one broken file must not hide the other models
                warnings.warn(f"skipped user model {f.stem!r}: {exc}", ModelWarning, stacklevel=2)
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
        user_file = user_model_dir() / f"{ref}.pth"
        if str(ref) not in models and os.sep not in str(ref) and user_file.is_file():
            return model_from_path(user_file, origin="user")  # skipped as broken: say why
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


def is_runtime_backbone(factory: Any) -> bool:
    """Whether a backbone factory declares ``runs``: it runs other backbones' weights
    (named by its ``base`` option) instead of having its own layout."""
    return getattr(factory, "runs", None) is not None


def is_inference_only(factory: Any) -> bool:
    """Whether a backbone factory declares ``inference_only = True`` (it cannot be trained)."""
    return bool(getattr(factory, "inference_only", False))


def _default_option(factory: Any, name: str) -> Any:
    import inspect

    try:
        param = inspect.signature(factory).parameters.get(name)
    except (TypeError, ValueError):
        return None
    return None if param is None or param.default is param.empty else param.default


def runs_backbone(factory: Any, name: str, registry: PluginRegistry) -> bool:
    """Whether backbone ``factory`` can run the weights of backbone ``name``: its own, or
    through ``runs`` (a list of names, or ``"*"``: any backbone that is not itself a runtime
    one)."""
    runs = getattr(factory, "runs", None)
    if runs is None:
        return False
    if runs == "*":
        try:
            return not is_runtime_backbone(registry.get("backbone", name))
        except CellplugError:
            return False
    return name in runs


def weights_backbone(info: ModelInfo) -> str:
    """The backbone whose layout ``info``'s weights have (its own, or the ``base`` of a
    runtime backbone chosen with :func:`with_backbone`)."""
    return str(info.metadata.get("weights_backbone") or info.backbone)


def with_backbone(
    info: ModelInfo,
    backbone: str | None = None,
    options: dict[str, Any] | None = None,
    registry: PluginRegistry | None = None,
) -> ModelInfo:
    """``info`` run by another backbone and/or with more backbone options (``segment
    --backbone NAME --backbone-option K=V``); the weights are unchanged.

    A runtime backbone (one declaring ``runs``) gets the weights' backbone as its ``base``
    option; any other backbone must load the weights as they are, which
    :func:`build_network` checks. Refuses an unknown backbone, and a runtime backbone that
    does not run the weights' backbone.
    """
    if backbone is None and not options:
        return info
    registry = registry or get_registry()
    own = weights_backbone(info)
    name = backbone or info.backbone
    factory = registry.get("backbone", name)
    meta = dict(info.metadata)
    opts = dict(meta.get("backbone_options") or {})
    try:
        current = registry.get("backbone", info.backbone)
    except CellplugError:  # e.g. saved with a runtime backbone that is not installed here
        current = None
    if current is not None and is_runtime_backbone(current):  # the weights are base's
        own = str(opts.get("base") or _default_option(current, "base") or own)
    elif current is None and opts.get("base"):
        own = str(opts["base"])
    if name != info.backbone:
        if is_runtime_backbone(factory):
            if not runs_backbone(factory, own, registry):
                runs = getattr(factory, "runs", ())
                raise CellplugError(
                    f"backbone {name!r} cannot run model {info.name!r}: its weights are "
                    f"backbone {own!r}'s, and {name!r} runs "
                    f"{'any torch backbone' if runs == '*' else ', '.join(runs)}"
                )
            opts["base"] = own
        elif current is None or is_runtime_backbone(current):
            opts.pop("base", None)  # back from a runtime backbone to a torch one
        meta["weights_backbone"] = own
    opts.update(options or {})
    meta.update(backbone=name, backbone_options=opts)
    return ModelInfo(info.name, info.weights, meta, info.origin)


def build_network(info: ModelInfo, registry: PluginRegistry | None = None) -> Any:
    """Instantiate the model's backbone and load its weights (eval mode, float32).

    The metadata is checked against the weights: ``backbone_options`` must be options the
    backbone accepts, ``n_channels`` must be the network's input channels, and the size model
    and style centroid must have the length of the network's style vector (one small probe
    pass, which also checks that the backbone keeps its contract).

    A runtime backbone with ``factory.load_cached`` is first asked for a module built from
    its own cache of this weights file, without torch (see
    :func:`cellplug.hookspecs.register_backbones`); otherwise the weights are loaded with
    torch, and a module with ``remember_weights_file`` is told what was learnt from them.
    """
    registry = registry or get_registry()
    factory = registry.get("backbone", info.backbone)
    where = _metadata_path(info.weights) if info.metadata.get("format") != "cellpose" else (
        info.weights
    )
    given = dict(info.metadata.get("backbone_options", {}))
    _check_options(factory, dict(given), info, where)
    cached = None
    load_cached = getattr(factory, "load_cached", None)
    if load_cached is not None and is_runtime_backbone(factory):
        cached = load_cached(info.weights, dict(given))
    if cached is not None:
        net, facts = cached
    else:
        net, facts = _network_from_state(factory, info, given, where, registry)
        remember = getattr(net, "remember_weights_file", None)
        if remember is not None:
            remember(info.weights, dict(given), dict(facts))
    # Cellpose files carry the diameters in the state dict; metadata, when present, wins
    for key in ("diam_mean", "diam_labels"):
        if key not in info.metadata and facts.get(key) is not None:
            value = float(facts[key])
            _number(value, f"{info.weights}: {key} in the weights", positive=True)
            info.metadata[key] = value
    net_channels = int(facts["n_channels"])
    n_channels = info.metadata.setdefault("n_channels", net_channels)
    if n_channels != net_channels:
        raise CellplugError(
            f"{where}: field 'n_channels' is {n_channels}, the weights take {net_channels} "
            f"input channels"
        )
    _probe(net, net_channels, info, where, registry)
    return net


def _network_from_state(
    factory: Any, info: ModelInfo, given: dict[str, Any], where: Path,
    registry: PluginRegistry,
) -> tuple[Any, dict[str, Any]]:
    """The torch module with the weights of ``info`` loaded, and the facts the weights
    gave: ``n_channels``, and ``diam_mean``/``diam_labels`` where the state dict has them."""
    state = load_state_dict(info.weights)
    options = dict(given)
    accepts = getattr(factory, "accepts_state_dict", None)
    if is_runtime_backbone(factory):  # it runs its base backbone's weights: ask that one
        base = str(options.get("base") or _default_option(factory, "base"))
        accepts = getattr(registry.get("backbone", base), "accepts_state_dict", None)
    if accepts is not None:
        inferred = accepts(state)
        if inferred is None:
            raise CellplugError(
                f"{info.weights}: weights do not match backbone {info.backbone!r} "
                f"(expected a Cellpose 2/3 CPnet state dict)"
            )
        for key, value in options.items():
            if key in inferred and key != "diam_mean" and inferred[key] != value:
                raise CellplugError(
                    f"{where}: field 'backbone_options' says {key}={value!r}, the weights "
                    f"have {key}={inferred[key]!r}"
                )
        options = {**inferred, **options}
    try:
        net = factory(**options)
    except Exception as exc:  # noqa: BLE001 - a plugin's factory may raise anything
        raise CellplugError(
            f"{where}: field 'backbone_options' {given} rejected by backbone "
            f"{info.backbone!r} ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
        ) from None
    # chosen with --backbone: say whose weights these are, the usual reason they do not fit
    other = weights_backbone(info)
    hint = f" (they are for backbone {other!r})" if other != info.backbone else ""
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        msg = " ".join(str(exc).split())[:300]
        raise CellplugError(
            f"{info.weights}: weights do not fit backbone {info.backbone!r}{hint}: {msg}"
        ) from None
    missing = [k for k in missing if k not in ("diam_mean", "diam_labels")]
    if missing or unexpected:
        raise CellplugError(
            f"{info.weights}: weights do not fit backbone {info.backbone!r}{hint} "
            f"(missing {missing[:3]}, unexpected {list(unexpected)[:3]})"
        )
    facts: dict[str, Any] = {
        "n_channels": int(options.get("n_channels", getattr(net, "n_channels", 2)))
    }
    for key in ("diam_mean", "diam_labels"):
        if key in state:
            facts[key] = float(state[key].reshape(-1)[0])
    net.float().eval()
    return net, facts


def _check_options(factory: Any, options: dict[str, Any], info: ModelInfo, where: Path) -> None:
    """Unknown ``backbone_options`` keys are an error; a factory taking ``**kwargs`` checks
    them itself (its TypeError is reported by :func:`build_network`)."""
    import inspect

    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    known = {p.name for p in params}
    unknown = sorted(set(options) - known)
    if unknown:
        raise CellplugError(
            f"{where}: field 'backbone_options' has unknown option(s) {', '.join(unknown)} for "
            f"backbone {info.backbone!r} (known: {', '.join(sorted(known))})"
        )


def _probe(net: Any, n_channels: int, info: ModelInfo, where: Path, registry: Any) -> None:
    """One 32 x 32 pass: the backbone's contract, and the style length the metadata assumes."""
    try:
        if getattr(net, "takes_arrays", False):  # an array backbone: numpy in and out
            out = net(np.zeros((1, n_channels, 32, 32), np.float32), "fp32")
        else:
            import torch

            with torch.inference_mode():
                out = net(torch.zeros(1, n_channels, 32, 32))
        raw, style = out
        ok = raw.shape[:1] == (1,) and raw.shape[2:] == (32, 32) and style.ndim == 2
    except Exception as exc:  # noqa: BLE001 - a plugin's network may raise anything
        raise CellplugError(
            f"{info.weights}: backbone {info.backbone!r} failed on a probe input "
            f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
        ) from None
    if not ok:
        raise CellplugError(
            f"{info.weights}: backbone {info.backbone!r} broke its contract: forward() must "
            f"return (raw (B, K, H, W), style (B, S))"
        )
    n_style = int(style.shape[1])
    decoder = registry.get("decoder", info.decoder)
    if int(raw.shape[1]) != int(decoder.n_outputs):
        raise CellplugError(
            f"{where}: the network has {int(raw.shape[1])} outputs, decoder {info.decoder!r} "
            f"needs {decoder.n_outputs}"
        )
    size_model = info.size_model
    if size_model is not None and size_model.A.size != n_style:
        raise CellplugError(
            f"{where}: field 'size_model' has vectors of length {size_model.A.size}, the "
            f"network's style vector has {n_style}"
        )
    centroid = info.style_centroid
    if centroid is not None and centroid.size != n_style:
        raise CellplugError(
            f"{where}: field 'style_centroid' has length {centroid.size}, the network's style "
            f"vector has {n_style}"
        )


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
