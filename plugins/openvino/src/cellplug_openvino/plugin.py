"""Registers the ``openvino`` backbone. Importing this module imports neither torch nor
OpenVINO, so ``cellplug plugins list`` stays fast."""

from __future__ import annotations

from typing import Any

from cellplug import hookimpl


def build_openvino(
    n_channels: int = 2,
    n_outputs: int = 3,
    *,
    base: str = "cellpose-unet",
    precision: str = "auto",
    threads: int | None = None,
    cache_dir: str | None = None,
    calibration: str | None = None,
    **base_options: Any,
) -> Any:
    """The ``openvino`` backbone: backbone ``base`` (a torch backbone) run by OpenVINO.

    The module returned has ``base``'s class, parameters and state-dict layout, so the
    weights of any ``base`` model load into it unchanged. Its ``forward`` runs an OpenVINO
    model compiled from it in inference (no-grad) mode, and the torch ``forward`` otherwise.

    Options: ``precision`` ``"auto"`` (bfloat16 when the caller runs under bfloat16
    autocast, i.e. ``--precision bf16`` or ``auto`` on a CPU with native bfloat16; else
    float32), ``"f32"`` or ``"bf16"``; ``threads``: OpenVINO's inference threads (default:
    torch's thread count at the time of the first pass); ``cache_dir``: where exported models
    are kept (default ``$CELLPLUG_CACHE/openvino``, ``~/.cache/cellplug/openvino``).
    ``precision="int8"`` quantises the network (NNCF post-training quantisation, needs the
    ``nncf`` package) and needs ``calibration``: an image, or a folder of images like the ones
    to segment; the quantised model is cached per weights and calibration images. Other
    options go to ``base``'s factory.
    """
    from cellplug.plugins import get_registry

    from .runtime import accelerate

    factory = get_registry().get("backbone", base)
    if getattr(factory, "runs", None) is not None:
        raise ValueError(f"base {base!r} is itself a runtime backbone; give a torch backbone")
    net = factory(n_channels=n_channels, n_outputs=n_outputs, **base_options)
    return accelerate(net, base=base, precision=precision, threads=threads, cache_dir=cache_dir,
                      calibration=calibration)


def load_cached(weights: Any, options: dict[str, Any]) -> Any:
    """The contract's ``load_cached``: the export of this weights file, run without torch
    (:func:`cellplug_openvino.engine.load_cached`), or None on a cache miss."""
    from .engine import load_cached as load

    return load(weights, options)


# The backbone contract's optional declarations (cellplug.hookspecs.register_backbones):
# it cannot be trained (cellplug train trains ``base`` in torch instead), it runs the
# weights of any torch backbone, named by its ``base`` option, and it loads a weights file
# it has exported before without torch.
build_openvino.inference_only = True  # type: ignore[attr-defined]
build_openvino.runs = "*"  # type: ignore[attr-defined]
build_openvino.load_cached = load_cached  # type: ignore[attr-defined]


@hookimpl
def register_backbones(register):
    register("openvino", build_openvino)
