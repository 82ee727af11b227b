"""The plugin manager: entry points, validation, isolation of failing plugins.

The example and broken plugins are the test dists in ``tests/plugins/dists/``; ``nox -s
tests`` installs them beside cellplug. Tests that need them fail (not skip) without them.
"""

from __future__ import annotations

import importlib.metadata
import sys
import types
import warnings

import numpy as np
import pytest

from cellplug import hookimpl
from cellplug.errors import CellplugError
from cellplug.hookspecs import HOOK_KINDS
from cellplug.plugins import (
    PluginLoadWarning,
    PluginRegistry,
    get_registry,
    load_plugins,
    set_registry,
)

BUNDLED = {
    ("backbone", "cellpose-unet"): "unet",
    ("decoder", "cellpose-flows"): "flows",
    ("reconstructor", "cellpose-dynamics"): "flows",
    ("selector", "nearest-centroid"): "selectors",
    ("source", "mask-folder"): "sources",
}
NOT_INSTALLED = (
    "the test plugin dists are not installed: run `nox -s tests`, or "
    "`pip install tests/plugins/dists/*/` into this environment"
)


def _loaded() -> PluginRegistry:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginLoadWarning)
        return load_plugins()


@pytest.fixture(scope="module")
def registry() -> PluginRegistry:
    return _loaded()


def _plugin(name: str, **hooks) -> types.SimpleNamespace:
    """A plugin object whose attributes are the given hook implementations."""
    return types.SimpleNamespace(__name__=name, **{k: hookimpl(v) for k, v in hooks.items()})


def _add(registry: PluginRegistry, module, name: str):
    with pytest.warns(PluginLoadWarning) as record:
        status = registry.add_module(module, name)
    return status, [str(w.message) for w in record]


# -- entry points: bundled defaults, the example and the broken test plugins ---------------
def test_bundled_plugins_come_from_the_cellplug_distribution(registry):
    for (kind, name), plugin in BUNDLED.items():
        reg = registry.registrations(kind)[name]
        assert reg.plugin == plugin
        assert reg.distribution == "cellplug"
        assert reg.version == importlib.metadata.version("cellplug")
    for plugin in set(BUNDLED.values()) | {"zoo"}:
        assert registry.statuses[plugin].ok, registry.statuses[plugin].error


def test_example_plugin_is_listed_beside_the_defaults(registry):
    assert "example" in registry.statuses, NOT_INSTALLED
    status = registry.statuses["example"]
    assert status.ok, status.error
    assert status.distribution == "cellplug-example-plugin"
    assert status.version == "0.1.0"
    assert sorted(status.provides) == [
        ("backbone", "example-tiny"), ("command", "example-hello"),
        ("reconstructor", "example-threshold"), ("selector", "first-model"),
        ("source", "example-npz"),
    ]
    reg = registry.registrations("selector")["first-model"]
    assert (reg.plugin, reg.distribution) == ("example", "cellplug-example-plugin")


def test_broken_plugin_is_recorded_and_the_rest_still_work(registry):
    assert "broken" in registry.statuses, NOT_INSTALLED
    status = registry.statuses["broken"]
    assert not status.ok
    assert status.distribution == "cellplug-broken-plugin"
    assert status.error == (
        "import failed: ModuleNotFoundError: No module named 'cellplug_missing_dependency'"
    )
    assert status.provides == []
    row = [r for r in registry.rows() if r["plugin"] == "broken"]
    assert row == [{
        "kind": "?", "name": "broken", "plugin": "broken",
        "distribution": "cellplug-broken-plugin", "version": "0.1.0",
        "status": f"error: {status.error}",
    }]
    # everything else is usable
    assert registry.get("backbone", "cellpose-unet") is not None
    assert registry.get("selector", "first-model") is not None


def test_broken_plugin_warns_once_with_one_line():
    with pytest.warns(PluginLoadWarning) as record:
        load_plugins()
    messages = [str(w.message) for w in record if "'broken'" in str(w.message)]
    assert len(messages) == 1, NOT_INSTALLED
    assert "\n" not in messages[0]
    assert "cellplug_missing_dependency" in messages[0]


def test_example_backbone_satisfies_the_backbone_contract(registry):
    import torch

    factory = registry.get("backbone", "example-tiny")
    net = factory(n_channels=2, n_outputs=3).eval()
    with torch.no_grad():
        raw, style = net(torch.rand(2, 2, 32, 48))
    assert raw.shape == (2, 3, 32, 48) and raw.dtype == torch.float32
    assert style.ndim == 2 and style.shape[0] == 2
    np.testing.assert_allclose(style.norm(dim=1).numpy(), 1.0, rtol=1e-5)
    assert "diam_mean" in net.state_dict()


def test_example_selector_and_source_work_through_the_core(registry, tmp_path):
    from cellplug.annotations import read_annotations

    models = [types.SimpleNamespace(name="a"), types.SimpleNamespace(name="b")]
    assert registry.get("selector", "first-model")(np.zeros((3, 4)), models) == ["a"] * 3

    labels = np.zeros((8, 8), np.uint16)
    labels[2:5, 2:5] = 1
    np.savez(tmp_path / "cells.npz", image=np.ones((8, 8), np.uint8), labels=labels)
    (ann,) = read_annotations(tmp_path, registry=registry)  # auto-detected: example-npz
    assert ann.stem == "cells"
    np.testing.assert_array_equal(ann.labels, labels)


def test_entry_points_that_raise_anything_at_import_are_isolated(tmp_path, monkeypatch):
    (tmp_path / "cp_exits.py").write_text("raise SystemExit(3)\n")
    (tmp_path / "cp_syntax.py").write_text("def broken(:\n")
    (tmp_path / "cp_good.py").write_text(
        "from cellplug import hookimpl\n\n"
        "@hookimpl\ndef register_models(register):\n    register('good-model', 'x.pth')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = importlib.metadata.EntryPoints([
        importlib.metadata.EntryPoint("exits", "cp_exits", "test-group"),
        importlib.metadata.EntryPoint("syntax", "cp_syntax", "test-group"),
        importlib.metadata.EntryPoint("good", "cp_good", "test-group"),
        importlib.metadata.EntryPoint("good", "cp_syntax", "test-group"),  # duplicate name
        importlib.metadata.EntryPoint("missing", "cp_no_such_module", "test-group"),
    ])
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: eps)
    reg = PluginRegistry()
    with pytest.warns(PluginLoadWarning):
        reg.load_entry_points("test-group")
    errors = {name: s.error for name, s in reg.statuses.items()}
    assert errors["exits"] == "import failed: SystemExit: 3"
    assert errors["syntax"].startswith("import failed: SyntaxError")
    assert errors["missing"].startswith("import failed: ModuleNotFoundError")
    assert errors["good"] is None
    assert [e for n, e in errors.items() if n.startswith("good ")] == [
        "duplicate plugin name 'good' (already used by cp_good)"
    ]
    assert reg.names("model") == ["good-model"]
    for mod in ("cp_exits", "cp_syntax", "cp_good"):
        sys.modules.pop(mod, None)


# -- validation ---------------------------------------------------------------------------
def test_hook_with_extra_argument_is_rejected_with_clear_message():
    reg = PluginRegistry()
    status, warned = _add(reg, _plugin("wrong", register_backbones=lambda register, extra: None),
                          "wrong")
    assert status.error == (
        "invalid hook implementation register_backbones(register, extra): it must take "
        "exactly one argument, register (the hookspec is register_backbones(register))"
    )
    assert len(warned) == 1 and "'wrong'" in warned[0] and status.error in warned[0]
    assert reg.statuses["wrong"] is status
    assert not reg.pm.has_plugin("wrong")
    assert reg.rows() == [{
        "kind": "?", "name": "wrong", "plugin": "wrong", "distribution": None,
        "version": None, "status": f"error: {status.error}",
    }]


@pytest.mark.parametrize(
    ("hook", "signature"),
    [
        (lambda: None, "()"),
        (lambda reg: None, "(reg)"),
        (lambda *, register: None, "(*, register)"),
        (lambda **kwargs: None, "(**kwargs)"),
    ],
)
def test_hook_without_register_argument_is_rejected(hook, signature):
    reg = PluginRegistry()
    status, _ = _add(reg, _plugin("wrong", register_models=hook), "wrong")
    assert status.error.startswith(f"invalid hook implementation register_models{signature}: ")
    assert reg.names("model") == []


def test_valid_and_invalid_hooks_in_one_plugin_reject_the_whole_plugin():
    def ok(register):
        register("half", object())

    reg = PluginRegistry()
    status, _ = _add(
        reg, _plugin("half", register_backbones=ok, register_models=lambda a, b: None), "half"
    )
    assert not status.ok
    assert reg.names("backbone") == []
    assert reg.pm.get_plugins() == set()


def test_unknown_hook_name_is_rejected_with_a_suggestion():
    reg = PluginRegistry()
    status, _ = _add(reg, _plugin("typo", register_backbone=lambda register: None), "typo")
    assert status.error.startswith(
        "implements unknown hook(s) register_backbone (did you mean register_backbones?); "
        "known hooks: register_annotation_sources, register_backbones,"
    )


def test_specname_and_optional_arguments_are_accepted():
    @hookimpl(specname="register_models")
    def models(register, unused=1):
        register("m", "m.pth")

    module = types.SimpleNamespace(__name__="aliased", provide_models=models)
    status = PluginRegistry().add_module(module, "aliased")
    assert status.ok, status.error


def test_a_module_object_is_a_plugin():
    module = types.ModuleType("handmade")
    module.register_flow_decoders = hookimpl(lambda register: register("d", 42))
    reg = PluginRegistry()
    status = reg.add_module(module, "handmade", distribution="cellplug")
    assert status.ok and status.module == "handmade"
    assert status.version == importlib.metadata.version("cellplug")
    assert reg.get("decoder", "d") == 42
    assert status.provides == [("decoder", "d")]


