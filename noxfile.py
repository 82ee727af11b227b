"""Sessions: tests (default), lint; against Cellpose 3.1.1.2: parity, bench, golden; bridges later.

torch is always installed first and pinned (a local CPU wheel): an unpinned torch pulls
gigabytes of CUDA wheels.
"""

from __future__ import annotations

import glob

import nox

TORCH = "torch==2.13.0"
CELLPOSE = "cellpose==3.1.1.2"
nox.options.sessions = ["tests", "lint"]
nox.options.default_venv_backend = "venv"


def install_cellplug(session: nox.Session, *extras: str) -> None:
    session.install(TORCH)
    session.install("-e", f".[{','.join(extras)}]" if extras else ".")


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite, with the example and broken test plugins installed beside cellplug."""
    install_cellplug(session, "test")
    for plugin in sorted(glob.glob("tests/plugins/dists/*/pyproject.toml")):
        session.install(plugin.rsplit("/", 1)[0])
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "src", "plugins", "tests", "benchmarks", "training", "noxfile.py")


def _reference_env(session: nox.Session) -> None:
    """cellplug and Cellpose 3.1.1.2 side by side (Cellpose is only ever a reference)."""
    session.install(TORCH)
    session.install(CELLPOSE)
    session.install("-e", ".")


def _run_scripts(session: nox.Session, pattern: str) -> bool:
    """Run the posargs as one script with its arguments, else every script matching pattern.

    Returns True when the posargs were run (so a session can skip its extras).
    """
    if session.posargs:  # e.g. -- benchmarks/parity_model.py runs/x/generalist.pth --out ...
        session.run("python", *session.posargs)
        return True
    for script in sorted(glob.glob(pattern)):
        session.run("python", script)
    return False


@nox.session
def parity(session: nox.Session) -> None:
    """Numerical parity with Cellpose 3.1.1.2 (needs ../shared/data for real images)."""
    _reference_env(session)
    if _run_scripts(session, "benchmarks/parity_*.py"):
        return
    # the unit tests that compare against Cellpose directly
    session.install("pytest")
    session.run("pytest", "-q", "-rs", "tests/cellplug/test_tiling.py",
                "tests/plugins/cellplug_unet/test_network.py",
                "tests/plugins/cellplug_flows/test_dynamics.py")


@nox.session
def bench(session: nox.Session) -> None:
    """Speed against Cellpose 3.1.1.2 measured in the same run; results in benchmarks/results/."""
    _reference_env(session)
    session.install("psutil")
    _run_scripts(session, "benchmarks/bench_*.py")


@nox.session
def golden(session: nox.Session) -> None:
    """Regenerate tests/data/golden/ (Cellpose 3.1.1.2's outputs the default tests compare to)."""
    _reference_env(session)
    session.run("python", "tests/data/golden/make_golden.py")
