"""The documentation's Python examples run, so they stay true (issue 24).

Every fenced ``python`` block of a page under docs/ runs, in order, in one namespace per page,
from the repository root (the examples use ``examples/nuclei.tif``). Blocks fenced as
``toml``, plain text or shell are not run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
PAGES = sorted(p for p in DOCS.glob("*.md") if FENCE.search(p.read_text(encoding="utf-8")))


def test_pages_with_examples_exist():
    names = {p.name for p in PAGES}
    assert {"quickstart.md", "write-a-plugin.md", "flows.md", "testing.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_examples_run(page, monkeypatch):
    from cellplug.plugins import set_registry

    monkeypatch.chdir(REPO)
    set_registry(None)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for i, block in enumerate(FENCE.findall(page.read_text(encoding="utf-8"))):
        code = compile(block, f"{page.name}[python block {i + 1}]", "exec")
        exec(code, namespace)  # the documentation's own examples
    set_registry(None)


def test_figures_script_and_pages_agree():
    """flows.md shows exactly the pictures the script writes."""
    script = (DOCS / "scripts" / "flow_figures.py").read_text()
    made = set(re.findall(r'"(flows_\w+\.png)"', script))
    shown = set(re.findall(r"figures/(flows_\w+\.png)", (DOCS / "flows.md").read_text()))
    assert made == shown and made
    assert all((DOCS / "figures" / name).is_file() for name in made)
