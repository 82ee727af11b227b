"""``pytest --pyargs cellplug.testing``: the contract checks of the plugins named in
``CELLPLUG_CONTRACT`` (e.g. ``backbone:openvino;reconstructor:my-recon``); skipped when unset."""

from __future__ import annotations

import pytest

from cellplug.testing import CHECKS, Subject, subjects_from_env

CASES = [(kind, name, options, check) for kind, name, options in subjects_from_env()
         for check in CHECKS[kind]]


@pytest.mark.skipif(not CASES, reason="set CELLPLUG_CONTRACT=KIND:NAME[;...] to check plugins")
@pytest.mark.parametrize(
    ("kind", "name", "options", "check"), CASES or [("", "", {}, None)],
    ids=[f"{k}:{n}:{c.__name__}" for k, n, _, c in CASES] or ["none"],
)
def test_contract(kind: str, name: str, options: dict, check) -> None:
    check(Subject(kind, name, options))
