"""Keep OpenVINO and NNCF from sending usage telemetry on cellplug's behalf.

By default ``import openvino`` sends a usage event to Google Analytics (from a process forked
by a background thread), ``openvino.convert_model`` and NNCF send more, and all of them write
a client id under ``~/intel``, unless a consent file there says no. Someone segmenting with
``--backbone openvino`` asked OpenVINO for nothing, so cellplug uses the stand-ins that
OpenVINO and NNCF fall back to themselves when the ``openvino-telemetry`` package is not
installed:

- :func:`import_openvino`: when cellplug is the first to import OpenVINO in a process, it
  imports it with ``openvino_telemetry`` unavailable. OpenVINO's converter decides at import
  time, so it keeps its stand-in for the rest of the process.
- :func:`no_telemetry`: around cellplug's export and int8 quantisation, in case OpenVINO or
  NNCF were imported before with telemetry; restored when the block ends, so a program that
  uses OpenVINO itself keeps its own choice there.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

# the modules of OpenVINO's converter that bind the telemetry package as ``tm`` at import
OVC_MODULES = ("openvino.tools.ovc.convert_impl", "openvino.tools.ovc.telemetry_utils",
               "openvino.tools.ovc.utils", "openvino.tools.ovc.main")
# NNCF's telemetry object, bound at import by its wrapper and by its decorator
NNCF_MODULES = ("nncf.telemetry.wrapper", "nncf.telemetry.decorator")
_ABSENT = object()


@contextlib.contextmanager
def _telemetry_unimportable() -> Iterator[None]:
    """``import openvino_telemetry`` raises ImportError within the block (for everyone: not
    thread-safe against other code importing it at that moment)."""
    package = sys.modules.get("openvino_telemetry", _ABSENT)
    sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if package is _ABSENT:
            sys.modules.pop("openvino_telemetry", None)
        else:
            sys.modules["openvino_telemetry"] = package  # type: ignore[assignment]


def import_openvino() -> Any:
    """The ``openvino`` module, imported without its telemetry if nobody imported it yet."""
    if "openvino" not in sys.modules:
        with _telemetry_unimportable():
            import openvino  # noqa: F401
    return sys.modules["openvino"]


@contextlib.contextmanager
def no_telemetry() -> Iterator[None]:
    """Within the block, OpenVINO's converter and NNCF send nothing and write nothing under
    ``~/intel``. An NNCF first imported inside the block keeps its stand-in (NNCF, too,
    decides at import time)."""
    import_openvino()
    from openvino.tools.ovc import telemetry_stub

    saved: list[tuple[Any, str, Any]] = []
    try:
        for name in OVC_MODULES:
            module = sys.modules.get(name)
            if module is not None and hasattr(module, "tm"):
                saved.append((module, "tm", module.tm))
                module.tm = telemetry_stub
        for name in NNCF_MODULES:
            module = sys.modules.get(name)
            if module is not None and hasattr(module, "telemetry"):
                from nncf.telemetry.wrapper import NNCFTelemetryStub

                saved.append((module, "telemetry", module.telemetry))
                module.telemetry = NNCFTelemetryStub()
        with _telemetry_unimportable():
            yield
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)
