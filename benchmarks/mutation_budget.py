"""pytest plugin for the mutation run (benchmarks/mutation.py stages it as ``-p mutation_budget``).

mutmut runs, for each mutant, the tests that called the mutated function in its stats run.
Functions on the main path (tiling, normalisation, the mask step) are called by nearly every
test, so a mutant that survives would cost the whole fast suite. This plugin keeps a
mutant's tests within a budget of recorded seconds (``MUTATION_TEST_BUDGET``, default 3):
its tests, fastest first (setup and teardown included, as recorded in the clean run), until
the budget is spent; at least one. A mutant killed only by a slower test is reported as
surviving, so the score is a lower bound, and each such survivor is a missing fast test.

Outside a mutant (mutmut's stats run, clean run, forced-fail run) it changes nothing; the
clean run records every test's duration into ``mutation-durations.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

DURATIONS = Path("mutation-durations.json")  # in mutants/, where mutmut runs pytest
_recorded: dict[str, float] = {}


def _mutant() -> str:
    name = os.environ.get("MUTANT_UNDER_TEST", "")
    return name if "__mutmut_" in name else ""


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if os.environ.get("MUTANT_UNDER_TEST", "") == "":  # the clean run
        _recorded[report.nodeid] = _recorded.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _recorded and os.environ.get("MUTANT_UNDER_TEST", "") == "":
        DURATIONS.write_text(json.dumps(_recorded, indent=0))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not _mutant() or not DURATIONS.exists():
        return
    durations = json.loads(DURATIONS.read_text())
    budget = float(os.environ.get("MUTATION_TEST_BUDGET", "3"))
    ordered = sorted(items, key=lambda it: durations.get(it.nodeid, 0.0))
    keep, spent = [], 0.0
    for item in ordered:
        d = durations.get(item.nodeid, 0.0)
        if keep and spent + d > budget:
            break
        keep.append(item)
        spent += d
    dropped = [it for it in items if it not in keep]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep
