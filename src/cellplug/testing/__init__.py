"""The plugin contract kit: checks that a backbone, decoder or reconstructor keeps its contract.

For plugin authors. Three ways to run it on an installed plugin:

- in your own tests, subclass a contract class (pytest collects its ``test_*`` methods)::

      from cellplug.testing import BackboneContract

      class TestMyBackbone(BackboneContract):
          backbone = "my-unet"
          options = {"width": 8}  # factory options (small = fast)

  (likewise :class:`DecoderContract` with ``decoder = ...`` and
  :class:`ReconstructorContract` with ``reconstructor = ...``);
- ``pytest --pyargs cellplug.testing`` with ``CELLPLUG_CONTRACT="backbone:my-unet"``
  (``;``-separated ``KIND:NAME`` items; ``KIND:NAME:{json options}`` for options);
- ``python -m cellplug.testing backbone my-unet [--option KEY=VALUE]``: a report, exit 1 on
  failure.

What is checked, per kind (the contract is :mod:`cellplug.hookspecs`):

- **backbone**: output shapes and dtypes (``raw`` (B, K, H, W), ``style`` (B, S)
  L2-normalised, finite float32); each image's output independent of the batch; determinism;
  odd image sizes (not a multiple of 16) through :func:`cellplug.inference.run_network`, tiled
  and whole; the default decoder and reconstructor on its output through a saved and
  rebuilt model (:func:`cellplug.models.build_network`, whose probe checks the contract too);
  for a backbone that trains, one optimiser step and saving and reloading (outputs equal);
  for a runtime backbone (``runs``), outputs equal to its torch ``base``'s on the same weights.
- **decoder**: ``n_outputs``, ``targets`` (T, H, W) float32 on odd sizes and on an empty
  label image, ``decode`` shapes, a finite differentiable ``loss``, ``vector_channels`` and
  ``target_interpolation`` consistent with the targets.
- **reconstructor**: labels (H, W) integer numbered 1..N on odd sizes; background stays 0;
  unknown keyword parameters (and ``interp=False``) accepted; deterministic; nothing found
  when ``cellprob`` is negative everywhere.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..plugins import PluginRegistry, get_registry

DEFAULT_DECODER = "cellpose-flows"
DEFAULT_RECONSTRUCTOR = "cellpose-dynamics"
ODD_SHAPE = (75, 61)  # not a multiple of 16, not square


@dataclass
class Subject:
    """The plugin under test: its kind, name, options and the registry it comes from."""

    kind: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    registry: PluginRegistry | None = None

    @property
    def reg(self) -> PluginRegistry:
        return self.registry or get_registry()

    def obj(self) -> Any:
        return self.reg.get(self.kind, self.name)


# -- test data ---------------------------------------------------------------------------------
def disk_labels(shape: tuple[int, int] = ODD_SHAPE, radius: float = 9.0) -> np.ndarray:
    """(H, W) uint16 labels: disks of ``radius`` on a grid, one touching the border."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.uint16)
    n = 0
    for cy in np.arange(radius + 2, shape[0] + radius, 2.6 * radius):
        for cx in np.arange(radius + 2, shape[1], 2.6 * radius):
            n += 1
            labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = n
    return labels


def disk_image(shape: tuple[int, int] = ODD_SHAPE, seed: int = 0) -> np.ndarray:
    """uint16 (H, W) fluorescence-like image of :func:`disk_labels` with noise."""
    rng = np.random.default_rng(seed)
    img = (disk_labels(shape) > 0) * 800.0 + 100.0 + rng.normal(0, 20, shape)
    return np.clip(img, 0, 65535).astype(np.uint16)


# -- backbone checks ---------------------------------------------------------------------------
def _decoder(subject: Subject) -> Any:
    return subject.reg.get("decoder", DEFAULT_DECODER)


def build_backbone(subject: Subject, n_channels: int = 2, seed: int = 0) -> Any:
    """The backbone's network (eval mode, float32) with ``subject.options``; torch seeded."""
    import torch

    torch.manual_seed(seed)
    factory = subject.obj()
    net = factory(n_channels=n_channels, n_outputs=_decoder(subject).n_outputs,
                  **subject.options)
    return net.float().eval()


