"""The plugin manager: loads the ``cellplug`` entry-point group and collects registrations.

The core never imports a plugin package directly; it asks this module for a backbone,
decoder, ... by name. A plugin that fails to import, fails hook validation, or raises inside
a hook is recorded with its error and skipped: the remaining plugins keep working.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.metadata
import inspect
import traceback
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy

from . import hookspecs
from .errors import CellplugError

ENTRY_POINT_GROUP = "cellplug"


class PluginLoadWarning(UserWarning):
    """A plugin could not be loaded or registered; it is skipped."""


@dataclass
class PluginStatus:
    """What became of one plugin (one entry point, or one module registered by hand)."""

    name: str
    module: str
    distribution: str | None = None
    version: str | None = None
    error: str | None = None
    provides: list[tuple[str, str]] = field(default_factory=list)  # (kind, name)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Registration:
    """One named thing a plugin registered (a backbone, a model, ...)."""

    kind: str
    name: str
    obj: Any
    plugin: str
    distribution: str | None
    version: str | None


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return " ".join(text.split())


def _entry_point_order(ep: importlib.metadata.EntryPoint) -> tuple[bool, str, str]:
    dist = getattr(ep, "dist", None)
    dist_name = dist.name if dist is not None else ""
    return (dist_name != "cellplug", ep.name, dist_name)


def _hookimpls(module: Any) -> list[tuple[str, Any]]:
    """(hook name, function) for every attribute marked with ``cellplug.hookimpl``."""
    found = []
    for attr in dir(module):
        try:
            func = getattr(module, attr, None)
            opts = getattr(func, "cellplug_impl", None)
        except Exception:  # noqa: BLE001 - an odd attribute is not a hook implementation
            continue
        if isinstance(opts, dict):
            found.append((opts.get("specname") or attr, func))
    return found


def _static_errors(module: Any) -> str | None:
    """Why ``module``'s hook implementations cannot work, or ``None``.

    Catches what pluggy lets through: hooks that match no hookspec (typos; pluggy allows
    hooks to be declared later) and implementations that do not take ``register``. The
    messages name the hook and the expected signature.
    """
    known = set(hookspecs.HOOK_KINDS.values())
    impls = _hookimpls(module)
    unknown = sorted(name for name, _ in impls if name not in known)
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=1)
            hints.append(f"{name} (did you mean {close[0]}?)" if close else name)
        return (
            f"implements unknown hook(s) {', '.join(hints)}; "
            f"known hooks: {', '.join(sorted(known))}"
        )
    for name, func in impls:
        try:
            sig = inspect.signature(func)
        except (TypeError, ValueError):
            continue  # left to pluggy
        params = [
            p for p in sig.parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.default is p.empty
        ]
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        if len(params) != 1 or params[0].name != "register" or params[0].kind not in positional:
            return (
                f"invalid hook implementation {name}{sig}: it must take exactly one "
                f"argument, register (the hookspec is {name}(register))"
            )
    return None


class PluginRegistry:
    """A pluggy ``PluginManager`` plus what its plugins registered.

    Build one with :func:`load_plugins` (entry points) or register modules by hand with
    :meth:`add_module` (tests, notebooks). Registrations are collected lazily on first use
    and again after every change.
    """

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("cellplug")
        self.pm.add_hookspecs(hookspecs)
        self.statuses: dict[str, PluginStatus] = {}
        self._registrations: dict[str, dict[str, Registration]] | None = None

    # -- loading -----------------------------------------------------------------------
    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Import and register every entry point of ``group``; failures are recorded.

        The bundled defaults (distribution ``cellplug``) load first, then every other
        distribution's entry points by name, so that when two plugins register the same
        name the default keeps it (see :meth:`registrations`).
        """
        eps = importlib.metadata.entry_points(group=group)
        for ep in sorted(eps, key=_entry_point_order):
            dist = getattr(ep, "dist", None)
            status = PluginStatus(
                name=ep.name,
                module=ep.value,
                distribution=dist.name if dist is not None else None,
                version=dist.version if dist is not None else None,
            )
            if ep.name in self.statuses:
                other = self.statuses[ep.name]
                status.error = (
                    f"duplicate plugin name {ep.name!r} (already used by "
                    f"{other.distribution or other.module})"
                )
                self._fail(status)
                continue
            try:
                module = ep.load()
            except BaseException as exc:  # noqa: BLE001 - a plugin may raise anything
                if isinstance(exc, KeyboardInterrupt):
                    raise
                status.error = f"import failed: {_one_line(exc)}"
                self._fail(status)
                continue
            self._register(module, status)

    def add_module(
        self, module: ModuleType | object, name: str, distribution: str | None = None
    ) -> PluginStatus:
        """Register an already imported plugin module (or object) under ``name``.

        Returns its :class:`PluginStatus`; a rejected plugin has ``error`` set (and a
        :class:`PluginLoadWarning` is issued), it never raises.
        """
        label = getattr(module, "__name__", None) or f"<{type(module).__name__} object>"
        status = PluginStatus(name=name, module=str(label), distribution=distribution)
        if distribution is not None:
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                status.version = importlib.metadata.version(distribution)
        self._register(module, status)
        return status

    def _register(self, module: Any, status: PluginStatus) -> None:
        if status.name in self.statuses or self.pm.has_plugin(status.name):
            status.error = f"duplicate plugin name {status.name!r}"
            self._fail(status)
            return
        error = _static_errors(module)
        if error is None:
            try:
                self.pm.register(module, name=status.name)
            except pluggy.PluginValidationError as exc:
                error = f"invalid hook implementation: {_one_line(exc)}"
            except ValueError as exc:  # the same object is already registered under another name
                error = _one_line(exc)
            else:
                error = self._check_signatures(status.name)
        if error is not None:
            # pluggy may have added some of the plugin's hooks before rejecting another one
            if self.pm.has_plugin(status.name):
                self.pm.unregister(name=status.name)
            status.error = error
            self._fail(status)
            return
        self.statuses[status.name] = status
        self._registrations = None

    def _check_signatures(self, plugin_name: str) -> str | None:
        """What pluggy accepted must also be callable as ``hook(register)``."""
        plugin = self.pm.get_plugin(plugin_name)
        for caller in self.pm.get_hookcallers(plugin) or []:
            for impl in caller.get_hookimpls():
                if impl.plugin_name != plugin_name:
                    continue
                if impl.hookwrapper or impl.wrapper:
                    return f"{caller.name}: hook wrappers are not supported"
                if tuple(impl.argnames) != ("register",):
                    got = ", ".join(impl.argnames)
                    return (
                        f"invalid hook implementation {caller.name}({got}): it must take "
                        f"exactly one argument, register (the hookspec is "
                        f"{caller.name}(register))"
                    )
        return None

    def _fail(self, status: PluginStatus) -> None:
        key = status.name
        if key in self.statuses:  # keep the first plugin of that name, still report this one
            key = f"{status.name} ({status.distribution or status.module})"
        self.statuses.setdefault(key, status)
        warnings.warn(
            f"cellplug plugin {status.name!r} ({status.module}) skipped: {status.error}",
            PluginLoadWarning,
            stacklevel=3,
        )

    # -- collecting ----------------------------------------------------------------------
    def _collect(self) -> dict[str, dict[str, Registration]]:
        regs: dict[str, dict[str, Registration]] = {k: {} for k in hookspecs.HOOK_KINDS}
        for status in self.statuses.values():
            status.provides.clear()
        order = {name: i for i, name in enumerate(self.statuses)}
        for kind, hook_name in hookspecs.HOOK_KINDS.items():
            hook = getattr(self.pm.hook, hook_name)
            # Call each implementation on its own so that one raising does not hide the
            # rest, in plugin registration order (pluggy itself calls the last one first).
            impls = sorted(hook.get_hookimpls(), key=lambda i: order.get(i.plugin_name, len(order)))
            for impl in impls:
                status = self.statuses.get(impl.plugin_name)
                if status is None or not status.ok:
                    continue

                def register(name: str, obj: Any, *, _kind=kind, _status=status) -> None:
                    if not isinstance(name, str) or not name:
                        raise CellplugError(
                            f"{_kind} names must be non-empty strings, got {name!r}"
                        )
                    if name in regs[_kind]:
                        other = regs[_kind][name].plugin
                        warnings.warn(
                            f"cellplug plugin {_status.name!r}: {_kind} {name!r} is already "
                            f"provided by plugin {other!r}; keeping the first",
                            PluginLoadWarning,
                            stacklevel=2,
                        )
                        return
                    regs[_kind][name] = Registration(
                        _kind, name, obj, _status.name, _status.distribution, _status.version
                    )
                    _status.provides.append((_kind, name))

                try:
                    impl.function(register)
                except Exception as exc:  # noqa: BLE001 - report, never crash
                    status.error = f"{hook_name} raised {_one_line(exc)}"
                    tb = traceback.extract_tb(exc.__traceback__)
                    if tb:
                        status.error += f" ({tb[-1].filename}:{tb[-1].lineno})"
                    for k in regs:  # drop what the failing plugin registered so far
                        regs[k] = {n: r for n, r in regs[k].items() if r.plugin != status.name}
                    status.provides.clear()
                    warnings.warn(
                        f"cellplug plugin {status.name!r} skipped: {status.error}",
                        PluginLoadWarning,
                        stacklevel=2,
                    )
        return regs

    def registrations(self, kind: str) -> dict[str, Registration]:
        """All registrations of ``kind`` (one of :data:`cellplug.hookspecs.HOOK_KINDS`)."""
        if kind not in hookspecs.HOOK_KINDS:
            raise CellplugError(
                f"unknown plugin kind {kind!r}; expected one of {', '.join(hookspecs.HOOK_KINDS)}"
            )
        if self._registrations is None:
            self._registrations = self._collect()
        return self._registrations[kind]

    def get(self, kind: str, name: str) -> Any:
        """The object registered as ``name`` of ``kind``; a clear error if there is none."""
        regs = self.registrations(kind)
        if name not in regs:
            available = ", ".join(sorted(regs)) or "none"
            raise CellplugError(f"unknown {kind} {name!r}; available: {available}")
        return regs[name].obj

    def names(self, kind: str) -> list[str]:
        return sorted(self.registrations(kind))

    def rows(self, kinds: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """One row per registration, plus one per failed plugin (``status`` = its error)."""
        kinds = list(kinds) if kinds is not None else list(hookspecs.HOOK_KINDS)
        rows = []
        for kind in kinds:
            for reg in self.registrations(kind).values():
                rows.append(
                    {
                        "kind": kind,
                        "name": reg.name,
                        "plugin": reg.plugin,
                        "distribution": reg.distribution,
                        "version": reg.version,
                        "status": "ok",
                    }
                )
        for status in self.statuses.values():
            if not status.ok:
                rows.append(
                    {
                        "kind": "?",
                        "name": status.name,
                        "plugin": status.name,
                        "distribution": status.distribution,
                        "version": status.version,
                        "status": f"error: {status.error}",
                    }
                )
        return rows


_registry: PluginRegistry | None = None


def load_plugins() -> PluginRegistry:
    """A fresh registry with every installed ``cellplug`` entry point loaded."""
    registry = PluginRegistry()
    registry.load_entry_points()
    return registry


def get_registry() -> PluginRegistry:
    """The process-wide registry, loaded from entry points on first use."""
    global _registry
    if _registry is None:
        _registry = load_plugins()
    return _registry


def set_registry(registry: PluginRegistry | None) -> None:
    """Replace the process-wide registry (``None``: reload from entry points on next use)."""
    global _registry
    _registry = registry