def test_the_same_plugin_name_twice_keeps_the_first():
    reg = PluginRegistry()
    reg.add_module(_plugin("a", register_models=lambda register: register("one", 1)), "p")
    status, _ = _add(reg, _plugin("b", register_models=lambda register: register("two", 2)), "p")
    assert status.error == "duplicate plugin name 'p'"
    assert reg.names("model") == ["one"]
    assert reg.statuses["p"].ok


# -- collection ----------------------------------------------------------------------------
def test_hook_that_raises_is_isolated():
    def boom(register):
        register("half-registered", object())
        raise RuntimeError("no GPU\nfound")

    reg = PluginRegistry()
    reg.add_module(_plugin("good", register_backbones=lambda register: register("net", 1)), "good")
    reg.add_module(_plugin("bad", register_backbones=boom,
                           register_models=lambda register: register("bad-model", 2)), "bad")
    with pytest.warns(PluginLoadWarning, match="'bad' skipped: register_backbones raised"):
        assert reg.names("backbone") == ["net"]
    status = reg.statuses["bad"]
    assert status.error.startswith("register_backbones raised RuntimeError: no GPU found (")
    assert "test_plugins.py:" in status.error
    assert status.provides == []
    # nothing from the failed plugin is kept, of any kind
    assert reg.names("model") == []
    assert {r["name"]: r["status"] for r in reg.rows()} == {
        "net": "ok", "bad": f"error: {status.error}",
    }


def test_register_with_bad_name_is_isolated():
    reg = PluginRegistry()
    reg.add_module(_plugin("bad", register_models=lambda register: register("", 1)), "bad")
    with pytest.warns(PluginLoadWarning):
        assert reg.names("model") == []
    assert "model names must be non-empty strings" in reg.statuses["bad"].error


def test_duplicate_names_keep_the_first_with_a_warning():
    reg = PluginRegistry()
    first, second = object(), object()
    reg.add_module(_plugin("1", register_backbones=lambda register: register("net", first)), "one")
    reg.add_module(_plugin("2", register_backbones=lambda register: register("net", second)), "two")
    with pytest.warns(PluginLoadWarning) as record:
        assert reg.get("backbone", "net") is first
    assert [str(w.message) for w in record] == [
        "cellplug plugin 'two': backbone 'net' is already provided by plugin 'one'; "
        "keeping the first"
    ]
    assert reg.registrations("backbone")["net"].plugin == "one"
    assert reg.statuses["two"].ok and reg.statuses["two"].provides == []


def test_bundled_defaults_win_over_a_later_plugin(registry):
    reg = _loaded()
    reg.add_module(_plugin("impostor", register_backbones=lambda register:
                           register("cellpose-unet", object())), "impostor")
    with pytest.warns(PluginLoadWarning, match="already provided by plugin 'unet'"):
        assert reg.registrations("backbone")["cellpose-unet"].plugin == "unet"


def test_bundled_defaults_load_before_other_distributions(registry):
    order = list(registry.statuses)
    bundled = [n for n in order if registry.statuses[n].distribution == "cellplug"]
    assert order[: len(bundled)] == bundled
    assert {"flows", "selectors", "sources", "unet", "zoo"} <= set(bundled)


def test_registrations_are_recollected_after_a_change():
    reg = PluginRegistry()
    assert reg.names("model") == []
    reg.add_module(_plugin("late", register_models=lambda register: register("late", 1)), "late")
    assert reg.names("model") == ["late"]


# -- lookup ----------------------------------------------------------------------------------
def test_get_unknown_name_lists_what_is_available(registry):
    with pytest.raises(CellplugError) as err:
        registry.get("backbone", "resnet")
    assert str(err.value).startswith("unknown backbone 'resnet'; available: ")
    assert "cellpose-unet" in str(err.value)


def test_get_when_nothing_is_registered():
    with pytest.raises(CellplugError, match=r"^unknown model 'x'; available: none$"):
        PluginRegistry().get("model", "x")


def test_unknown_kind_is_an_error():
    with pytest.raises(CellplugError, match="unknown plugin kind 'backbones'; expected one of"):
        PluginRegistry().registrations("backbones")


def test_rows_filter_by_kind(registry):
    rows = registry.rows(["selector"])
    assert {r["name"] for r in rows if r["status"] == "ok"} >= {"nearest-centroid", "first-model"}
    assert {r["kind"] for r in rows} <= {"selector", "?"}
    assert set(HOOK_KINDS) >= {r["kind"] for r in registry.rows() if r["kind"] != "?"}


def test_process_wide_registry_can_be_replaced():
    mine = PluginRegistry()
    try:
        set_registry(mine)
        assert get_registry() is mine
        set_registry(None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PluginLoadWarning)
            fresh = get_registry()
        assert fresh is not mine and "unet" in fresh.statuses
        assert get_registry() is fresh
    finally:
        set_registry(None)