def _forward(net: Any, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import torch

    with torch.inference_mode():
        raw, style = net(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
    return raw.float().numpy().copy(), style.float().numpy().copy()


def _batch(shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, shape).astype(np.float32)


def check_backbone_forward(subject: Subject) -> None:
    """(B, C, H, W) float32 -> raw (B, K, H, W), style (B, S): finite float32, style unit."""
    import torch

    net = build_backbone(subject)
    k = _decoder(subject).n_outputs
    with torch.inference_mode():
        out = net(torch.from_numpy(_batch((2, 2, 48, 64))))
    assert isinstance(out, tuple) and len(out) == 2, "forward() must return (raw, style)"
    raw, style = out
    assert tuple(raw.shape) == (2, k, 48, 64), f"raw has shape {tuple(raw.shape)}"
    assert raw.dtype == torch.float32, f"raw is {raw.dtype}, expected float32"
    assert style.ndim == 2 and style.shape[0] == 2, f"style has shape {tuple(style.shape)}"
    assert style.dtype == torch.float32, f"style is {style.dtype}, expected float32"
    assert torch.isfinite(raw).all() and torch.isfinite(style).all(), "non-finite outputs"
    norms = style.norm(dim=1).numpy()
    np.testing.assert_allclose(norms, 1.0, atol=1e-4, err_msg="style is not L2-normalised")


def check_backbone_batch_independent(subject: Subject) -> None:
    """An image's output does not depend on the other images in its batch."""
    net = build_backbone(subject)
    x = _batch((3, 2, 32, 48))
    raw3, style3 = _forward(net, x)
    raw1, style1 = _forward(net, x[1:2])
    np.testing.assert_allclose(raw1[0], raw3[1], rtol=1e-3, atol=1e-4,
                               err_msg="raw depends on the rest of the batch")
    np.testing.assert_allclose(style1[0], style3[1], rtol=1e-3, atol=1e-5)


def check_backbone_deterministic(subject: Subject) -> None:
    """Two passes over the same input give the same output; so do two builds (same seed)."""
    x = _batch((2, 2, 32, 32))
    net = build_backbone(subject)
    a, b = _forward(net, x), _forward(net, x)
    np.testing.assert_array_equal(a[0], b[0], err_msg="two passes differ")
    c = _forward(build_backbone(subject), x)
    np.testing.assert_allclose(a[0], c[0], rtol=1e-5, atol=1e-6,
                               err_msg="two builds with the same torch seed differ")


def check_backbone_odd_sizes(subject: Subject) -> None:
    """Images of odd sizes through run_network (it pads to 16): tiled and whole."""
    from ..inference import run_network

    net = build_backbone(subject)
    k = _decoder(subject).n_outputs
    image = _batch((2, *ODD_SHAPE), seed=2)
    for tile in (True, False):
        out = run_network(net, image, tile=tile, precision="fp32")
        assert out.raw.shape == (k, *ODD_SHAPE), f"tile={tile}: raw {out.raw.shape}"
        assert out.raw.dtype == np.float32 and np.isfinite(out.raw).all()
        assert out.style.ndim == 1 and abs(float(np.linalg.norm(out.style)) - 1) < 1e-4


def _saved_model(subject: Subject, net: Any, folder: Path) -> Any:
    from ..models import ModelInfo, read_metadata, save_model

    options = {k: v for k, v in subject.options.items()
               if isinstance(v, int | float | str | bool | list | None)}
    meta = {"name": "contract", "backbone": subject.name, "decoder": DEFAULT_DECODER,
            "reconstructor": DEFAULT_RECONSTRUCTOR, "n_channels": 2,
            "backbone_options": {"n_channels": 2, "n_outputs": _decoder(subject).n_outputs,
                                 **options},
            "diam_mean": 30.0, "diam_labels": 30.0}
    path = save_model(folder / "contract.pth", net, meta)
    return ModelInfo("contract", path, read_metadata(path))


def check_backbone_with_default_plugins(subject: Subject) -> None:
    """Saved, rebuilt by build_network (metadata checks and probe), and segmented with the
    default decoder and reconstructor: labels (H, W) uint32 on an odd-sized image."""
    from ..models import build_network
    from ..segmenter import Segmenter

    with tempfile.TemporaryDirectory() as tmp:
        info = _saved_model(subject, build_backbone(subject), Path(tmp))
        net = build_network(info, subject.reg)
        seg = Segmenter(info, net, _decoder(subject),
                        subject.reg.get("reconstructor", DEFAULT_RECONSTRUCTOR))
        result = seg.segment(disk_image(), diameter=30.0, precision="fp32")
    assert result.labels.shape == ODD_SHAPE and result.labels.dtype == np.uint32
    assert result.flows.shape == (2, *ODD_SHAPE) and result.cellprob.shape == ODD_SHAPE


def check_backbone_trains_and_reloads(subject: Subject) -> None:
    """A trainable backbone: one optimiser step changes the weights (gradients flow), and
    the saved weights reload into a new build with the same outputs. An inference-only
    backbone must name a torch backbone to train instead (``runs`` and ``base``)."""
    import torch

    from ..models import _default_option, build_network, is_inference_only, is_runtime_backbone

    factory = subject.obj()
    if is_inference_only(factory):
        base = subject.options.get("base") or _default_option(factory, "base")
        assert is_runtime_backbone(factory) and base, (
            "an inference-only backbone must declare runs and a base backbone to train")
        subject.reg.get("backbone", base)
        return
    net = build_backbone(subject)
    net.train()
    decoder = _decoder(subject)
    labels = disk_labels((48, 64))
    targets = torch.from_numpy(decoder.targets(labels)[None].astype(np.float32))
    x = torch.from_numpy(_batch((1, 2, 48, 64)))
    before = [p.detach().clone() for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.01)
    loss = decoder.loss(net(x)[0], targets)
    loss.backward()
    opt.step()
    after = [p.detach() for p in net.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True)), (
        "one training step left every weight unchanged (no gradient reaches them?)")
    net.eval()
    x_np = _batch((1, 2, 32, 48))
    with tempfile.TemporaryDirectory() as tmp:
        info = _saved_model(subject, net, Path(tmp))
        again = build_network(info, subject.reg)
        np.testing.assert_allclose(_forward(again, x_np)[0], _forward(net, x_np)[0],
                                   rtol=1e-5, atol=1e-6,
                                   err_msg="outputs changed after save and reload")


def check_backbone_matches_base(subject: Subject) -> None:
    """A runtime backbone computes what its torch base computes with the same weights."""
    from ..models import _default_option, is_runtime_backbone

    factory = subject.obj()
    if not is_runtime_backbone(factory):
        return
    base = subject.options.get("base") or _default_option(factory, "base")
    net = build_backbone(subject)
    runtime_keys = {p.name for p in inspect.signature(factory).parameters.values()
                    if p.kind is p.KEYWORD_ONLY}
    base_options = {k: v for k, v in subject.options.items() if k not in runtime_keys}
    torch_net = subject.reg.get("backbone", base)(
        n_channels=2, n_outputs=_decoder(subject).n_outputs, **base_options).float().eval()
    torch_net.load_state_dict(net.state_dict())
    x = _batch((2, 2, 48, 48), seed=3)
    raw, style = _forward(net, x)
    raw_t, style_t = _forward(torch_net, x)
    scale = float(np.abs(raw_t).max()) or 1.0
    assert float(np.abs(raw - raw_t).max()) <= 1e-3 * scale + 1e-4, (
        f"raw differs from base {base!r}'s by {float(np.abs(raw - raw_t).max()):.3g}")
    np.testing.assert_allclose(style, style_t, atol=1e-4)


def check_backbone_loads_cached(subject: Subject) -> None:
    """A backbone with ``load_cached``: once the core has loaded a weights file (and the
    module remembered it), ``load_cached`` serves it with the same facts and outputs, and
    ``build_network`` takes that module; a weights file never loaded is a miss (None)."""
    from ..inference import forward_batches
    from ..models import ModelInfo, build_network, read_metadata

    factory = subject.obj()
    load_cached = getattr(factory, "load_cached", None)
    if load_cached is None:
        return
    x = _batch((2, 2, 48, 64), seed=4)
    with tempfile.TemporaryDirectory() as tmp:
        # weights of a random seed: a backbone's cache may outlive this check, and must
        # not have seen these weights before
        seed = int.from_bytes(os.urandom(4), "little") >> 1
        info = _saved_model(subject, build_backbone(subject, seed=seed), Path(tmp))
        options = dict(info.metadata["backbone_options"])
        assert load_cached(info.weights, options) is None, "a hit for weights never loaded"
        first = build_network(info, subject.reg)  # the torch path; remembers the file
        want_raw, want_style = forward_batches(first, x, 2, "fp32")
        cached = load_cached(info.weights, options)
        assert cached is not None, "no hit for weights the core has loaded"
        net, facts = cached
        assert int(facts["n_channels"]) == 2, f"facts {facts}"
        raw, style = forward_batches(net, x, 2, "fp32")
        scale = float(np.abs(want_raw).max()) or 1.0
        assert float(np.abs(raw - want_raw).max()) <= 1e-4 * scale + 1e-5, "cached output differs"
        np.testing.assert_allclose(style, want_style, atol=1e-5)
        again = build_network(ModelInfo(info.name, info.weights, read_metadata(info.weights)),
                              subject.reg)
        assert type(again) is type(net), "build_network did not take the cached module"


# -- decoder checks ----------------------------------------------------------------------------
def check_decoder(subject: Subject) -> None:
    """n_outputs, targets, decode and loss keep the decoder contract."""
    import torch

    decoder = subject.obj()
    k = decoder.n_outputs
    assert isinstance(k, int) and k >= 1, f"n_outputs must be a positive int, got {k!r}"
    labels = disk_labels()
    t = np.asarray(decoder.targets(labels))
    assert t.ndim == 3 and t.shape[1:] == ODD_SHAPE and t.dtype == np.float32, (
        f"targets: {t.dtype} {t.shape}, expected float32 (T, {ODD_SHAPE[0]}, {ODD_SHAPE[1]})")
    assert np.isfinite(t).all()
    empty = np.asarray(decoder.targets(np.zeros(ODD_SHAPE, np.int32)))
    assert empty.shape == t.shape and np.isfinite(empty).all(), "targets of an empty image"
    raw = _batch((k, *ODD_SHAPE), seed=4)
    flows, cellprob = decoder.decode(raw)
    assert np.asarray(flows).shape == (2, *ODD_SHAPE), f"flows {np.asarray(flows).shape}"
    assert np.asarray(cellprob).shape == ODD_SHAPE, f"cellprob {np.asarray(cellprob).shape}"
    raw_t = torch.from_numpy(np.stack([raw, raw]))
    raw_t.requires_grad_(True)
    loss = decoder.loss(raw_t, torch.from_numpy(np.stack([t, t])))
    assert loss.ndim == 0 and torch.isfinite(loss), f"loss must be a finite scalar, got {loss}"
    loss.backward()
    assert raw_t.grad is not None and torch.isfinite(raw_t.grad).all(), "loss has no gradient"
    vec = getattr(decoder, "vector_channels", None)
    if vec is not None:
        assert len(vec) == 2 and all(0 <= c < t.shape[0] for c in vec), f"vector_channels {vec}"
    interp = getattr(decoder, "target_interpolation", None)
    if interp is not None:
        assert len(interp) == t.shape[0] and set(interp) <= {"nearest", "linear"}, (
            f"target_interpolation {interp} for {t.shape[0]} target channels")


# -- reconstructor checks ----------------------------------------------------------------------
def _flows_of(labels: np.ndarray, subject: Subject) -> tuple[np.ndarray, np.ndarray]:
    """Flows and cellprob the default decoder's targets describe for ``labels``."""
    decoder = subject.reg.get("decoder", DEFAULT_DECODER)
    t = decoder.targets(labels)
    cellprob = np.where(labels > 0, 4.0, -4.0).astype(np.float32)
    return np.ascontiguousarray(t[1:3], np.float32), cellprob


def _reconstructor_params(subject: Subject) -> dict[str, Any]:
    return {"niter": 200, "cellprob_threshold": 0.0, "flow_threshold": 0.4, "min_size": 15,
            **subject.options}


def check_reconstructor(subject: Subject) -> None:
    """Labels (H, W) integer, 1..N, background 0, deterministic; extra parameters accepted;
    nothing found where cellprob is negative everywhere."""
    recon = subject.obj()
    labels = disk_labels()
    flows, cellprob = _flows_of(labels, subject)
    params = _reconstructor_params(subject)
    out = np.asarray(recon(flows, cellprob, **params, unknown_parameter=1))
    assert out.shape == ODD_SHAPE, f"labels {out.shape}, expected {ODD_SHAPE}"
    assert np.issubdtype(out.dtype, np.integer), f"labels are {out.dtype}, expected integers"
    ids = np.unique(out)
    assert ids[0] == 0 and list(ids[1:]) == list(range(1, len(ids))), "labels not 1..N"
    assert len(ids) > 1, "no object found in clear disks"
    assert not out[cellprob < -3].any(), "labels where cellprob is strongly negative"
    again = np.asarray(recon(flows, cellprob, **params))
    np.testing.assert_array_equal(out, again, err_msg="two runs differ")
    np.asarray(recon(flows, cellprob, **params, interp=False))
    nothing = np.asarray(recon(flows, np.full(ODD_SHAPE, -5, np.float32), **params))
    assert nothing.shape == ODD_SHAPE and not nothing.any(), "objects from negative cellprob"


def check_reconstructor_warm_up(subject: Subject) -> None:
    """The optional ``warm_up()`` (see ``register_mask_reconstructors``): callable with no
    arguments from another thread (the segmenter runs it in one), without an error, and the
    labels afterwards are the same. A reconstructor without it passes."""
    recon = subject.obj()
    warm = getattr(recon, "warm_up", None)
    if warm is None:
        return
    assert callable(warm), "warm_up is not callable"
    flows, cellprob = _flows_of(disk_labels(), subject)
    params = _reconstructor_params(subject)
    before = np.asarray(recon(flows, cellprob, **params))
    failure: list[BaseException] = []

    def run() -> None:
        try:
            warm()
        except BaseException as exc:  # noqa: BLE001 - reported below, in the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert not failure, f"warm_up() failed: {type(failure[0]).__name__}: {failure[0]}"
    np.testing.assert_array_equal(np.asarray(recon(flows, cellprob, **params)), before,
                                  err_msg="labels changed after warm_up()")


# -- running ------------------------------------------------------------------------------------
CHECKS: dict[str, list[Callable[[Subject], None]]] = {
    "backbone": [check_backbone_forward, check_backbone_batch_independent,
                 check_backbone_deterministic, check_backbone_odd_sizes,
                 check_backbone_with_default_plugins, check_backbone_trains_and_reloads,
                 check_backbone_matches_base, check_backbone_loads_cached],
    "decoder": [check_decoder],
    "reconstructor": [check_reconstructor, check_reconstructor_warm_up],
}


def run_checks(kind: str, name: str, options: dict[str, Any] | None = None,
               registry: PluginRegistry | None = None) -> Iterator[tuple[str, str | None]]:
    """(check name, None if it passed else the failure) for each check of ``kind``."""
    subject = Subject(kind, name, dict(options or {}), registry)
    subject.obj()  # an unknown name fails here, clearly
    for check in CHECKS[kind]:
        try:
            check(subject)
        except Exception as exc:  # noqa: BLE001 - reported, like a test failure
            yield check.__name__, f"{type(exc).__name__}: {exc}"
        else:
            yield check.__name__, None


def _contract_class(kind: str) -> type:
    def make(check: Callable[[Subject], None]) -> Callable[[Any], None]:
        def test(self: Any) -> None:
            check(Subject(kind, getattr(self, kind), dict(self.options), self.registry))

        test.__name__ = "test_" + check.__name__.removeprefix("check_")
        test.__doc__ = check.__doc__
        return test

    attrs: dict[str, Any] = {kind: "", "options": {}, "registry": None,
                             "__annotations__": {"options": ClassVar[dict[str, Any]]}}
    for check in CHECKS[kind]:
        attrs["test_" + check.__name__.removeprefix("check_")] = make(check)
    attrs["__doc__"] = (f"pytest contract tests for a {kind}: subclass, set ``{kind} = NAME`` "
                        f"(and ``options``).")
    return type(f"{kind.capitalize()}Contract", (), attrs)


BackboneContract = _contract_class("backbone")
DecoderContract = _contract_class("decoder")
ReconstructorContract = _contract_class("reconstructor")


def subjects_from_env(value: str | None = None) -> list[tuple[str, str, dict[str, Any]]]:
    """``CELLPLUG_CONTRACT`` ("KIND:NAME[:{json}];...") as (kind, name, options) items."""
    value = os.environ.get("CELLPLUG_CONTRACT", "") if value is None else value
    out = []
    for item in filter(None, (s.strip() for s in value.split(";"))):
        kind, _, rest = item.partition(":")
        name, _, options = rest.partition(":")
        if kind not in CHECKS or not name:
            raise ValueError(f"CELLPLUG_CONTRACT item {item!r}: expected KIND:NAME with KIND "
                             f"one of {', '.join(CHECKS)}")
        out.append((kind, name, json.loads(options) if options else {}))
    return out


__all__ = [
    "CHECKS", "BackboneContract", "DecoderContract", "ReconstructorContract", "Subject",
    "disk_image", "disk_labels", "run_checks", "subjects_from_env",
]
